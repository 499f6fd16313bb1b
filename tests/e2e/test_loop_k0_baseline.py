"""The rebuilt RL loop reproduces the loop it replaced, bit for bit (issue 12, "What must be shown":
the k = 0 run equal to today's loop).

``loop_k0_baseline.json`` holds 20 steps of the quickstart config on the e2e micro task (the
conftest's warm-started base), recorded with the loop as it stood before issue 12's rebuild
(commit 1df186a): every logged metric but the timings, per step. This test runs the current loop
with the same command and asserts every one of those numbers is identical (rewards, losses and
their parts, grad norms, LR, tau, held-out accuracies at steps 10 and 20).

Determinism: the embedded server samples every row from its own seed, but its continuous batching
makes a row's batch-mates depend on request timing, and a different batch shape changes logits in
the last bits (two runs of the old loop differed by 1e-7 in a loss from step 7 on). The server is
therefore started here with ``--max-running-requests 1`` (every row decodes alone) and the run
attaches to it with ``rollout.urls``; with that, two runs of the old loop were identical.

Exact floats depend on the CPU's kernels: the fixture was recorded on the 2-core x86 CI-like box.
Regenerate it (only from a loop known to be equivalent) with
``python -m tests.e2e.test_loop_k0_baseline BASE_DIR``.
"""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tests.e2e.runs import REPO, read_metrics, train_args

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loop_k0_baseline.json")
STEPS = 20
TIMINGS = {"wall_time", "elapsed_s", "step_time_s", "rollouts_per_s", "tokens_per_s", "rollout_s", "sync_s",
           "train_s", "rollout_wait_s"}
PROMPTS_PER_STEP = 4  # train_args: data.prompts_per_step=4


def base_digest(base: str) -> str:
    with open(os.path.join(base, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_k0(base: str, run_dir: str) -> list[dict]:
    """The 20-step run against a one-row-at-a-time embedded server; its metrics without timings."""
    from popo_mega.rollout.sglang_launcher import launch_servers

    os.makedirs(run_dir, exist_ok=True)
    (server,) = launch_servers("embedded", base, random_seed=0, log_dir=run_dir,
                               extra_args=("--enable-deterministic-inference", "--max-running-requests", "1",
                                           "--weight-version", "step0"))  # as the run's own launch names it
    try:
        r = subprocess.run(train_args(base, run_dir, STEPS, ["train.save_interval=0", "eval.interval=10",
                                                             f'rollout.urls=["{server.url}"]']),
                           capture_output=True, text=True, timeout=900, cwd=REPO)
    finally:
        server.stop()
    assert r.returncode == 0, r.stderr[-4000:]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(run_dir)]


@pytest.mark.extended  # ~80 s (a 20-step run); CI's test_train_loop.py runs the same loop for 4-8 steps
def test_the_rebuilt_loop_reproduces_the_old_loop(base, tmp_path):
    with open(FIXTURE) as f:
        recorded = json.load(f)
    assert base_digest(base) == recorded["base_sha256"], "the warm-started base changed: the comparison means nothing"
    rows = run_k0(base, str(tmp_path / "run"))
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for old, new in zip(recorded["rows"], rows):
        # what asynchronous rollouts added, at k = 0: every rollout sampled from its own step's weights
        # (the step before the one it trains), none across a sync, the prompts drawn in order
        added = {k: new.pop(k) for k in ("staleness", "staleness_mean", "partial_rollouts", "prompt_cursor")}
        assert added == {"staleness": 0.0, "staleness_mean": 0.0, "partial_rollouts": 0.0,
                         "prompt_cursor": float(PROMPTS_PER_STEP * (old["step"] - 1))}, (old["step"], added)
        assert sorted(new) == sorted(old), f"step {old['step']}: metric keys differ"
        differing = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
        assert not differing, f"step {old['step']}: {differing}"


if __name__ == "__main__":  # record the fixture: python -m tests.e2e.test_loop_k0_baseline BASE_DIR
    base = sys.argv[1]
    if not os.path.exists(os.path.join(base, "config.json")):
        from popo_mega.rewards.synthetic import SyntheticTask
        from popo_mega.train.warmstart import warm_start

        # the same call as tests/e2e/conftest.py's ``base`` fixture
        warm_start(SyntheticTask(max_operand=3, n_heldout=4, seed=0), base, low=0.0, high=1.0, hidden=64, lr=3e-3,
                   batch_size=32, eval_every=40, max_steps=40, eval_problems=4)
    import tempfile

    rows = run_k0(base, tempfile.mkdtemp(prefix="k0_"))
    with open(FIXTURE, "w") as f:
        json.dump({"base_sha256": base_digest(base), "steps": STEPS, "rows": rows}, f, indent=1)
        f.write("\n")
    print(f"wrote {FIXTURE}: {len(rows)} steps")
