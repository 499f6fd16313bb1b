"""popo-train end to end on the CPU: embedded server, Megatron policy, POPO, metrics, checkpoints, resume, SIGTERM.

The base is the micro warm-started model of conftest.py. Every run is a real `popo-train` process.
"""

import os
import signal
import subprocess

from tests.e2e.runs import REPO, read_metrics, train_args, wait_for_steps


def test_train_resume_and_sigterm(base, tmp_path):
    run_dir = str(tmp_path / "run")
    r = subprocess.run(train_args(base, run_dir, 4), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-3].startswith("initial accuracy: ") and lines[-2].startswith("final accuracy: ")
    assert lines[-1] == f"report: {run_dir}/report.png" and os.path.getsize(f"{run_dir}/report.png") > 1000
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(0.0 <= row["reward"] <= 1.0 and row["rollouts"] == 16 for row in rows)
    assert any(row.get("skipped", 0.0) == 0.0 for row in rows), "no step trained: the base gives no positive"
    assert sorted(os.listdir(f"{run_dir}/checkpoints")) == ["step_00000004"]  # keep_last=1

    # Resume with more steps than the first run: tests/e2e/test_async_rollouts.py (k = 1, after a
    # kill -9); an exact resume: test_train_layouts_and_kill.py.

    # SIGTERM: the run writes a checkpoint at the step it reached, then exits cleanly.
    sig_dir = str(tmp_path / "sig")
    proc = subprocess.Popen(train_args(base, sig_dir, 10000, ["train.save_interval=0"]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    wait_for_steps(proc, sig_dir, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert "interrupted at step" in out
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert step >= 2 and os.listdir(f"{sig_dir}/checkpoints") == [f"step_{step:08d}"]


def _kill_the_server_mid_run(base, run_dir, extra=()):
    """Start an 8-step run, kill -9 its only embedded server after step 2; return (returncode, output)."""
    proc = subprocess.Popen(train_args(base, run_dir, 8, ["train.save_interval=0", *extra]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO)
    wait_for_steps(proc, run_dir, 2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "popo_mega.rollout.server"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_a_killed_rollout_server_is_relaunched_and_the_run_goes_on(base, tmp_path):
    """kill -9 the run's only embedded server mid-run: the loop relaunches it, syncs the current
    weights into it, samples the step again, and finishes every step."""
    run_dir = str(tmp_path / "run")
    rc, out = _kill_the_server_mid_run(base, run_dir)
    assert rc == 0, out[-4000:]
    assert "relaunched http://" in out
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert rows[-1]["server_restarts"] == 1.0


def test_no_restarts_left_ends_the_run_with_the_server_named(base, tmp_path):
    """rollout.max_server_restarts=0: the same kill ends the run with an error naming the dead server."""
    rc, out = _kill_the_server_mid_run(base, str(tmp_path / "run"), ["rollout.max_server_restarts=0"])
    assert rc != 0
    assert "RolloutServerError" in out and "http://127.0.0.1:" in out and "relaunched" not in out
