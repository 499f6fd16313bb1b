"""The RL loop (docs/architecture.md): rollout -> reward -> select -> target pass + policy step
(inside PolicyTrainer.train_step) -> EMA update -> weight sync -> log / eval / checkpoint.

Rank 0 owns the rollout engine, the rewards and the prompt cursor; it broadcasts the selected
samples, and every rank takes its data-parallel share. All ranks run the policy step and the
weight gather (collective over TP/PP); rank 0 sends the weights to the engine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

import torch

from popo_mega.config import Config
from popo_mega.rollout.engine import SamplingParams, sample_seed
from popo_mega.rollout.http_engine import RolloutServerError
from popo_mega.train.benchmark_eval import benchmark_eval_due
from popo_mega.train.rank0 import broadcast_object, on_rank0
from popo_mega.train.refill import stream_rollouts


@dataclass
class RunResult:
    initial_accuracy: float | None
    final_accuracy: float | None
    steps: int
    run_dir: str
    report_png: str | None


def sync_engine_weights(trainer, engine, use_ema: bool, version: str) -> str | None:
    """Stream the served model's HF-named tensors into the engine. Collective over all ranks.

    TP shards are gathered by ``iter_hf_tensors`` as they are sent; later pipeline stages stream
    their tensors to PP rank 0 (``funnel_pipeline_stages``); global rank 0 sends them to the engine
    in buckets, every other rank drains its iterator in step. With ``use_ema`` the EMA weights are
    swapped into the policy model for the duration (Eq. P6: the engine serves the target).

    Returns None, or on rank 0 the error of a failed send (a server died): rank 0 then drains the
    rest of its iterator, so that the gathers of the other ranks still complete, and the caller
    decides (see ``run``: relaunch and sync again, or stop).
    """
    from megatron.core import parallel_state as ps

    from popo_mega.model.hf import iter_hf_tensors
    from popo_mega.rollout.pipeline_funnel import funnel_pipeline_stages
    from popo_mega.rollout.weight_sync import WeightSyncError

    failure = None
    ema_ctx = trainer.ema.swapped_into(trainer.model) if (use_ema and trainer.ema is not None) else contextlib.nullcontext()
    with torch.no_grad(), ema_ctx:
        tensors = funnel_pipeline_stages(
            iter_hf_tensors(trainer.model, trainer.arch, trainer.layout, ps.get_tensor_model_parallel_group()),
            pp_group=ps.get_pipeline_model_parallel_group(), tp_rank=ps.get_tensor_model_parallel_rank())
        if trainer.rt.rank == 0:
            try:
                engine.sync_weights(tensors, version=version)
            except (RolloutServerError, WeightSyncError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
        for _ in tensors:  # every other rank; rank 0 after a failure
            pass
    return failure


def train_on_rollouts(trainer, share: list, updates: int, after_update=None) -> dict:
    """``updates`` optimizer steps (train.updates_per_rollout) on one rollout batch: ``trainer.
    train_step(share)`` that many times, all on the same samples (docs/algorithms.md section 3,
    "Several updates per rollout batch").

    The samples' ``old_logp`` are the sampler's, so the behaviour policy of every update's
    importance ratio is the policy that sampled (PPO's epochs over one batch), not the policy
    after the previous update. Each update is a full trainer step: the step counter, the LR
    schedule and (POPO) the EMA advance once per update, and its target pass sees the EMA the
    previous update moved; a GRPO reference pass is re-run (same log-probs). ``after_update(stats)``
    runs after every update but the last. Returns the last update's stats.
    """
    if updates < 1:
        raise ValueError(f"train_on_rollouts: updates must be >= 1 (train.updates_per_rollout), got {updates}")
    for u in range(updates):
        stats = trainer.train_step(share)
        if after_update is not None and u < updates - 1:
            after_update(stats)
    return stats


def _crossed(prev: int, step: int, interval: int) -> bool:
    """Whether a multiple of ``interval`` lies in (prev, step] (never for interval 0): the loop
    moves train.updates_per_rollout steps at a time, so an eval or save interval can fall inside a
    batch's updates; it is honoured at the batch's end. With one update: step % interval == 0."""
    return bool(interval) and step // interval > prev // interval


def canonical_metrics(step_stats: dict) -> dict:
    """The trainer's loss parts under the canonical metric names of popo_mega.train.metrics.

    L_sim = -(weighted mean cosine) and L_ent = -(mean entropy) (Eq. P3, P4), so the logged
    similarity and entropy are their negatives; the clip fraction is over the tokens the policy
    term saw (positive tokens for POPO).
    """
    out = {k: v for k, v in step_stats.items() if k != "step"}  # the logger records the step itself
    if "sim" in out:
        out["similarity"] = -out.pop("sim")
    if "ent" in out:
        out["entropy"] = -out.pop("ent")
    if "kl" in out:
        out["kl_ref"] = out.pop("kl")  # GRPO k3 KL to the reference (not P7's KL to the EMA)
    tokens = out.get("positive_token_count", out.get("token_count"))
    if tokens and "clip_low_count" in out:
        out["clip_fraction"] = (out["clip_low_count"] + out["clip_high_count"]) / tokens
        out["mean_rho"] = out.get("rho_sum", 0.0) / tokens
    return out


def _score_and_select(cfg: Config, step: int, prompts, completions, tokenizer, verifier,
                      roll_more=None) -> tuple[list, dict]:
    """Rank 0: grade the rollouts (exact match on the synthetic task, math-verify otherwise) and
    select the training samples; returns (samples, stats). With DAPO dynamic sampling, ``roll_more``
    (``refill.stream_rollouts``) first tops the step up to data.prompts_per_step informative groups."""
    from popo_mega.rewards import synthetic
    from popo_mega.train.refill import Rollouts, refill
    from popo_mega.train.objectives import make_objective

    def grade(prompts, completions) -> Rollouts:
        texts = [tokenizer.decode(c.output_ids, skip_special_tokens=True) for g in completions for c in g]
        golds = [p.gold for p in prompts for _ in range(cfg.rollout.group_size)]
        grade_stats = {}
        if verifier is None:
            scores = synthetic.score_batch(texts, golds)
        else:
            scores, st = verifier.score_batch_with_stats(texts, golds)
            grade_stats = {"verifier_timeouts": float(st.timeouts), "no_answer": float(st.no_answer),
                           "verifier_errors": float(st.errors + st.crashes)}
        return Rollouts(prompts, completions, list(scores), grade_stats)

    graded, fill_stats = grade(prompts, completions), {}
    if roll_more is not None:
        graded, fill_stats = refill(graded, lambda rnd, k: grade(*roll_more(rnd, k)), target=cfg.data.prompts_per_step,
                                    group_size=cfg.rollout.group_size, max_rounds=cfg.algorithm.grpo.max_refill_rounds)
    sel = make_objective(cfg.algorithm).select(
        [p.ids for p in graded.prompts], graded.completions, torch.tensor(graded.rewards, dtype=torch.float32),
        cfg.rollout.group_size, uid_offset=step * cfg.data.prompts_per_step * cfg.rollout.group_size)
    return sel.samples, {**sel.stats, **graded.counts, **fill_stats}


def greedy_accuracy(engine, prompts, score_fn, max_new_tokens: int, stop_ids: tuple[int, ...], tokenizer) -> float:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids)
    outs = engine.generate([p.ids for p in prompts], sampling, n=1)
    texts = [tokenizer.decode(o[0].output_ids, skip_special_tokens=True) for o in outs]
    return sum(score_fn(t, p.gold) for t, p in zip(texts, prompts)) / len(prompts)


class _Interrupt:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for sig, h in self._old.items():
            signal.signal(sig, h)


def run(cfg: Config, log=print) -> RunResult:
    from transformers import AutoTokenizer

    from popo_mega import runtime as rt_mod
    from popo_mega.config import check_layout
    from popo_mega.model.loader import build_from_hf
    from popo_mega.rewards import synthetic
    from popo_mega.train.batch import shard_for_data_parallel
    from popo_mega.train.prompts import (PromptStream, describe_too_long, encode, load_train_examples,
                                         synthetic_task, too_long_metrics)
    from popo_mega.train.step import PolicyTrainer

    world = rt_mod.launched_world_size()
    check_layout(cfg, world_size=world)
    rt = rt_mod.initialize(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.train.seed,
                           expert_parallel=cfg.parallel.expert)
    run_dir = cfg.train.output_dir
    is_rank0 = rt.rank == 0
    if is_rank0:
        os.makedirs(run_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    stop_ids = tuple(i for i in {tokenizer.eos_token_id} if i is not None)
    synthetic_run = cfg.data.train == ("synthetic",)
    score_fn = synthetic.score  # held-out checks of the synthetic task
    verifier = None             # math-verify in a process pool with per-item deadlines (rank 0)

    loaded = build_from_hf(cfg.model, rt, sequence_parallel=cfg.parallel.sequence_parallel)
    trainer = PolicyTrainer(cfg, rt, loaded)
    examples, skipped = load_train_examples(cfg.data)
    encoded = encode(examples, cfg.data, tokenizer)  # over-long prompts left out and counted (issue 11)
    stream = PromptStream(encoded.prompts, seed=cfg.data.shuffle_seed)
    heldout = encode(synthetic_task(cfg.data).examples("heldout"), cfg.data, tokenizer).prompts if synthetic_run else []

    from popo_mega.train.checkpoint import load_checkpoint, save_checkpoint

    ckpt_root = os.path.join(run_dir, "checkpoints")
    resumed = load_checkpoint(trainer, ckpt_root)
    if resumed is not None:
        stream.load_state_dict(resumed["extra"]["data"])
        if is_rank0:
            log(f"[popo-train] resumed from {resumed['path']} at step {resumed['step']}")

    def checkpoint() -> None:
        cursor = stream.state_dict()
        if world > 1:
            cursor = broadcast_object(cursor)  # rank 0 owns the cursor
        path = save_checkpoint(trainer, ckpt_root, extra={"data": cursor}, keep_last=cfg.train.keep_last)
        if is_rank0:
            log(f"[popo-train] checkpoint: {path}")

    engine = metrics = run_servers = None
    bench_eval = None  # eval.benchmarks on rank 0 (popo_mega/train/benchmark_eval.py)
    interrupt = _Interrupt()
    initial_acc = final_acc = None
    report_png = None
    try:
        from popo_mega.rollout.sglang_launcher import released_during_step, start_run_servers

        run_servers = start_run_servers(cfg, rt, log_dir=run_dir)  # collective: each node starts its servers

        def start_rank0() -> None:
            """Rank 0: the engine on the servers, the grader, benchmark eval, metrics, the first held-out check."""
            nonlocal engine, verifier, bench_eval, metrics, initial_acc
            from popo_mega.rollout.http_engine import HttpEngine
            from popo_mega.rollout.placement import sync_methods
            from popo_mega.train.metrics import MetricsLogger

            r = cfg.rollout
            methods = sync_methods(r.sync, cfg.placement.mode == "colocated", run_servers.nodes, where=cfg.source)
            engine = HttpEngine(run_servers.urls, servers=run_servers.local,
                                tensor_urls=[u for u, m in zip(run_servers.urls, methods) if m == "tensor"],
                                master_address=r.master_address or run_servers.master_address,
                                api_key=r.api_key,
                                request_timeout_s=r.request_timeout_s, failover=r.on_server_failure == "retry",
                                max_retries=r.retries, sync_method="disk" if r.sync == "disk" else "auto",
                                disk_dir=os.path.join(run_dir, "weights_sync"), bucket_bytes=r.bucket_mb << 20,
                                sync_backend="nccl" if rt.device.type == "cuda" else "gloo", verify_probes=r.verify_sync)
            if not synthetic_run:
                from popo_mega.rewards.math import MathVerifier

                verifier = MathVerifier(num_workers=2)
            if cfg.eval.benchmarks:
                from popo_mega.train.benchmark_eval import BenchmarkEval

                bench_eval = BenchmarkEval(cfg.eval, cfg.data, tokenizer, seed=cfg.train.seed, verifier=verifier, log=log)
                log(f"[popo-train] benchmark evaluation: {bench_eval.describe()}")
            metrics = MetricsLogger(run_dir, total_steps=cfg.train.steps, tensorboard=cfg.train.tensorboard,
                                    resume_step=trainer.step + 1, console_interval=cfg.train.log_interval,
                                    startup_metrics={"bad_records_skipped": float(skipped), **too_long_metrics(encoded)})
            log(f"[popo-train] {cfg.algorithm.name} on {cfg.model.hf_path}: tp={rt.tp} pp={rt.pp} dp={rt.dp}, "
                f"{len(stream.prompts)} training prompts ({skipped} bad records skipped, "
                f"{describe_too_long(encoded, cfg.data.max_prompt_tokens)}), "
                f"{cfg.data.prompts_per_step} prompts x {cfg.rollout.group_size} rollouts per step")
            if heldout and resumed is None:
                initial_acc = greedy_accuracy(engine, heldout, score_fn, cfg.rollout.max_new_tokens, stop_ids, tokenizer)
                log(f"[popo-train] held-out accuracy before RL: {100 * initial_acc:.1f}% ({len(heldout)} problems)")

        on_rank0(start_rank0, rt.rank, world)  # a failure here reaches every rank
        use_ema = cfg.rollout.weights == "ema"
        eval_policy = use_ema and cfg.eval.model == "policy" and trainer.ema is not None
        restarts = 0
        step = trainer.step

        def relaunch(why: str) -> bool:
            """Rank 0: relaunch dead servers this run started (at most rollout.max_server_restarts)."""
            nonlocal restarts
            if restarts >= cfg.rollout.max_server_restarts:
                return False
            replaced = engine.replace_dead_servers()
            restarts += len(replaced)
            if replaced:
                log(f"[popo-train] step {step + 1}: {why}; relaunched {', '.join(replaced)} "
                    f"({restarts}/{cfg.rollout.max_server_restarts} restarts), syncing its weights")
            return bool(replaced)

        def sync(ema_weights: bool, version: str) -> None:
            """Collective weight sync; a server that dies on the way is relaunched and synced again."""
            while True:
                failure = sync_engine_weights(trainer, engine, use_ema=ema_weights, version=version)
                failure = broadcast_object(failure) if world > 1 else failure
                if failure is None:
                    return
                if not on_rank0(lambda: relaunch(f"weight sync failed ({failure})"), rt.rank, world):
                    raise RolloutServerError(f"weight sync {version} failed: {failure}")

        def heldout_accuracy() -> float | None:
            """Rank 0: greedy held-out accuracy of what the engine serves (None if a server died:
            the next sync relaunches it)."""
            try:
                return greedy_accuracy(engine, heldout, score_fn, cfg.rollout.max_new_tokens, stop_ids, tokenizer)
            except RolloutServerError as exc:
                log(f"[popo-train] step {step}: held-out evaluation failed ({exc})")
                return None

        def evaluate(version: str) -> float | None:
            """Held-out greedy accuracy (collective: with eval.model policy and an EMA-serving engine,
            every rank takes part in syncing the online weights in; the caller syncs the EMA back)."""
            if eval_policy:
                sync(False, f"{version}-policy")
            return heldout_accuracy() if is_rank0 else None

        def evaluate_benchmarks(version: str, policy_synced: bool) -> dict:
            """Rank 0: eval.benchmarks' metrics of the weights eval.model names (collective like
            ``evaluate``, whose sync of the online policy ``policy_synced`` says already happened)."""
            if eval_policy and not policy_synced:
                sync(False, f"{version}-policy")
            served_ema = use_ema and trainer.ema is not None and not eval_policy
            return bench_eval.run(engine, step, "served EMA" if served_ema else "online policy") if is_rank0 else {}

        if resumed is not None:  # the servers started from model.hf_path: give them the resumed weights
            sync(use_ema, f"step{trainer.step}")
        while step < cfg.train.steps:
            t0 = time.time()

            def roll_out():
                """Rank 0: this step's rollouts, graded and selected; None after a relaunch (retry)."""
                cursor = stream.state_dict()
                prompts = stream.next_batch(cfg.data.prompts_per_step)
                sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                          max_new_tokens=cfg.rollout.max_new_tokens, stop_token_ids=stop_ids,
                                          seed=sample_seed(cfg.train.seed, step))  # same rollouts after a resume
                try:
                    completions = engine.generate([p.ids for p in prompts], sampling, n=cfg.rollout.group_size)
                    return (*_score_and_select(cfg, step, prompts, completions, tokenizer, verifier, roll_more=(
                        stream_rollouts(stream, engine, sampling, cfg.rollout.group_size)
                        if trainer.objective.refills else None)), time.time() - t0, interrupt.requested)
                except RolloutServerError as exc:  # also from a refill round
                    stream.load_state_dict(cursor)  # the same prompts (and seeds) once a server is back
                    if not relaunch(f"rollout failed ({exc})"):
                        raise
                    return None

            payload = on_rank0(roll_out, rt.rank, world)  # a failure on rank 0 reaches every rank
            if payload is None:  # a relaunched server: give it this step's weights, then roll out again
                sync(use_ema, f"step{step}")
                continue
            samples, sel_stats, rollout_s, stop_now = payload
            if stop_now:  # SIGTERM/SIGINT: keep what was learnt, then exit
                if is_rank0:
                    log(f"[popo-train] interrupted at step {step}: writing a checkpoint before exit")
                checkpoint()
                break
            share = shard_for_data_parallel(samples, rt.dp, rt.dp_rank)
            # Nothing to train on in the whole batch (POPO: no positive) is decided on the broadcast
            # batch, the same on every rank; a DP rank whose own share is empty joins the step with an
            # empty micro-batch (PolicyTrainer.train_step) and the step is never dropped for the others.
            has_work = bool(trainer.objective.trainable(samples))
            # train.updates_per_rollout optimizer steps on this batch (train.steps counts optimizer steps)
            updates, prev = min(cfg.train.updates_per_rollout, cfg.train.steps - step), step
            batch_m = {**sel_stats, "rollout_s": rollout_s}  # the rollout batch's metrics: on its first record

            def log_update(stats):  # rank 0, updates 1..U-1 of the batch; the last is logged below
                metrics.log(int(stats["step"]), {**batch_m, **canonical_metrics(stats)},
                            rollouts=int(batch_m.get("rollouts", 0)), tokens=int(stats.get("tokens_fed", 0)))
                batch_m.clear()

            if not has_work:  # no rank has anything to train on: skip the update everywhere
                step_stats = {"skipped": 1.0, "tokens_fed": 0.0}
                step = trainer.step = trainer.step + updates
            else:
                with released_during_step(engine, cfg.placement.mode == "colocated", world):  # colocated servers
                    step_stats = train_on_rollouts(trainer, share, updates, log_update if is_rank0 else None)
                step = trainer.step
            accuracy = None
            heldout_due = bool(heldout and _crossed(prev, step, cfg.eval.interval))
            if heldout_due:
                accuracy = evaluate(f"step{step}")
            bench_m = evaluate_benchmarks(f"step{step}", policy_synced=heldout_due) if any(
                benchmark_eval_due(cfg.eval, k, cfg.train.steps) for k in range(prev + 1, step + 1)) else {}
            t_sync = time.time()
            on_rank0(lambda: relaunch("before the weight sync"), rt.rank, world)
            sync(use_ema, f"step{step}")

            def log_step() -> None:
                """Rank 0: the step's metrics (and the served EMA's held-out accuracy after an eval)."""
                m = {**batch_m, **canonical_metrics(step_stats),
                     "sync_s": time.time() - t_sync, "server_restarts": float(restarts)}
                if accuracy is not None:
                    m["heldout_accuracy"] = accuracy
                    served = heldout_accuracy() if eval_policy else None  # the EMA is back in the engine
                    if served is not None:
                        m["heldout_accuracy_served"] = served
                m.update(bench_m)
                metrics.log(step, m, rollouts=int(batch_m.get("rollouts", 0)), tokens=int(step_stats.get("tokens_fed", 0)))

            on_rank0(log_step, rt.rank, world)
            if cfg.train.save_interval and (_crossed(prev, step, cfg.train.save_interval) or step == cfg.train.steps):
                checkpoint()
        if heldout:
            served = heldout_accuracy() if (eval_policy and is_rank0) else None  # the engine serves the EMA now
            if served is not None:
                log(f"[popo-train] held-out accuracy of the served EMA: {100 * served:.1f}%")
            final_acc = evaluate(f"step{step}")
    finally:
        interrupt.restore()
        if is_rank0:
            if metrics is not None:
                metrics.close()
            if engine is not None:
                engine.close()
            if bench_eval is not None:
                bench_eval.close()
            if verifier is not None:
                verifier.close()
        elif run_servers is not None:  # servers this node started for rank 0
            from popo_mega.rollout.sglang_launcher import stop_servers

            stop_servers(run_servers.local)
        rt_mod.shutdown()
    if is_rank0:
        from popo_mega.train.report import write_report

        report_png = write_report([run_dir], os.path.join(run_dir, "report.png"))
    return RunResult(initial_acc, final_acc, step, run_dir, report_png)
