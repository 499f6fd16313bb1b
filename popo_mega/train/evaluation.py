"""Held-out and benchmark evaluation during a run: which weights are evaluated, and when.

``eval.model`` names the weights: ``policy`` (the online weights) or ``served`` (what the engine
serves: the EMA under ``rollout.weights: ema``). Evaluating the policy of an EMA-serving run syncs the
online weights into the engine first (collective), and the loop's weight sync after it puts the EMA
back; the held-out accuracy of the served EMA is then measured as well (``served_accuracy``).
"""

from __future__ import annotations

from popo_mega.config import Config
from popo_mega.rollout.http_engine import RolloutServerError
from popo_mega.train.benchmark_eval import benchmark_eval_due
from popo_mega.train.rank0 import on_rank0
from popo_mega.train.rollout_worker import greedy_accuracy
from popo_mega.train.run_setup import crossed

__all__ = ["Evaluation"]


class Evaluation:
    """Every rank builds it; ``start`` runs on rank 0. ``engine``: the run's ResilientEngine."""

    def __init__(self, cfg: Config, setup, engine, trainer):
        self.cfg, self.setup, self.engine, self.trainer = cfg, setup, engine, trainer
        serves_ema = cfg.rollout.weights == "ema" and trainer.served is not None
        self.policy_synced_in = serves_ema and cfg.eval.model == "policy"  # eval needs the online weights synced in
        self.served_is_ema = serves_ema and not self.policy_synced_in
        self.bench = None  # eval.benchmarks (rank 0)
        self.initial_accuracy = None

    def start(self, verifier, fresh_run: bool) -> None:
        """Rank 0: load the benchmarks; on a fresh run, the held-out accuracy before RL."""
        cfg, log = self.cfg, self.setup.log_line
        if cfg.eval.benchmarks:
            from popo_mega.train.benchmark_eval import BenchmarkEval

            self.bench = BenchmarkEval(cfg.eval, cfg.data, self.setup.tokenizer, seed=cfg.train.seed,
                                       verifier=verifier, log=log)
            log(f"[popo-train] benchmark evaluation: {self.bench.describe()}")
        if self.setup.heldout and fresh_run:
            self.initial_accuracy = self._greedy()
            log(f"[popo-train] held-out accuracy before RL: {100 * self.initial_accuracy:.1f}% "
                f"({len(self.setup.heldout)} problems)")

    def _greedy(self) -> float:
        from popo_mega.rewards import synthetic

        s = self.setup
        return greedy_accuracy(self.engine.http, s.heldout, synthetic.score, self.cfg.rollout.max_new_tokens,
                               s.stop_ids, s.tokenizer)

    def heldout_accuracy(self, step: int) -> float | None:
        """Rank 0: greedy held-out accuracy of what the engine serves (None if a server died: the
        next sync relaunches it)."""
        try:
            return self._greedy()
        except RolloutServerError as exc:
            self.setup.log_line(f"[popo-train] step {step}: held-out evaluation failed ({exc})")
            return None

    def _sync_policy(self, step: int) -> None:
        self.engine.sync(self.trainer.model, f"step{step}-policy")

    def _due(self, prev: int, step: int) -> dict:
        """The evaluations the batch that moved the run from ``prev`` to ``step`` has due."""
        return {"heldout_due": bool(self.setup.heldout and crossed(prev, step, self.cfg.eval.interval)),
                "bench_due": any(benchmark_eval_due(self.cfg.eval, k, self.cfg.train.steps)
                                 for k in range(prev + 1, step + 1))}

    def due(self, prev: int, step: int) -> bool:
        """Whether that batch has any evaluation due (the loop keeps rollouts out of it)."""
        return any(self._due(prev, step).values())

    def after_batch(self, prev: int, step: int) -> dict:
        """The evaluations due after the batch that moved the run from step ``prev`` to ``step``
        (eval.interval crossed; benchmarks per ``benchmark_eval_due``), BEFORE the loop's weight sync:
        only those of the online policy of an EMA-serving run, which is synced in first (collective).
        The others evaluate what the engine serves, so they wait for the sync (``metrics``): before,
        a run serving its policy (GRPO, A3PO) or evaluating the served EMA logged at step N the
        weights of the sync before, and a colocated server whose weights were freed for the step
        had none. Returns the due evaluations and rank 0's metrics ({} elsewhere)."""
        rt = self.trainer.rt
        out = self._due(prev, step)
        if not self.policy_synced_in or not (out["heldout_due"] or out["bench_due"]):
            return out
        self._sync_policy(step)
        # on_rank0: an evaluation error (grader, benchmark) reaches every rank, which would otherwise
        # wait for rank 0 in the loop's weight sync
        out.update(on_rank0(lambda: self._evaluate(out, step, "online policy"), rt.rank, rt.world_size) or {})
        return out

    def _evaluate(self, due: dict, step: int, what: str) -> dict:
        """Rank 0: the due held-out accuracy and benchmarks of what the engine serves now."""
        out = {}
        if due["heldout_due"]:
            out["heldout_accuracy"] = self.heldout_accuracy(step)
        if due["bench_due"]:
            out["bench"] = self.bench.run(self.engine.http, step, what)
        return out

    def metrics(self, evaluated: dict, step: int) -> dict:
        """Rank 0, after the loop's weight sync: the metrics to log. The evaluations ``after_batch``
        left for now (what the engine serves: the served EMA, or the policy of a run that serves
        it), or ``after_batch``'s of the policy with the served EMA's held-out accuracy beside it."""
        if not self.policy_synced_in:
            evaluated = {**evaluated, **self._evaluate(evaluated, step,
                                                       "served EMA" if self.served_is_ema else "online policy")}
        out = {}
        accuracy = evaluated.get("heldout_accuracy")
        if accuracy is not None:
            out["heldout_accuracy"] = accuracy
            served = self.heldout_accuracy(step) if self.policy_synced_in else None
            if served is not None:
                out["heldout_accuracy_served"] = served
        out.update(evaluated.get("bench", {}))
        return out

    def final(self, step: int) -> float | None:
        """At the end: the served EMA's held-out accuracy (logged), then eval.model's (returned on every
        rank). Collective; rank 0's evaluations go through ``on_rank0``, so an error there reaches
        every rank."""
        if not self.setup.heldout:
            return None
        rt = self.trainer.rt
        if self.policy_synced_in:  # the engine serves the EMA now
            served = on_rank0(lambda: self.heldout_accuracy(step), rt.rank, rt.world_size)
            if served is not None and rt.rank == 0:
                self.setup.log_line(f"[popo-train] held-out accuracy of the served EMA: {100 * served:.1f}%")
            self._sync_policy(step)
        return on_rank0(lambda: self.heldout_accuracy(step), rt.rank, rt.world_size)

    def close(self) -> None:
        if self.bench is not None:
            self.bench.close()
