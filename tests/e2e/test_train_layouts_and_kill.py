"""popo-train at other layouts, and after kill -9, against an uninterrupted single-process run.

Rollouts are sampled with per-rollout seeds (derived from train.seed and the step), so two runs of
the same config sample the same rollouts as long as their served weights agree. Hence:
- TP=2 and PP=2 (two gloo processes under torchrun) give the TP=1 run's reward curve;
- a run killed with -9 while writing a checkpoint resumes from the previous complete one, and its
  next steps equal the uninterrupted run's.
"""

import os
import signal
import subprocess

import pytest

from tests.e2e.runs import REPO, kill_9_when, read_metrics, train_args

STEPS = 6
SEED = ["train.seed=7", "model.make_vocab_size_divisible_by=8"]  # 100 ids: TP=2 shards both hold real ids


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The uninterrupted TP=1 run that the others are compared with."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    r = subprocess.run(train_args(base, run_dir, STEPS, SEED), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert any(row.get("skipped", 0.0) == 0.0 for row in rows), "no step trained: the comparison would be empty"
    return rows


def _same_curve(rows, ref, steps, what):
    """Rewards equal (the same rollouts were sampled and graded); the loss and grad norm agree to
    float rounding across layouts."""
    got = {row["step"]: row for row in rows}
    for step in steps:
        a, b = got[step], ref[step - 1]
        assert a["reward"] == b["reward"] and a["positive_rate"] == b["positive_rate"], (what, step, a, b)
        if b.get("skipped", 0.0) == 0.0:
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), (what, step)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3, abs=1e-5), (what, step)


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2"])
def test_two_process_layouts_give_the_single_process_curve(base, reference, tmp_path, layout):
    run_dir = str(tmp_path / "run")
    r = subprocess.run(train_args(base, run_dir, STEPS, [*SEED, layout], nproc=2), capture_output=True, text=True,
                       timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    _same_curve(read_metrics(run_dir), reference, range(1, STEPS + 1), layout)


def test_kill_9_while_checkpointing_then_resume_continues_the_run(base, reference, tmp_path):
    """SIGKILL the trainer the moment its step-4 checkpoint appears as a temporary directory
    (half-written). The resumed run must load step 2, ignore and clear the partial step 4, and
    then log steps 3.. exactly as the uninterrupted run did."""
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    partial = os.path.join(ckpts, ".tmp_step_00000004")
    seen, rc, out = kill_9_when(train_args(base, run_dir, STEPS, SEED), partial, str(tmp_path / "killed.log"))
    assert seen, f"the step-4 checkpoint was never seen in progress:\n{out[-3000:]}"
    assert rc == -signal.SIGKILL, out[-3000:]
    assert "step_00000004" not in os.listdir(ckpts), "the kill came after the checkpoint was complete"

    r = subprocess.run(train_args(base, run_dir, STEPS, SEED), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "step_00000002 at step 2" in r.stdout
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # steps 3-4 of the killed run replaced
    _same_curve(rows, reference, range(3, STEPS + 1), "resumed after kill -9")
    assert sorted(os.listdir(ckpts)) == [f"step_{STEPS:08d}"]
