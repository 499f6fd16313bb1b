"""popo-train end to end (CPU, embedded server, micro task) with GRPO's KL to the reference
(algorithm.grpo.beta_kl=0.04) and two optimizer steps per rollout batch (train.updates_per_rollout=2).

3 steps = 2 rollout batches (updates 2 + 1): one metrics record per optimizer step, the batch's
rollouts on its first record; save_interval 2 saves after step 2 and the last (keep_last 1);
kl_ref is 0 at step 1 only (the policy is the reference), then > 0.
"""

import os
import subprocess

import pytest

from tests.e2e.runs import REPO, read_metrics, train_args


@pytest.mark.slow   # a popo-train process: 90 s wall at load 13 on the shared 2-core machine (base fixture aside)
def test_grpo_kl_and_two_updates_per_rollout(base, tmp_path):
    run_dir = str(tmp_path / "run")
    extra = ["algorithm.name=grpo", "algorithm.grpo.beta_kl=0.04", "train.updates_per_rollout=2", "train.lr=1e-3"]
    r = subprocess.run(train_args(base, run_dir, 3, extra), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["rollouts"] for row in rows] == [16, 0, 16]   # a batch per 2 optimizer steps
    assert ["reward" in row for row in rows] == [True, False, True]
    trained = [row for row in rows if row.get("skipped", 1.0) == 0.0]
    assert trained and trained[0]["step"] == 1, "the first update did not train"
    assert rows[0]["kl_ref"] == 0.0                                 # the policy is the reference
    assert all(row["kl_ref"] > 0 for row in rows[1:]), [row["kl_ref"] for row in rows]
    assert sorted(os.listdir(f"{run_dir}/checkpoints")) == ["step_00000003"]
    # eval.interval=2: evaluated after the batch ending at step 2
    assert [row["step"] for row in rows if "heldout_accuracy" in row] == [2]
    print("kl_ref per step:", [row["kl_ref"] for row in rows], "loss:", [row["loss"] for row in rows])
