"""Rank 0's rollout batches, sampled up to ``rollout.max_staleness`` = k steps ahead of the policy.

    pipeline = RolloutPipeline(worker, engine, k=cfg.rollout.max_staleness, steps=cfg.train.steps)
    batch = engine.on_rank0(lambda: pipeline.take(step), "rollout")   # the batch that trains step + 1
    with pipeline.quiet(evaluation.due(prev, step)):                  # no rollout in flight inside
        ... evaluation, engine.sync(served, f"step{step}") ...
        pipeline.served(step)                                         # the producer may go on
    setup.checkpoint(trainer, cursor=pipeline.cursor(step))           # the cursor before batch ``step``

k = 0 is the synchronous loop: ``take(step)`` runs ``worker.collect(step)`` in the calling thread.
k >= 1: a producer thread runs ``worker.collect(s)`` for s = first, first + 1, ... in order, and
starts step s's rollouts once the engine serves the weights of step s - k or later (``served``), so
the rollouts of steps t+1 .. t+k are sampled while step t trains and no batch is more than k
versions behind the policy it trains (partial rollouts aside: a sync during generation pauses the
servers, ``rollout.pause_mode``, and the rows in flight finish on the newer weights, so their tokens
are fresher, never staler). The loss reads the sampler's log-probs as the behaviour policy (the
clipped token-level ratio of POPO, GRPO and A3PO), so a stale batch is corrected for, up to the clip.

What each batch adds to its metrics: ``staleness`` (the policy's step minus the oldest weight version
any of its tokens was sampled with), ``staleness_mean`` (over its rollouts, by their first token),
``partial_rollouts`` (the fraction sampled under more than one version), ``rollout_wait_s`` (how long
the trainer waited for it: the idle phase), ``prompt_cursor`` (prompts drawn before it).

Failures: the producer stops at the first error and ``take`` raises it for the step that failed
(the batches before it are kept); ``collect`` leaves the prompt cursor where that step began, so the
next ``take`` (after the ResilientEngine relaunched a server and re-synced) starts the producer again
at that step, with the same prompts and seeds. A server failure while the engine relaunched a server
for another reason (a sync that met the dead server first) is retried the same way without raising.

Resume: a checkpoint saves the cursor of the first batch not trained (``cursor``), not the stream's
position (the producer is ahead of it), so a resumed run samples the batches that were in flight
again from the same prompts and seeds (``sample_seed(train.seed, step)``); from newer weights, since
it resumes at the trained step.

The producer shares the engine's client, the grader and the prompt stream with nothing while it runs:
``quiet`` holds it out of the evaluations, which swap the served weights (an EMA run's policy) and
use the grader; the main thread touches the stream only through ``cursor``.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time

__all__ = ["RolloutPipeline", "staleness_metrics", "version_step"]

_STEP = re.compile(r"step(\d+)$")


def version_step(version: str | None) -> int | None:
    """The step of a weight version the loop syncs ("step12" -> 12); None for any other version (the
    model's own "default" before a fresh run's first sync, an evaluation's "step12-policy")."""
    m = _STEP.search(version or "")
    return int(m.group(1)) if m else None


def staleness_metrics(versions: list[list[str]], step: int) -> dict[str, float]:
    """Staleness of a batch that trains step ``step`` (-> step + 1). ``versions``: per rollout, the weight
    versions its tokens were sampled with, in order (``rollout.engine.versions_of``). Versions that are
    not a step's are left out; a batch with none gives {}."""
    firsts = [s for s in (version_step(v[0]) if v else None for v in versions) if s is not None]
    if not firsts:
        return {}
    return {"staleness": float(step - min(firsts)), "staleness_mean": sum(step - s for s in firsts) / len(firsts),
            "partial_rollouts": sum(len(set(v)) > 1 for v in versions) / len(versions)}


class RolloutPipeline:
    """See the module docstring. ``worker``: the RolloutWorker (its ``collect(step)``, its
    ``setup.stream``); ``engine``: the ResilientEngine (``restarts``); ``k``: rollout.max_staleness;
    ``steps``: train.steps (the producer stops before it). Every method but ``take`` may be called on
    every rank; only rank 0, which calls ``take``, has state."""

    def __init__(self, worker, engine, *, k: int, steps: int, interrupt=None):
        if k < 0:
            raise ValueError(f"RolloutPipeline: k (rollout.max_staleness) must be >= 0, got {k}")
        self.worker, self.engine, self.k, self.steps, self.interrupt = worker, engine, k, steps, interrupt
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._next: int | None = None        # the step the producer collects next
        self._served: int | None = None      # the newest step whose weights the engine serves
        self._ready: dict[int, object] = {}  # step -> RolloutBatch, collected, not taken
        self._cursors: dict[int, dict] = {}  # step -> the prompt cursor before its batch
        self._error: tuple[int, BaseException, int] | None = None  # (step, error, engine restarts at its start)
        self._busy = False                   # a collect is running
        self._held = 0                       # quiet() blocks new collects
        self._stop = False

    # ---- the trainer's side ----
    def take(self, step: int):
        """Rank 0: the RolloutBatch that trains step ``step`` (blocks until it is sampled)."""
        t0 = time.time()
        stream = self.worker.setup.stream
        if self.k == 0:
            cursor = stream.state_dict()
            self._cursors = {step: cursor}
            batch = self.worker.collect(step)
        else:
            batch = self._take_async(step)
            with self._cond:  # keep this batch's cursor: an interrupt checkpoints before it
                self._cursors = {s: c for s, c in self._cursors.items() if s >= step}
                cursor = self._cursors[step]
        batch.metrics.update(staleness_metrics(batch.versions, step), rollout_wait_s=time.time() - t0,
                             prompt_cursor=float(cursor["epoch"] * cursor["size"] + cursor["position"]))
        batch.interrupted = bool(self.interrupt is not None and self.interrupt.requested)  # sampled before or after it
        return batch

    def _take_async(self, step: int):
        with self._cond:
            if self._served is None:
                self._served = step  # the engine serves the trained step's weights (fresh or resumed)
            while step not in self._ready:
                if self._error is not None:  # the producer failed at ``step`` (it collects in order)
                    failed, error, restarts = self._error
                    self._error = None
                    self._thread.join()
                    if not (failed == step and self.engine.restarts != restarts):
                        raise error  # the ResilientEngine relaunches a server, re-syncs, and takes again
                    # else a relaunch came while it sampled (by a sync that met the dead server): again
                if not self._alive():
                    self._start(step)
                self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            return self._ready.pop(step)

    def served(self, step: int) -> None:
        """The engine serves the weights of step ``step`` now: the producer may sample step ``step + k``."""
        with self._cond:
            self._served = step
            self._cond.notify_all()

    @contextlib.contextmanager
    def quiet(self, needed: bool = True):
        """No rollout in flight inside (waits for the one running): for evaluations, which swap the
        served weights and use the grader. ``needed`` False: a no-op (the steps without evaluation)."""
        if not needed or self.k == 0:
            yield
            return
        with self._cond:
            self._held += 1
            self._cond.wait_for(lambda: not self._busy)
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def cursor(self, step: int) -> dict:
        """Rank 0: the prompt cursor before the batch of step ``step`` (the first not trained), for a
        checkpoint; the stream's own position is ahead of it while batches are in flight."""
        with self._cond:
            if step in self._cursors:
                return dict(self._cursors[step])
            self._cond.wait_for(lambda: not self._busy or step in self._cursors)
            return dict(self._cursors.get(step) or self.worker.setup.stream.state_dict())

    def close(self, timeout_s: float | None = 5.0) -> None:
        """Stop the producer after its current collect. The loop's own call waits for it
        (``timeout_s=None``: a run interrupted with a batch in flight evaluates next, and evaluations
        must not overlap a collect; the engine's request timeout bounds it). On an error path the
        default gives it 5 s: it is a daemon thread, and a collect still running ends with the
        servers, which the engine stops next."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    # ---- the producer ----
    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self, step: int) -> None:
        self._next = step
        self._thread = threading.Thread(target=self._produce, name="popo-rollouts", daemon=True)
        self._thread.start()

    def _may_collect(self, s: int) -> bool:
        return self._stop or (self._held == 0 and self._served is not None and self._served >= s - self.k)

    def _produce(self) -> None:
        stream = self.worker.setup.stream
        while True:
            with self._cond:
                s = self._next
                if s >= self.steps:
                    return
                self._cond.wait_for(lambda: self._may_collect(s))
                if self._stop:
                    return
                self._busy = True
                self._cursors[s] = stream.state_dict()
                restarts = self.engine.restarts
            try:
                batch = self.worker.collect(s)
            except BaseException as exc:  # noqa: BLE001 - handed to the trainer's thread by take()
                with self._cond:
                    self._busy = False
                    self._error = (s, exc, restarts)
                    self._cond.notify_all()
                return
            with self._cond:
                self._busy = False
                self._ready[s] = batch
                self._next = s + 1
                self._cond.notify_all()
