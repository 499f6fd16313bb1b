"""What a popo-train run sets up around the algorithm: the runtime, the tokenizer, the prompt stream and
held-out set, checkpoints (resume, save, the SIGTERM stop) and the metrics log.

Every rank builds a ``RunSetup`` (the checkpoint is collective); rank 0 owns the prompt cursor and the
metrics logger (``start_metrics``, ``log``), and its cursor is what every rank's checkpoint records.
"""

from __future__ import annotations

import os
import signal

from popo_mega.config import Config
from popo_mega.train.rank0 import broadcast_object, on_rank0

__all__ = ["start_runtime", "RunSetup", "Interrupt", "crossed", "canonical_metrics"]


def start_runtime(cfg: Config):
    """The distributed runtime of ``parallel.*``, after checking the layout against the launched world."""
    from popo_mega import runtime as rt_mod
    from popo_mega.config import check_layout

    check_layout(cfg, world_size=rt_mod.launched_world_size())
    return rt_mod.initialize(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.train.seed,
                             expert_parallel=cfg.parallel.expert)


def crossed(prev: int, step: int, interval: int) -> bool:
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


class Interrupt:
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


class RunSetup:
    """The run's data, checkpoints and metrics log (see the module docstring).

    Attributes: ``run_dir``, ``tokenizer``, ``stop_ids`` (the tokenizer's EOS), ``stream`` (the
    training prompts, shuffled per epoch), ``heldout`` (the synthetic task's held-out prompts, else
    empty), ``skipped`` (bad records left out), ``encoded`` (over-long prompts counted).
    """

    def __init__(self, cfg: Config, rt, log=print):
        from transformers import AutoTokenizer

        from popo_mega.train.prompts import PromptStream, encode, load_train_examples, synthetic_task

        self.cfg, self.rt, self.log_line = cfg, rt, log
        self.run_dir = cfg.train.output_dir
        if rt.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
        self.stop_ids = tuple(i for i in {self.tokenizer.eos_token_id} if i is not None)
        examples, self.skipped = load_train_examples(cfg.data)
        self.encoded = encode(examples, cfg.data, self.tokenizer)  # over-long prompts left out and counted (issue 11)
        self.stream = PromptStream(self.encoded.prompts, seed=cfg.data.shuffle_seed)
        self.synthetic = cfg.data.train == ("synthetic",)
        self.heldout = (encode(synthetic_task(cfg.data).examples("heldout"), cfg.data, self.tokenizer).prompts
                        if self.synthetic else [])
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.metrics = None

    # ---- checkpoints ----
    def resume(self, trainer) -> dict | None:
        """Load the newest complete checkpoint under the run's directory into ``trainer`` and the
        prompt cursor (None: a fresh run). The served EMA view reads the loaded EMA at the next sync."""
        from popo_mega.train.checkpoint import load_checkpoint

        resumed = load_checkpoint(trainer, self.ckpt_root)
        if resumed is not None:
            self.stream.load_state_dict(resumed["extra"]["data"])
            if self.rt.rank == 0:
                self.log_line(f"[popo-train] resumed from {resumed['path']} at step {resumed['step']}")
        return resumed

    def save_due(self, prev: int, step: int) -> bool:
        """train.save_interval crossed by the batch that moved the run from ``prev`` to ``step``, or the last step."""
        interval = self.cfg.train.save_interval
        return bool(interval) and (crossed(prev, step, interval) or step == self.cfg.train.steps)

    def checkpoint(self, trainer, cursor: dict) -> None:
        """Save the trainer and rank 0's prompt cursor (collective). ``cursor``: rank 0's cursor before
        the first batch not trained (``RolloutPipeline.cursor``; the stream itself may be ahead)."""
        from popo_mega.train.checkpoint import save_checkpoint

        if self.rt.world_size > 1:
            cursor = broadcast_object(cursor)  # rank 0 owns the cursor
        path = save_checkpoint(trainer, self.ckpt_root, extra={"data": cursor}, keep_last=self.cfg.train.keep_last)
        if self.rt.rank == 0:
            self.log_line(f"[popo-train] checkpoint: {path}")

    # ---- metrics (rank 0) ----
    def start_metrics(self, trainer) -> None:
        """Rank 0: the metrics logger (resuming at the trainer's next step) and the run's first line."""
        from popo_mega.train.metrics import MetricsLogger
        from popo_mega.train.prompts import describe_too_long, too_long_metrics

        cfg, rt = self.cfg, self.rt
        self.metrics = MetricsLogger(self.run_dir, total_steps=cfg.train.steps, tensorboard=cfg.train.tensorboard,
                                     resume_step=trainer.step + 1, console_interval=cfg.train.log_interval,
                                     startup_metrics={"bad_records_skipped": float(self.skipped),
                                                      **too_long_metrics(self.encoded)})
        self.log_line(f"[popo-train] {cfg.algorithm.name} on {cfg.model.hf_path}: tp={rt.tp} pp={rt.pp} dp={rt.dp}, "
                      f"{len(self.stream.prompts)} training prompts ({self.skipped} bad records skipped, "
                      f"{describe_too_long(self.encoded, cfg.data.max_prompt_tokens)}), "
                      f"{cfg.data.prompts_per_step} prompts x {cfg.rollout.group_size} rollouts per step")

    def log(self, step: int, batch_metrics: dict, step_stats: dict, extra=None) -> None:
        """One metrics record (collective: rank 0 writes it, a failure reaches every rank). The rollout
        batch's own metrics go on the first record of the batch: ``batch_metrics`` is emptied.
        ``extra``: more metrics, or a function giving them that rank 0 calls (its work, its failure)."""
        def write():
            more = extra() if callable(extra) else (extra or {})
            m = {**batch_metrics, **canonical_metrics(step_stats), **more}
            self.metrics.log(step, m, rollouts=int(batch_metrics.get("rollouts", 0)),
                             tokens=int(step_stats.get("tokens_fed", 0)))

        on_rank0(write, self.rt.rank, self.rt.world_size)
        batch_metrics.clear()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
