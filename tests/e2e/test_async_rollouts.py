"""rollout.max_staleness = 1 on the real path (popo-train, its embedded server, the quickstart config on
the micro task): the rollouts of step t + 1 are sampled while step t trains, and a kill -9 with a
batch in flight resumes from the checkpoint with that batch sampled again from the same prompts."""

import os
import subprocess

import pytest

from tests.e2e.runs import REPO, kill_9_when, read_metrics, train_args

STEPS = 6
PROMPTS_PER_STEP = 4  # train_args: data.prompts_per_step=4


def assert_one_step_ahead(rows):
    """One step ahead, never more. Batch 0 is sampled before any sync (staleness 0); every even batch
    ran behind the evaluation of the step before it (train_args: eval.interval=2; ``quiet`` waits for
    the batch in flight), so all of it was sampled from the weights one step back: staleness 1, no
    partial rollout. The odd batches race their step's sync (their requests go out while the step
    before trains): only <= 1 holds for them. Before, all were asserted 1.0, and a batch none of
    whose rollouts got a first token before the sync (staleness 0, seen in a quickstart run) failed."""
    staleness = [row["staleness"] for row in rows]
    assert staleness[0] == 0.0 and max(staleness) <= 1.0, staleness
    for batch in range(2, len(rows), 2):
        assert (rows[batch]["staleness"], rows[batch]["staleness_mean"], rows[batch]["partial_rollouts"]) == (
            1.0, 1.0, 0.0), (batch, rows[batch])


def test_k1_runs_one_step_ahead_and_a_kill_9_resumes_with_the_batch_in_flight_sampled_again(base, tmp_path):
    run_dir = str(tmp_path / "run")
    args = train_args(base, run_dir, STEPS, ["rollout.max_staleness=1"])
    complete = os.path.join(run_dir, "checkpoints", "step_00000004")
    # the producer has batch 5 sampled or in flight when step 4's checkpoint is complete
    seen, _, out = kill_9_when(args, complete, str(tmp_path / "killed.log"))
    assert seen, f"the step-4 checkpoint never appeared:\n{out[-3000:]}"
    before = read_metrics(run_dir)
    assert [row["step"] for row in before][:4] == [1, 2, 3, 4]
    assert_one_step_ahead(before[:4])

    # resumed with one step more than the killed run had (a user training on): steps 5-7
    r = subprocess.run(train_args(base, run_dir, STEPS + 1, ["rollout.max_staleness=1"]), capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "step_00000004 at step 4" in r.stdout
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 2))  # the killed run's step 5 (if any) replaced
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [f"step_{STEPS + 1:08d}"]  # keep_last=1
    # the prompts drawn before each step's batch: PROMPTS_PER_STEP per step, none skipped or repeated,
    # the resumed steps 5-7 included (the checkpoint kept the cursor before batch 5, not the stream's)
    assert [row["prompt_cursor"] for row in rows] == [float(PROMPTS_PER_STEP * s) for s in range(STEPS + 1)]
    assert all(row["staleness"] <= 1.0 for row in rows[1:])
    assert all(row["rollout_wait_s"] >= 0.0 and row["train_s"] > 0.0 for row in rows)


@pytest.mark.extended  # ~60 s; CI's k = 1 test above runs the same pipeline in one process
def test_k1_under_tensor_parallelism_samples_one_step_ahead(base, tmp_path):
    """Two ranks (TP=2): rank 0's producer samples ahead while both ranks train; every rank gets
    rank 0's batch (broadcast), and no rank waits for a collective the producer thread would own."""
    run_dir = str(tmp_path / "run")
    r = subprocess.run(train_args(base, run_dir, 5, ["rollout.max_staleness=1", "parallel.tensor=2"], nproc=2),
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert_one_step_ahead(rows)
    assert [row["prompt_cursor"] for row in rows] == [float(PROMPTS_PER_STEP * s) for s in range(5)]
