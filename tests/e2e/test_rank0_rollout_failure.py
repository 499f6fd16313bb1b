"""Issue 12, "What must be shown": a multi-rank run whose rank-0 rollout fails with no relaunch left
ends on every rank with the error, instead of leaving rank 1 in the next broadcast until the process
group's timeout (a hang).

Two processes (DP=2), the run's only embedded server killed with -9 after step 2 and
rollout.max_server_restarts=0. Where the kill lands depends on timing: in a rollout (rank 0's own
work), rank 0's RolloutServerError reaches rank 1 as RankZeroError quoting it (train/rank0.py); in a
weight sync (collective), both ranks raise the sync's RolloutServerError. Either way rank 1 ends with
an error naming the dead server, and the run exits non-zero well within the test's bound.
"""

import os
import signal
import subprocess
import time

import pytest

from tests.e2e.runs import REPO, train_args, wait_for_steps


def _server_of(launcher_pid: int) -> list[str]:
    """The embedded server started by a worker of the torchrun process ``launcher_pid`` (its grandchild)."""
    workers = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    return [pid for w in workers for pid in subprocess.run(["pgrep", "-P", w, "-f", "popo_mega.rollout.server"],
                                                           capture_output=True, text=True).stdout.split()]


@pytest.mark.extended  # two processes + a server, ~2 min; CI: test_rank0_failures.py (on_rank0 on 2 ranks) and
# test_train_loop.py::test_no_restarts_left_ends_the_run_with_the_server_named (the same failure, one process)
def test_rank0_rollout_failure_without_relaunch_ends_every_rank(base, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(train_args(base, run_dir, 8, ["train.save_interval=0", "rollout.max_server_restarts=0"],
                                       nproc=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        wait_for_steps(proc, run_dir, 2)
        servers = _server_of(proc.pid)
        assert len(servers) == 1, servers
        os.kill(int(servers[0]), signal.SIGKILL)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    rank1 = [line for line in out.splitlines() if line.startswith("[rank1]:")
             and ("RankZeroError: rank 0 failed: RolloutServerError" in line or "RolloutServerError: weight sync" in line)]
    assert rank1 and "http://127.0.0.1:" in rank1[-1], out[-4000:]   # rank 1 ended with the dead server named
    assert "relaunched" not in out
    print(f"every rank ended {time.monotonic() - t0:.1f} s after the kill; rank 1: {rank1[-1][:160]}")
