"""MetricsLogger / read_metrics (popo_mega/train/metrics.py): JSONL records, resume truncation,
truncated last lines, the console line (ETA worked out by hand) and TensorBoard scalars. CPU."""

import io
import json
import math

import pytest

from popo_mega.train.metrics import MetricsLogger, format_duration, read_metrics


class FakeClock:
    """Returns the queued times in order (monotonic clock stand-in)."""

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


M = {"reward": 0.5, "positive_rate": 0.25, "entropy": 1.234, "loss": -0.0123}


def make_logger(tmp_path, clock, **kw):
    kw.setdefault("tensorboard", False)
    kw.setdefault("total_steps", 10)
    kw.setdefault("stream", io.StringIO())
    return MetricsLogger(tmp_path, clock=clock, wall_clock=lambda: 1000.0, **kw)


def test_jsonl_records_and_console_line(tmp_path):
    # Construction at t=100, steps end at 102, 105, 109: step times 2, 3, 4 s.
    out = io.StringIO()
    lg = make_logger(tmp_path, FakeClock(100.0, 102.0, 105.0, 109.0), stream=out, eta_window=3)
    for step in (1, 2, 3):
        lg.log(step, M, rollouts=8, tokens=400)
    lg.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(l) for l in lines]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert [r["elapsed_s"] for r in recs] == [2.0, 5.0, 9.0]
    assert [r["step_time_s"] for r in recs] == [2.0, 3.0, 4.0]
    assert [r["rollouts_per_s"] for r in recs] == [4.0, 8 / 3, 2.0]
    assert [r["tokens_per_s"] for r in recs] == [200.0, 400 / 3, 100.0]
    assert all(r["wall_time"] == 1000.0 and r["rollouts"] == 8 and r["tokens"] == 400 for r in recs)
    assert all(r[k] == v for r in recs for k, v in M.items())

    # ETA after step 3: mean(2, 3, 4) = 3 s/step x (10 - 3) steps left = 21 s.
    console = out.getvalue().splitlines()
    assert console[-1] == ("step 3/10 | 2.00 rollouts/s | 100.0 tokens/s | reward 0.5 | pos 0.25 | "
                           "entropy 1.234 | loss -0.0123 | ETA 0:00:21")
    # After step 1: 2 s x 9 left = 18 s.
    assert console[0].endswith("ETA 0:00:18")
    assert console[1].endswith("ETA 0:00:20")  # mean(2, 3) = 2.5 x 8


def test_eta_window_is_a_moving_average(tmp_path):
    # Step times 10, 1, 1 with window 2: ETA after step 3 uses (1 + 1) / 2 = 1 s x 2 left = 2 s.
    out = io.StringIO()
    lg = make_logger(tmp_path, FakeClock(0.0, 10.0, 11.0, 12.0), stream=out, eta_window=2,
                     total_steps=5)
    for step in (1, 2, 3):
        lg.log(step, {}, rollouts=1, tokens=1)
    assert out.getvalue().splitlines()[-1].endswith("ETA 0:00:02")
    assert format_duration(3725.4) == "1:02:05"


def test_non_finite_values_are_logged_and_flagged(tmp_path):
    out = io.StringIO()
    lg = make_logger(tmp_path, FakeClock(0.0, 1.0), stream=out)
    lg.log(1, {"reward": 1.0, "loss": float("nan"), "entropy": float("inf")}, rollouts=4, tokens=10)
    lg.close()
    line = out.getvalue().strip()
    assert "loss nan" in line and "entropy inf" in line
    assert line.endswith("| NON-FINITE: loss, entropy")
    (r,) = read_metrics(tmp_path)
    assert math.isnan(r["loss"]) and r["entropy"] == math.inf and r["reward"] == 1.0


def test_resume_drops_steps_at_or_after_resume_step(tmp_path):
    lg = make_logger(tmp_path, FakeClock(0.0, 1.0, 2.0, 3.0, 4.0, 5.0))
    for step in range(1, 6):
        lg.log(step, {"reward": step / 10}, rollouts=1, tokens=1)
    lg.close()
    # Crash after step 5 was logged but the last checkpoint holds 3 steps: resume at step 4.
    lg = make_logger(tmp_path, FakeClock(50.0, 57.0), resume_step=4)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    lg.log(4, {"reward": 0.99}, rollouts=1, tokens=1)
    lg.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[3]["reward"] == 0.99 and recs[2]["reward"] == 0.3
    assert recs[3]["elapsed_s"] == 3.0 + 7.0  # continues from step 3's elapsed, no crash gap
    with pytest.raises(ValueError, match="steps must increase"):
        make_logger(tmp_path, FakeClock(0.0), resume_step=5).log(4, {}, rollouts=0, tokens=0)


def test_resume_after_kill_mid_write(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "reward": 0.2}\n{"step": 3, "rew')
    with pytest.warns(UserWarning, match="truncated last line"):
        lg = make_logger(tmp_path, FakeClock(0.0, 1.0), resume_step=3)
    lg.log(3, {"reward": 0.3}, rollouts=1, tokens=1)
    lg.close()
    assert p.read_text().splitlines()[-1].startswith('{"step": 3')
    assert [r["reward"] for r in read_metrics(tmp_path)] == [0.1, 0.2, 0.3]


def test_existing_metrics_without_resume_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(FileExistsError, match="resume_step"):
        make_logger(tmp_path, FakeClock(0.0))
    make_logger(tmp_path, FakeClock(0.0), resume_step=1).close()  # starting over drops them all
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_only_rank0_writes(tmp_path):
    out = io.StringIO()
    lg = make_logger(tmp_path / "r1", FakeClock(), rank=1, stream=out, tensorboard=True)
    assert lg.log(1, {"reward": 1.0}, rollouts=1, tokens=1) is None
    lg.close()
    assert not (tmp_path / "r1").exists() and out.getvalue() == ""


def test_bad_inputs_name_the_problem(tmp_path):
    lg = make_logger(tmp_path, FakeClock(0.0, 1.0, 2.0))
    with pytest.raises(TypeError, match="'reward'"):
        lg.log(1, {"reward": "high"}, rollouts=1, tokens=1)
    with pytest.raises(ValueError, match="reserved"):
        lg.log(1, {"step": 1.0}, rollouts=1, tokens=1)
    with pytest.raises(ValueError, match="tokens"):
        lg.log(1, {}, rollouts=1, tokens=-1)
    with pytest.raises(ValueError, match="'rollouts' = 3.0 disagrees with rollouts=2"):
        lg.log(1, {"rollouts": 3.0}, rollouts=2, tokens=1)
    rec = lg.log(1, {"rollouts": 2.0}, rollouts=2, tokens=1)  # agreeing duplicate: stored once
    assert rec["rollouts"] == 2 and json.loads((tmp_path / "metrics.jsonl").read_text())["rollouts"] == 2
    with pytest.raises(ValueError, match="steps must increase"):
        lg.log(1, {}, rollouts=1, tokens=1)


def test_read_metrics_bad_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "reward": 0.7}\n{"step": 3, "re')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: skipping truncated last line"):
        assert [r["reward"] for r in read_metrics(tmp_path)] == [0.5, 0.7]
    # A terminated bad line is corruption, not a kill mid-write: error with file and line.
    p.write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)
    p.write_text('{"step": 1}\n{"step": 3}\n{"step": 4, "x"\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not valid JSON"):
        read_metrics(tmp_path)
    p.write_text('{"step": 2}\n{"step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: step 1 after step 2"):
        read_metrics(tmp_path)
    p.write_text('{"reward": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: record has no integer 'step'"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_metrics(tmp_path / "nowhere")


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = make_logger(tmp_path, FakeClock(0.0, 2.0, 4.0), tensorboard=True)
    lg.log(1, {"reward": 0.25, "positive_rate": 0.5}, rollouts=8, tokens=100)
    lg.log(2, {"reward": 0.75, "positive_rate": 0.5}, rollouts=8, tokens=100)
    lg.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"reward", "positive_rate", "rollouts_per_s", "tokens_per_s"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 0.25), (2, 0.75)]
    assert [e.value for e in acc.Scalars("tokens_per_s")] == [50.0, 50.0]  # 100 tokens / 2 s


def test_console_every_log_interval_steps_jsonl_every_step(tmp_path):
    # train.log_interval = 3 over 7 steps: console at 3, 6 and the last step 7, plus step 4 (a NaN
    # is never hidden); metrics.jsonl gets all 7.
    out = io.StringIO()
    lg = make_logger(tmp_path, FakeClock(*range(8)), stream=out, total_steps=7, console_interval=3)
    for step in range(1, 8):
        lg.log(step, {"loss": float("nan")} if step == 4 else M, rollouts=1, tokens=1)
    lg.close()
    assert [line.split(" |")[0] for line in out.getvalue().splitlines()] == [
        "step 3/7", "step 4/7", "step 6/7", "step 7/7"]
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 8))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"console_interval \(train.log_interval\) must be an int >= 1"):
            make_logger(tmp_path / "x", FakeClock(0.0), console_interval=bad)


def test_startup_metrics_go_into_the_first_record_of_each_run(tmp_path):
    start = {"prompts_too_long": 7.0, "prompts_too_long/math_train_rllm.json": 7.0}
    lg = make_logger(tmp_path, FakeClock(0.0, 1.0, 2.0), startup_metrics=start)
    lg.log(1, M, rollouts=1, tokens=1)
    lg.log(2, M, rollouts=1, tokens=1)
    lg.close()
    # a resumed run records them again at its first step
    lg = make_logger(tmp_path, FakeClock(0.0, 1.0), startup_metrics={"prompts_too_long": 7.0}, resume_step=2)
    lg.log(2, M, rollouts=1, tokens=1)
    lg.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["prompts_too_long"] == 7.0 and recs[0]["prompts_too_long/math_train_rllm.json"] == 7.0
    assert recs[1]["prompts_too_long"] == 7.0 and "prompts_too_long/math_train_rllm.json" not in recs[1]
    with pytest.raises(TypeError, match="metric 'x' must be a number"):
        make_logger(tmp_path / "y", FakeClock(0.0), startup_metrics={"x": "seven"})
