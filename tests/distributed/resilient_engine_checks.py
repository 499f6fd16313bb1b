"""The resilient engine (rollout/resilient_engine.py) on two gloo ranks with a stand-in HttpEngine on
rank 0 and a stand-in weight stream: rank 0's rollout failing with no relaunch left ends every rank
with the error (rank 1: RankZeroError quoting it); with a restart left, the dead server is relaunched,
given the weights last served (every rank joins that sync), and the rollout runs again; a sync that
fails with no restart left raises on every rank; so does a colocated server's refused release.

The checks run inside test_rank0_failures.py's two processes (one spawn for both files: a spawn costs
~25 s of CPU on the loaded CI box); this file holds them and their assertions."""

import time


class _Http:
    """Rank 0's engine: ``replace_dead_servers`` relaunches one server per call, ``sync_weights``
    fails while ``sync_failures`` > 0, and records what it was sent."""

    def __init__(self, sync_failures=0):
        self.relaunches, self.synced, self.sync_failures = 0, [], sync_failures

    def replace_dead_servers(self):
        self.relaunches += 1
        return ["http://127.0.0.1:1"]

    def sync_weights(self, tensors, version):
        from popo_mega.rollout.http_engine import RolloutServerError

        names = [n for n, _ in tensors]
        if self.sync_failures:
            self.sync_failures -= 1
            raise RolloutServerError("http://127.0.0.1:1/pause_generation failed: connection refused")
        self.synced.append((version, names))


def _engine(rank, max_restarts, sync_failures=0):
    from types import SimpleNamespace

    from popo_mega.rollout.resilient_engine import ResilientEngine

    rt = SimpleNamespace(rank=rank, world_size=2)
    return ResilientEngine(_Http(sync_failures) if rank == 0 else None, None, rt, None, None, max_restarts=max_restarts,
                           colocated=False, serving="served-ema", version="step4", log=lambda line: None)


def engine_checks(rank):
    """Run in each process of test_rank0_failures.py's world (gloo initialised); the outcomes per rank."""
    from unittest import mock

    import torch
    import torch.distributed as dist

    from popo_mega.rollout.http_engine import RolloutServerError
    from popo_mega.train.rank0 import RankZeroError

    def stream(module, arch, layout):   # every rank takes part, as the TP/PP gathers would
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        return iter([(f"{module}.weight", t)] if rank == 0 else [])

    out = {}
    with mock.patch("popo_mega.train.served_model.hf_tensors_for_engine", stream):
        calls = []

        def rollout():
            calls.append(1)
            if len(calls) == 1:
                raise RolloutServerError("http://127.0.0.1:1/generate failed: connection refused")
            return {"samples": 3}

        engine = _engine(rank, max_restarts=1)           # a restart left: relaunch, re-sync, roll out again
        out["retried"] = engine.on_rank0(rollout, "rollout")
        out["synced"] = engine.http.synced if rank == 0 else None
        out["restarts"] = engine.restarts

        engine = _engine(rank, max_restarts=0)           # none left: every rank ends with the error
        t0 = time.monotonic()
        try:
            engine.on_rank0(lambda: (_ for _ in ()).throw(
                RolloutServerError("http://127.0.0.1:1/generate failed: connection refused")), "rollout")
        except (RolloutServerError, RankZeroError) as exc:
            out["no_restart"] = (type(exc).__name__, str(exc))
        engine = _engine(rank, max_restarts=0, sync_failures=1)
        try:
            engine.sync("served-ema", "step5")
        except RolloutServerError as exc:
            out["sync"] = str(exc)
        # colocated: the server refuses the release (SGLang: requests still running); every rank
        # ends with it before the step, and nobody waits in a barrier for rank 0
        engine = _engine(rank, max_restarts=0)
        engine.colocated = True
        if rank == 0:
            def refuse():
                raise RolloutServerError("http://127.0.0.1:1/release_memory_occupation: HTTP 400 requests are running")
            engine.http.release_memory_occupation = refuse
        stepped = []
        try:
            with engine.released_for_step():
                stepped.append(1)
        except (RolloutServerError, RankZeroError) as exc:
            out["release"] = (type(exc).__name__, str(exc), len(stepped))
        dist.barrier()   # nobody was left in a broadcast
        out["seconds"] = time.monotonic() - t0
    return out


def check_outcomes(r0, r1):
    assert r0["retried"] == r1["retried"] == {"samples": 3}
    # the relaunched server got the weights last served (the served EMA, step4), before the retry
    assert r0["synced"] == [("step4", ["served-ema.weight"])] and r0["restarts"] == 1
    assert r0["no_restart"] == ("RolloutServerError", "http://127.0.0.1:1/generate failed: connection refused")
    assert r1["no_restart"] == ("RankZeroError", "rank 0 failed: RolloutServerError: "
                                "http://127.0.0.1:1/generate failed: connection refused")
    want = "weight sync step5 failed: RolloutServerError: http://127.0.0.1:1/pause_generation failed: connection refused"
    assert r0["sync"] == r1["sync"] == want
    refused = "http://127.0.0.1:1/release_memory_occupation: HTTP 400 requests are running"
    assert r0["release"] == ("RolloutServerError", refused, 0)
    assert r1["release"] == ("RankZeroError", f"rank 0 failed: RolloutServerError: {refused}", 0)
    assert r0["seconds"] < 30 and r1["seconds"] < 30
