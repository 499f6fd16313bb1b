"""A failure in rank-0-only work reaches every rank (train/rank0.py): no rank is left in a collective."""

import time

import pytest

from tests.multiprocess import run_world


def _fails_on_rank0(rank, world_size):
    import torch.distributed as dist

    from popo_mega.train.rank0 import RankZeroError, on_rank0

    dist.init_process_group("gloo")
    got = {"value": on_rank0(lambda: {"step": 3}, rank, world_size)}

    def grade():
        raise ValueError("math_train.json:17: gold is not a string")

    t0 = time.monotonic()
    try:
        on_rank0(grade, rank, world_size)
    except RankZeroError as exc:
        got["error"] = ("RankZeroError", str(exc))
    except ValueError as exc:
        got["error"] = ("ValueError", str(exc))
    dist.barrier()  # every rank reached the next collective: nobody hangs in a broadcast
    got["seconds"] = time.monotonic() - t0
    from tests.distributed.resilient_engine_checks import engine_checks

    got["engine"] = engine_checks(rank)   # the resilient engine's rank-0 failures, in the same processes
    return got


@pytest.fixture(scope="module")
def out():
    return run_world(_fails_on_rank0, 2)


def test_the_resilient_engine_relaunches_or_ends_every_rank(out):
    from tests.distributed.resilient_engine_checks import check_outcomes

    check_outcomes(out[0]["engine"], out[1]["engine"])


def test_an_error_on_rank0_reaches_every_rank(out):
    assert [o["value"] for o in out] == [{"step": 3}, {"step": 3}]
    assert out[0]["error"] == ("ValueError", "math_train.json:17: gold is not a string")
    assert out[1]["error"] == ("RankZeroError", "rank 0 failed: ValueError: math_train.json:17: gold is not a string")
    assert all(o["seconds"] < 30 for o in out)
