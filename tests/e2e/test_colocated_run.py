"""popo-train in the CPU's colocated mode (placement.mode: colocated): the embedded server, started with
--enable-memory-saver, frees its weights for every policy step (a memory-saver server then refuses
to generate until every tensor is sent again) and the weight sync after the step restores them, so
the next rollout and the held-out evaluation run on the new weights. Each trained step records what
the release and the resume cost."""

import subprocess

import pytest

from tests.e2e.runs import REPO, read_metrics, train_args


@pytest.mark.extended   # a popo-train process, ~60 s on 2 cores; CI checks the launcher's flag and the timing
@pytest.mark.slow       # (tests/unit/test_placement.py) and the evaluation order (test_evaluation_order.py)
def test_colocated_run_releases_the_server_for_every_step_and_goes_on(base, tmp_path):
    run_dir = str(tmp_path / "run")
    r = subprocess.run(train_args(base, run_dir, 4, ["placement.mode=colocated", "eval.model=served"]),
                       capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(row["rollouts"] == 16 for row in rows)   # every step rolled out after the step before freed the weights
    trained = [row for row in rows if not row.get("skipped")]
    assert trained and all("release_s" in row and "resume_s" in row for row in trained)
    assert [row["step"] for row in rows if "heldout_accuracy" in row] == [2, 4]   # evaluated after the sync
