"""The rollout servers as a whole run sees them: a weight sync or a piece of rank-0 work that meets a
dead server relaunches it (at most ``rollout.max_server_restarts`` per run), gives it the weights the
engine last served, and goes on; the loop carries no relaunch or retry logic.

    engine = ResilientEngine.launch(cfg, rt, trainer.arch, trainer.layout, run_dir, log,
                                    serving=trainer.weights_to_serve(ema=True))   # collective
    engine.sync(trainer.served, "step12")                        # collective: every rank gathers
    batch = engine.on_rank0(lambda: worker.collect(step), "rollout")   # rank 0 samples; every rank gets it
    engine.close()

Every method is collective (all ranks call it in the same order); rank 0 holds the ``HttpEngine``
(``http``; None elsewhere) and decides, and its decisions reach every rank (``train.rank0.on_rank0``):
an error on rank 0 makes every rank raise. What "the weights the engine last served" means: the module
(a ``ServedModel`` or the live policy) and version of the last successful ``sync``; before the first,
the weights the run serves at its start step (the servers load ``model.hf_path``, the same values).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TypeVar

from popo_mega.rollout.http_engine import RolloutServerError
from popo_mega.train.rank0 import broadcast_object, on_rank0

__all__ = ["ResilientEngine"]

T = TypeVar("T")


class ResilientEngine:
    """See the module docstring. ``servers``: the run's ``RunServers`` (sglang_launcher)."""

    def __init__(self, http, servers, rt, arch, layout, *, max_restarts: int, colocated: bool, serving,
                 version: str, log=print):
        self.http, self.servers, self.rt = http, servers, rt
        self.arch, self.layout = arch, layout
        self.max_restarts, self.colocated, self.log = max_restarts, colocated, log
        self.restarts = 0
        self.serving = (serving, version)  # what a relaunched server is given
        self.memory_s: dict[str, float] = {}  # rank 0: the last step's release_s / resume_s (colocated)

    @classmethod
    def launch(cls, cfg, rt, arch, layout, run_dir: str, log=print, *, serving, version: str) -> "ResilientEngine":
        """Start the run's servers where ``rollout.*`` / ``placement.*`` put them (collective) and, on
        rank 0, the HttpEngine on them. ``serving``: what the servers serve at the start (``version``)."""
        from popo_mega.rollout.sglang_launcher import start_run_servers

        servers = start_run_servers(cfg, rt, log_dir=run_dir)
        engine = cls(None, servers, rt, arch, layout, max_restarts=cfg.rollout.max_server_restarts,
                     colocated=cfg.placement.mode == "colocated", serving=serving, version=version, log=log)
        try:
            on_rank0(lambda: engine._connect(cfg, run_dir), rt.rank, rt.world_size)
        except BaseException:
            engine.close()
            raise
        return engine

    def _connect(self, cfg, run_dir: str) -> None:
        from popo_mega.rollout.http_engine import HttpEngine
        from popo_mega.rollout.placement import sync_methods

        r, s = cfg.rollout, self.servers
        methods = sync_methods(r.sync, cfg.placement.mode == "colocated", s.nodes, where=cfg.source)
        self.http = HttpEngine(s.urls, servers=s.local, tensor_urls=[u for u, m in zip(s.urls, methods) if m == "tensor"],
                               master_address=r.master_address or s.master_address, api_key=r.api_key,
                               request_timeout_s=r.request_timeout_s, failover=r.on_server_failure == "retry",
                               max_retries=r.retries, sync_method="disk" if r.sync == "disk" else "auto",
                               disk_dir=os.path.join(run_dir, "weights_sync"), bucket_bytes=r.bucket_mb << 20,
                               sync_backend="nccl" if self.rt.device.type == "cuda" else "gloo",
                               verify_probes=r.verify_sync, pause_mode=r.pause_mode)

    # ---- relaunch (rank 0) ----
    def _relaunch(self, why: str) -> bool:
        """Rank 0: relaunch the dead servers this run started, within the budget; whether any was."""
        if self.restarts >= self.max_restarts:
            return False
        replaced = self.http.replace_dead_servers()
        self.restarts += len(replaced)
        if replaced:
            self.log(f"[popo-train] {why}; relaunched {', '.join(replaced)} "
                     f"({self.restarts}/{self.max_restarts} restarts), syncing its weights")
        return bool(replaced)

    # ---- collective operations ----
    def sync(self, module, version: str) -> None:
        """Send ``module``'s weights (a ServedModel or the live policy) to every live server as
        ``version``. Dead servers are relaunched first; a server that dies during the send is
        relaunched and the send repeated; with no restart left, RolloutServerError on every rank."""
        from popo_mega.train.served_model import send_weights

        rank, world = self.rt.rank, self.rt.world_size
        on_rank0(lambda: self._relaunch("before the weight sync"), rank, world)
        while True:
            failure = send_weights(module, self.arch, self.layout, self.http, version)
            failure = broadcast_object(failure) if world > 1 else failure
            if failure is None:
                break
            if not on_rank0(lambda: self._relaunch(f"weight sync failed ({failure})"), rank, world):
                raise RolloutServerError(f"weight sync {version} failed: {failure}")
        self.serving = (module, version)

    def on_rank0(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on rank 0 (it samples through ``http``), its result on every rank. When it fails
        with RolloutServerError and a dead server could be relaunched, the relaunched server gets the
        weights last served and ``fn`` runs again (it must leave its own state as it found it when it
        raises); otherwise its error reaches every rank."""
        def attempt():
            try:
                return ("done", fn())
            except RolloutServerError as exc:
                if not self._relaunch(f"{what} failed ({exc})"):
                    raise
                return ("retry", None)

        while True:
            outcome, result = on_rank0(attempt, self.rt.rank, self.rt.world_size)
            if outcome == "done":
                return result
            self.sync(*self.serving)

    @contextlib.contextmanager
    def released_for_step(self):
        """Colocated servers give their memory to the policy step and take it back after (collective;
        a no-op when the servers have devices of their own). A server started with
        ``--enable-memory-saver`` has no weights after it (SGLang's semantics): the loop's weight sync
        comes next. Rank 0 keeps the posts' seconds in ``memory_s``."""
        from popo_mega.rollout.sglang_launcher import released_during_step

        self.memory_s = {}
        with released_during_step(self.http, self.colocated, self.rt.world_size, self.memory_s, rank=self.rt.rank):
            yield

    def pop_memory_s(self) -> dict[str, float]:
        """Rank 0: the release_s / resume_s of the step since the last call ({} for a step that did not
        release: not colocated, or nothing to train)."""
        out, self.memory_s = self.memory_s, {}
        return out

    def close(self) -> None:
        """Rank 0 stops the servers it launched (through its HttpEngine); every other node's process
        stops the ones it started."""
        from popo_mega.rollout.sglang_launcher import stop_servers

        if self.http is not None:
            self.http.close()
        elif self.servers is not None:
            stop_servers(self.servers.local)
