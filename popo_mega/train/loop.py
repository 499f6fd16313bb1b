"""The RL loop (docs/architecture.md): rollout -> reward -> select -> target pass -> policy step ->
EMA update -> weight sync -> log / eval / checkpoint, each a named call on a small object:

    RunSetup         (run_setup.py)       tokenizer, prompt stream, held-out set, checkpoints, metrics log
    ResilientEngine  (rollout/resilient_engine.py)  the servers; relaunch + re-sync inside; collective
    RolloutWorker    (rollout_worker.py)  rank 0: rollout -> reward -> select, one RolloutBatch
    RolloutPipeline  (rollout_pipeline.py)  rank 0: the batches, up to rollout.max_staleness steps ahead
    PolicyTrainer    (step.py)            reference / target pass, policy step, EMA update, served EMA
    Evaluation       (evaluation.py)      held-out and benchmark evaluation of eval.model's weights

Rank 0 owns the engine's client, the rewards and the prompt cursor; it broadcasts each step's batch,
and every rank takes its data-parallel share (a rank with an empty share joins the step with an empty
micro-batch; the step is skipped only when the whole batch has nothing to train on). A failure of rank
0's work reaches every rank (train/rank0.py). The rollout side (``engine.on_rank0(worker.collect)``)
and the trainer side meet only in the RolloutBatch, which carries the weight versions it was sampled
with, and in ``engine.sync(trainer.served)``, which reads the served EMA copy, never the live policy;
so with ``rollout.max_staleness: k`` a producer thread samples the next k batches while a step trains.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

from popo_mega.config import Config
from popo_mega.train.rank0 import on_rank0

__all__ = ["RunResult", "run", "sync_engine_weights"]


@dataclass
class RunResult:
    initial_accuracy: float | None
    final_accuracy: float | None
    steps: int
    run_dir: str
    report_png: str | None


def sync_engine_weights(trainer, engine, use_ema: bool, version: str) -> str | None:
    """One weight sync of what the trainer serves (the served EMA copy with ``use_ema``), without the
    relaunch the run's ResilientEngine adds: ``served_model.send_weights`` (rank 0 sends to ``engine``).
    For callers that drive a bare HttpEngine (benchmarks/gpu/train_step.py)."""
    from popo_mega.train.served_model import send_weights

    return send_weights(trainer.weights_to_serve(use_ema), trainer.arch, trainer.layout,
                        engine if trainer.rt.rank == 0 else None, version)


def run(cfg: Config, log=print) -> RunResult:
    from popo_mega import runtime as rt_mod
    from popo_mega.model.loader import build_from_hf
    from popo_mega.rollout.resilient_engine import ResilientEngine
    from popo_mega.train.batch import shard_for_data_parallel
    from popo_mega.train.evaluation import Evaluation
    from popo_mega.train.rollout_pipeline import RolloutPipeline
    from popo_mega.train.rollout_worker import RolloutWorker
    from popo_mega.train.run_setup import Interrupt, RunSetup, start_runtime
    from popo_mega.train.step import PolicyTrainer

    rt = start_runtime(cfg)
    setup = RunSetup(cfg, rt, log)  # tokenizer, prompt stream, held-out set, checkpoints
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt, sequence_parallel=cfg.parallel.sequence_parallel))
    resumed = setup.resume(trainer)
    served = trainer.weights_to_serve(ema=cfg.rollout.weights == "ema")  # the served EMA copy (or the policy)
    interrupt, engine, worker, pipeline, evaluation, final_acc = Interrupt(), None, None, None, None, None
    try:
        engine = ResilientEngine.launch(cfg, rt, trainer.arch, trainer.layout, setup.run_dir, log,
                                        serving=served, version=f"step{trainer.step}")
        worker = RolloutWorker(cfg, setup, trainer.objective, engine)
        pipeline = RolloutPipeline(worker, engine, k=cfg.rollout.max_staleness, steps=cfg.train.steps, interrupt=interrupt)
        evaluation = Evaluation(cfg, setup, engine, trainer)
        on_rank0(lambda: (worker.start(), evaluation.start(worker.verifier, fresh_run=resumed is None),
                          setup.start_metrics(trainer)), rt.rank, rt.world_size)
        if resumed is not None:  # the servers started from model.hf_path: give them the resumed weights
            engine.sync(served, f"step{trainer.step}")
        step = trainer.step
        while step < cfg.train.steps:
            batch = engine.on_rank0(lambda: pipeline.take(step), "rollout")  # rank 0: rollout -> reward -> select
            if batch.interrupted:  # SIGTERM/SIGINT: keep what was learnt, then exit
                if rt.rank == 0:
                    log(f"[popo-train] interrupted at step {step}: writing a checkpoint before exit")
                setup.checkpoint(trainer, cursor=pipeline.cursor(step))  # this batch is sampled again
                break
            prev, updates, t_train = step, min(cfg.train.updates_per_rollout, cfg.train.steps - step), time.time()
            if not trainer.objective.trainable(batch.samples):  # the whole batch (POPO: no positive), every rank
                stats = trainer.skip(updates)
            else:
                with engine.released_for_step():  # colocated servers give the policy step their memory
                    share = trainer.batch(shard_for_data_parallel(batch.samples, rt.dp, rt.dp_rank))
                    trainer.reference_pass(share)  # GRPO's KL: the frozen reference, once per batch
                    for update in range(updates):  # train.updates_per_rollout, all on the sampler's log-probs
                        if update:
                            setup.log(trainer.step, batch.metrics, stats)
                        trainer.target_pass(share)  # POPO: the EMA's features and log-probs (Eq. P3)
                        stats = trainer.policy_step(share)  # forward/backward, optimizer, LR schedule
                        trainer.update_ema(stats)  # Eq. P6 (the served view reads it at the sync)
            step, train_s = trainer.step, time.time() - t_train
            with pipeline.quiet(evaluation.due(prev, step)):  # no rollout in flight while evaluations swap weights
                evaluated = evaluation.after_batch(prev, step)  # an EMA-serving run's policy (synced in first)
                t_sync = time.time()
                engine.sync(served, f"step{step}")  # the served weights; evaluation.metrics then evaluates them
                pipeline.served(step)  # rollout.max_staleness: the rollouts of step + k may start
                setup.log(step, batch.metrics, stats, lambda: {"sync_s": time.time() - t_sync, "train_s": train_s,
                                                               "server_restarts": float(engine.restarts),
                                                               **engine.pop_memory_s(),  # colocated: release/resume
                                                               **evaluation.metrics(evaluated, step)})
            if setup.save_due(prev, step):
                setup.checkpoint(trainer, cursor=pipeline.cursor(step))  # before the batches in flight
        pipeline.close(timeout_s=None)  # after an interrupt: its batch in flight, before evaluating
        final_acc = evaluation.final(step)
    finally:
        interrupt.restore()
        with contextlib.ExitStack() as closing:  # each closes even if one before it fails; last in, first run
            closing.callback(rt_mod.shutdown)
            for part in (engine, evaluation, worker, pipeline, setup):  # servers; benchmarks; grader; producer; log
                if part is not None:
                    closing.callback(part.close)
    report_png = None
    if rt.rank == 0:
        from popo_mega.train.report import write_report

        report_png = write_report([setup.run_dir], os.path.join(setup.run_dir, "report.png"))
    initial = evaluation.initial_accuracy if evaluation is not None else None
    return RunResult(initial, final_acc, step, setup.run_dir, report_png)
