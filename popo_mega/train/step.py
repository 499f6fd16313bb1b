"""One policy update through megatron-core: target pass of the EMA model, then forward/backward,
optimizer step, LR schedule and EMA update (docs/algorithms.md, Eq. P1-P6; architecture.md's loop).

    trainer = PolicyTrainer(cfg, runtime, build_from_hf(cfg.model, runtime))
    batch = trainer.batch(samples)             # samples: this DP rank's RolloutSamples
    trainer.reference_pass(batch)              # GRPO's KL: the frozen reference, once per rollout batch
    trainer.target_pass(batch)                 # POPO: the EMA's features (Eq. P3)
    stats = trainer.policy_step(batch)         # forward/backward, optimizer, LR schedule
    trainer.update_ema(stats)                  # Eq. P6 (the served EMA view reads it at the next sync)
    stats = trainer.train_step(samples)        # the same four calls, one update

Pieces, all megatron-core's own: ``DistributedDataParallel`` (gradients reduced over DP), the
megatron optimizer (Adam, weight decay, gradient clipping, optionally the distributed optimizer),
``OptimizerParamScheduler`` (LR warm-up / cosine decay) and ``get_forward_backward_func`` (the
no-pipelining or 1F1B schedule over packed micro-batches). The loss is computed on the last
pipeline stage only.

Normalisers. Every loss normaliser (N+, sum of weights, entropy token count for POPO; response
token / rollout count for GRPO/A3PO) is GLOBAL: summed over this rank's micro-batches and
all-reduced over DP before the schedule runs. megatron divides the returned loss by the number of
micro-batches and DDP scales gradients by 1/dp, so the loss handed to the schedule is
``loss * num_microbatches * dp`` (docs/algorithms.md, "Megatron rescaling"), which makes the
summed gradient exactly the full-batch gradient.

POPO with ``entropy_on: positive``: negatives enter no term of the loss, so they are dropped
before packing and never run through the model (``stats["tokens_fed"]``); with ``entropy_on: all``
they are fed for the entropy term only.

The predictor h_phi (Eq. P3) lives on the last stage as a second megatron-DDP chunk in the same
optimizer (so clipping and the distributed optimizer cover it); its gradients are reduced over DP
by ``_finalize_grads``. Its initial weights depend only on ``train.seed`` (same on every layout).

Padded vocabulary. megatron pads the vocabulary (e.g. 251 -> 256 columns); those columns hold
weights too and would enter the softmax. ``logprob_entropy`` is given the real ``vocab_size`` and
skips them (gradient exactly 0). Masking them to ``finfo.min/2`` instead, as this module once did,
gave NaN entropies in the bf16 CUDA kernel when a shard had < 2,048 real columns (issue 10 #11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from popo_mega.algorithms.ema import EMA
from popo_mega.algorithms.predictor import Predictor
from popo_mega.algorithms.reference import FrozenReference
from popo_mega.train.served_model import ServedModel
from popo_mega.ops import masked_mean_pool
from popo_mega.config import Config
from popo_mega.ops.logprob_entropy import logprob_entropy
from popo_mega.train.batch import MicroBatch, RolloutSample, pack_micro_batches, token_multiple
from popo_mega.train.objectives import make_objective

__all__ = ["PolicyTrainer", "StepBatch"]


@dataclass
class StepBatch:
    """This DP rank's share of one rollout batch as the policy step takes it (``PolicyTrainer.batch``).

    samples:     the trainable rollouts (before the objective's per-step preparation)
    mbs:         their micro-batches, on the runtime's device; the passes fill ``extras``
    prepared_at: the step whose ``objective.prepare`` made ``mbs`` (A3PO re-prepares at a later step)
    """

    samples: list[RolloutSample]
    mbs: list[MicroBatch]
    prepared_at: int


def _micro_batches(batch: "StepBatch | list[MicroBatch]") -> list[MicroBatch]:
    return batch.mbs if isinstance(batch, StepBatch) else batch

def _cast_stray_params(model, dtype: torch.dtype) -> int:
    """Cast floating parameters that are not in ``dtype`` to it (returns how many). megatron-core
    0.16.1's torch-norm fallback creates RMSNorm weights in fp32 inside a bf16 model; megatron's own
    training wraps the model in Float16Module, which casts them. Mixed dtypes break the megatron
    optimizer's checkpoint (optimizer state paired with the wrong parameter shapes)."""
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                n += 1
    return n


def _groups():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group())


def _offload_kwargs(cfg: Config, device: torch.device) -> dict:
    """OptimizerConfig fields for train.optimizer_cpu_offload (megatron-core 0.16.1's HybridDeviceOptimizer).

    Megatron-LM's arguments.py requires --use-precision-aware-optimizer with --optimizer-cpu-offload
    ("the hybrid device optimizer reuses the code path of this flag"): only then do the distributed
    optimizer's fp32 main params live in the hybrid optimizer (and move to the host) instead of on
    the GPU; OptimizerConfig.__post_init__ needs the distributed optimizer for it (config.py checks)
    and Transformer Engine installed (it calls is_te_min_version, which fails without TE).
    CUDA only: HybridDeviceOptimizer moves the parameters that are ``is_cuda`` to pinned host memory
    and creates CUDA streams; on the CPU nothing is offloaded and its step() raises KeyError looking
    up each host parameter's GPU original (cpu_offloading/hybrid_optimizer.py), so we refuse here."""
    t = cfg.train
    if not t.optimizer_cpu_offload:
        return {}
    if device.type != "cuda":
        from popo_mega.config import ConfigError

        raise ConfigError(f"{cfg.source}: key 'train.optimizer_cpu_offload' needs CUDA: megatron-core 0.16.1's "
                          "HybridDeviceOptimizer offloads only CUDA parameters and fails on a CPU-only run "
                          f"(device here: {device.type}); set it to false")
    from megatron.core.utils import get_te_version

    if get_te_version() is None:   # OptimizerConfig.__post_init__ compares it (is_te_min_version) and crashes
        from popo_mega.config import ConfigError

        raise ConfigError(f"{cfg.source}: key 'train.optimizer_cpu_offload' needs Transformer Engine: megatron-core "
                          "0.16.1's precision-aware optimizer, which offload runs through, reads its version")
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=t.optimizer_offload_fraction,
                use_precision_aware_optimizer=True)


class PolicyTrainer:
    """The policy model wrapped for training, its optimizer, LR schedule, EMA and predictor.

    Attributes used by checkpoints and the RL loop: ``model`` (this rank's GPTModel shard),
    ``ddp_model``, ``predictor`` / ``ddp_predictor`` (POPO with alpha != 0, last stage only, else
    None), ``optimizer`` (megatron), ``scheduler``, ``ema`` (POPO only, else None),
    ``reference`` (the frozen initial policy: GRPO/A3PO with algorithm.grpo.beta_kl != 0, else None), ``step``
    (optimizer steps taken, skipped steps included), ``tokens_seen`` (tokens the model was run on,
    counted by a hook on the model's input; first pipeline stage).
    """

    def __init__(self, cfg: Config, runtime, loaded):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg, self.rt = cfg, runtime
        self.model, self.arch, self.layout = loaded.model, loaded.arch, loaded.layout
        self.algo = cfg.algorithm
        self.objective = make_objective(cfg.algorithm, cfg.train.kernels)
        self.step = 0
        self.tokens_seen = 0
        t = cfg.train
        dtype = self.model.config.params_dtype
        _cast_stray_params(self.model, dtype)
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=cfg.parallel.distributed_optimizer)
        self.ddp_model = DistributedDataParallel(self.model.config, ddp_cfg, self.model)
        chunks = [self.ddp_model]
        self.predictor = self.ddp_predictor = None
        popo = self.algo.popo
        if self.objective.keeps_predictor and runtime.is_last_stage:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed + 7919)   # the same initial h_phi on every layout
                self.predictor = Predictor(self.arch.hidden_size, popo.predictor_hidden, popo.predictor_layers)
            # algorithm.popo.predictor_dtype "model": the model's dtype (the optimizer keeps fp32 main
            # copies). "fp32": the authors' fp32 PredictorMLP; it trains, but megatron-core 0.16.1 cannot
            # checkpoint an optimizer whose chunks mix bf16 and fp32, so config.py refuses it with checkpoints on.
            pred_dtype = torch.float32 if popo.predictor_dtype == "fp32" else dtype
            self.predictor.to(device=runtime.device, dtype=pred_dtype)
            self.ddp_predictor = DistributedDataParallel(self.model.config, ddp_cfg, self.predictor)
            chunks.append(self.ddp_predictor)
        self.chunks = chunks
        opt_cfg = OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                                  adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.grad_clip,
                                  bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
                                  use_distributed_optimizer=cfg.parallel.distributed_optimizer,
                                  **_offload_kwargs(cfg, runtime.device))
        self.optimizer = get_megatron_optimizer(opt_cfg, chunks)
        # train.warmup_fraction: ceil(steps x fraction), as HF's get_warmup_steps rounds warmup_ratio.
        warmup = math.ceil(t.steps * t.warmup_fraction) if t.warmup_fraction > 0 else t.warmup_steps
        decay_steps = max(t.steps, warmup + 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if warmup else t.lr, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=decay_steps, lr_decay_style=t.lr_schedule,
            start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=decay_steps, wd_incr_style="constant")
        # Optimizer step k (1-based) uses the LR at scheduler position k: with warm-up the first step
        # gets lr * 1/warmup_steps, not megatron's init_lr (0), which would waste the first batch.
        self.scheduler.step(increment=1)
        self.ema = (EMA(self.model, tau=popo.tau, schedule=popo.tau_schedule, total_steps=t.steps)
                    if self.objective.keeps_ema else None)
        # What the rollout servers get when they serve the EMA: the fp32 master cast as the sync reads
        # it (nothing resident), so a sync never swaps weights into the live policy (issue 12).
        self.served = ServedModel(self.model, self.ema) if self.ema is not None else None
        # GRPO/A3PO with algorithm.grpo.beta_kl != 0: the frozen initial policy for the k3 KL term,
        # taken from the HF weights before any step (also on resume: load_checkpoint runs later).
        self.reference = FrozenReference(self.model) if self.objective.keeps_reference else None
        mcfg = self.model.config
        mcfg.finalize_model_grads_func = self._finalize_grads
        mcfg.grad_scale_func = self.optimizer.scale_loss
        self._hidden: Tensor | None = None
        if runtime.is_last_stage:
            self.model.decoder.final_layernorm.register_forward_hook(self._capture_hidden)
        self.model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)

    # ------------------------------------------------------------------------------ hooks
    def _capture_hidden(self, module, inputs, output):
        """The final norm's output: [T_pad, 1, H], or this TP rank's slice [T_pad/tp, 1, H] under SP."""
        self._hidden = output

    def _pooled_features(self, mb: MicroBatch) -> Tensor:
        """f of Eq. P3, [B, H] fp32: masked mean of the final-norm hidden state over each rollout's
        response tokens. Under sequence parallelism the hidden state is sequence-sharded over TP
        (megatron's output layer all-gathers it for the logits, which stay full-sequence), so it is
        all-gathered here first. Everything after the gather (pooling, predictor, cosine term) is
        computed identically on every TP rank, so its gradient is already the full one on each rank:
        the gather's backward must hand each rank its slice (``tensor_parallel_output_grad=False``),
        not reduce-scatter (which would sum tp identical copies)."""
        h = self._hidden
        if self.model.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False, group=_groups()[0])
        return masked_mean_pool(h[:mb.num_tokens, 0].float(), mb.cu_seqlens, mb.feature_mask,
                                impl=self.cfg.train.kernels)

    def _count_tokens(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and self.rt.is_first_stage:
            self.tokens_seen += int(ids.numel())

    def _finalize_grads(self, model_list, *args, **kwargs):
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(model_list, *args, **kwargs)
        if self.ddp_predictor is not None:
            self.ddp_predictor.finish_grad_sync()

    # ------------------------------------------------------------------------------ pieces
    def pack(self, samples: list[RolloutSample]) -> list[MicroBatch]:
        """This rank's micro-batches (padded to one length at PP > 1, and to a multiple of
        ``_token_multiple()`` under sequence parallelism or FP8), each moved to the runtime's device
        (tokens, labels, masks, cu_seqlens...: the model and the loss run there)."""
        mbs = pack_micro_batches(samples, self.cfg.train.micro_batch_tokens, common_length=self.rt.pp > 1,
                                 pad_multiple=self._token_multiple())
        return [mb.to(self.rt.device) for mb in mbs]

    def _token_multiple(self) -> int:
        """Padded micro-batch lengths are multiples of this: tp under SP, x16 (x32 MXFP8) with FP8."""
        m = self.cfg.model
        return token_multiple(self.rt.tp, self.model.config.sequence_parallel, m.fp8_recipe if m.fp8 else None)

    def _logp_entropy(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """logits [T, V_pad/tp] (vocab-parallel), labels [T] -> (logp [T], entropy [T]) fp32."""
        tp_group = _groups()[0] if self.rt.tp > 1 else None
        start = self.rt.tp_rank * logits.shape[1]
        # train.kernels: the fused csrc/ kernel ("extension"), its reference twin
        # (popo_mega.model.logprobs, "reference"), or the kernel when built ("auto").
        return logprob_entropy(logits, labels, group=tp_group, vocab_start=start, vocab_size=self.arch.vocab_size,
                               impl=self.cfg.train.kernels)

    @torch.no_grad()
    def _frozen_forward(self, weights, mbs: list[MicroBatch], key: str, features: bool = False) -> None:
        """``weights`` (the EMA target or the frozen reference: anything with ``swapped_into``) in the
        policy's parameters, forward only: on the last stage each micro-batch gets ``extras[key]`` [T]
        fp32, those weights' log-probs of the labels (0 off the mask), and with ``features``
        ``extras["target_features"]`` [B, H] fp32 (Eq. P3's masked mean of the final-norm hidden state
        over the response tokens). Collective over the pipeline."""
        from popo_mega.model.forward import forward_only

        def collect(output, batch):
            mb = batch["mb"]
            logp, _ = self._logp_entropy(output[0, :mb.num_tokens], mb.labels)
            mb.extras[key] = logp * mb.mask
            if features:
                mb.extras["target_features"] = self._pooled_features(mb)
            return None

        with weights.swapped_into(self.model):
            forward_only(self.model, [{**mb.model_inputs(), "mb": mb} for mb in mbs], collect)
        self._hidden = None

    def target_pass(self, batch: "StepBatch | list[MicroBatch]") -> None:
        """POPO's EMA target (Eq. P3): ``extras["target_features"]`` [B, H] and ``extras["target_logp"]``
        [T] per micro-batch. Runs when the objective keeps a predictor (alpha != 0: the features feed
        only its term), else nothing. Collective over the pipeline."""
        if self.objective.keeps_predictor:
            self._frozen_forward(self.ema, _micro_batches(batch), "target_logp", features=True)

    def reference_pass(self, batch: "StepBatch | list[MicroBatch]") -> None:
        """GRPO's k3 KL term: ``extras["ref_logp"]`` [T], the frozen initial policy's log-probs, per
        micro-batch; nothing without a reference (beta_kl = 0, POPO). The reference never changes, so
        once per rollout batch is enough, however many updates train on it. Collective over the pipeline."""
        if self.reference is not None:
            self._frozen_forward(self.reference, _micro_batches(batch), "ref_logp")

    def _target_noise(self, uids: Tensor, width: int) -> Tensor:
        """eps ~ N(0, sigma^2) of Eq. P3, [B, width], a function of (seed, step, rollout uid) only."""
        sigma = self.algo.popo.noise_std
        rows = []
        for uid in uids.tolist():
            g = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + self.step) * 1_000_033 + int(uid))
            rows.append(torch.randn(width, generator=g))
        return sigma * torch.stack(rows).to(self.rt.device) if rows else torch.zeros(0, width, device=self.rt.device)

    def normalisers(self, mbs: list[MicroBatch]) -> Tensor:
        """GLOBAL normalisers (all-reduced over DP), float64 [3]:
        POPO: (N+, sum of positive weights, entropy token count) (Eq. P2-P4);
        GRPO/A3PO: (response tokens, rollouts, 0).
        Summed on the runtime's device (where the micro-batches are), one copy to the CPU at the end."""
        acc = torch.zeros(3, dtype=torch.float64, device=self.rt.device)
        for mb in mbs:
            acc += self.objective.normalisers(mb)
        if self.rt.dp > 1:
            dist.all_reduce(acc, group=_groups()[2])
        return acc.cpu()

    def _loss(self, mb: MicroBatch, output: Tensor, norm: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of the full-batch loss (Eq. P5, or GRPO/A3PO) and summable stats."""
        T = mb.num_tokens
        logp, ent = self._logp_entropy(output[0, :T], mb.labels)
        loss, parts = self.objective.loss(mb, logp, ent, norm, self._prediction)
        parts = {**parts, "loss": loss}
        stats = torch.stack([parts[k].detach().double().reshape(()).clone() for k in self.objective.stat_keys])
        return loss, stats

    def _prediction(self, mb: MicroBatch) -> tuple[Tensor | None, Tensor | None]:
        """(h_phi(z), target): the predictor on this micro-batch's pooled final-norm features and the
        EMA target features plus noise (Eq. P3), [B, H] fp32 each; (None, None) without a predictor."""
        if self.predictor is None:
            return None, None
        feats = self._pooled_features(mb)
        pred = self.ddp_predictor(feats.to(next(self.predictor.parameters()).dtype)).float()
        return pred, mb.extras["target_features"] + self._target_noise(mb.uids, feats.shape[1])

    # ------------------------------------------------------------------------------ the step
    def train_step(self, samples: list[RolloutSample]) -> dict:
        """One optimizer step on this DP rank's ``samples`` (all TP/PP peers pass the same list): the
        loop's four calls in a row, for callers that train one update per batch (tests, benchmarks).
        Returns ``policy_step``'s stats, with ``tau`` from ``update_ema`` (POPO)."""
        batch = self.batch(samples)
        self.reference_pass(batch)
        self.target_pass(batch)
        stats = self.policy_step(batch)
        self.update_ema(stats)
        return stats

    def skip(self, updates: int) -> dict:
        """No rank has anything to train on in this rollout batch (POPO: no positive; decided by the
        loop on the broadcast batch): the ``updates`` optimizer steps are counted as skipped, so the
        step counter, and with it train.steps, still advance. Returns the step's stats."""
        self.step += updates
        return {"skipped": 1.0, "tokens_fed": 0.0}

    def batch(self, samples: list[RolloutSample]) -> "StepBatch":
        """This DP rank's share of a rollout batch, ready for the passes and the policy step: the
        objective's trainable samples (POPO, entropy_on positive: the positives), checked, prepared
        (A3PO: shaped advantages at the current step) and packed into micro-batches. A rank whose
        share is empty gets one all-masked micro-batch, so that it still joins the schedule and the
        gradient all-reduce. An error when no DP rank has a sample (the loop decides that on the
        broadcast batch, before this, the same on every rank). Collective over DP."""
        obj = self.objective
        samples = obj.trainable(samples)   # POPO, entropy_on positive: negatives enter no term, never run them
        obj.check_inputs(samples)
        total = torch.tensor([float(len(samples))], device=self.rt.device)
        if self.rt.dp > 1:
            dist.all_reduce(total, group=_groups()[2])
        if total.item() == 0:   # the same decision on every rank: nobody enters the schedule
            raise ValueError("train_step: no rollout to train on in the whole batch (POPO: no positive); "
                             "the caller must skip this batch")
        return StepBatch(samples, self._pack_prepared(samples), self.step)

    def _pack_prepared(self, samples: list[RolloutSample]) -> list[MicroBatch]:
        prepared = self.objective.prepare(samples, self.step)   # A3PO: token-level shaped advantages
        return self.pack(prepared) if prepared else [self._empty_micro_batch()]

    def _micro_batches_now(self, batch: "StepBatch") -> list[MicroBatch]:
        """``batch``'s micro-batches as of this step. A3PO's shaped advantages decay with the step, so
        a later update on the same rollouts re-prepares them; the packing is a function of the
        tokens only, so the passes' ``extras`` (EMA, reference: log-probs of the same tokens) carry
        over to the new micro-batches unchanged. Objectives whose preparation does not depend on
        the step (POPO, GRPO) keep theirs: re-packing would only repeat the pack and the copy to the
        device."""
        if batch.prepared_at == self.step or not self.objective.prepare_depends_on_step:
            return batch.mbs
        mbs = self._pack_prepared(batch.samples)
        for new, old in zip(mbs, batch.mbs, strict=True):
            if not torch.equal(new.cu_seqlens, old.cu_seqlens):
                raise RuntimeError("policy_step: re-packing the same rollouts gave another layout")
            new.extras.update(old.extras)
        batch.mbs, batch.prepared_at = mbs, self.step
        return mbs

    def policy_step(self, batch: "StepBatch") -> dict:
        """Forward/backward of the objective's loss over ``batch`` (after ``target_pass`` /
        ``reference_pass`` filled its extras), then the optimizer and LR schedule; no EMA update
        (``update_ema``, next).

        Returns (same on every rank) a dict of floats: the full-batch loss and its parts (summed over
        micro-batches and DP), ``grad_norm``, ``lr``, ``tokens_fed`` / ``rollouts_fed`` (over DP),
        ``num_microbatches``, ``skipped`` (1.0 when a NaN/inf loss or gradient skipped the update)
        and ``step`` (after the update).
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        obj = self.objective
        mbs = self._micro_batches_now(batch)
        samples = batch.samples
        norm = self.normalisers(mbs)
        n_mb, dp = len(mbs), self.rt.dp
        keys = obj.stat_keys
        per_mb: list[Tensor] = []

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            output = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params)

            def loss_func(out):
                loss, stats = self._loss(mb, out, norm)
                per_mb.append(stats)
                return loss * (n_mb * dp), {"loss": loss.detach().clone()}

            return output, loss_func

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.model.train()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[self.ddp_model], num_microbatches=n_mb,
            seq_length=max(mb.padded_tokens for mb in mbs), micro_batch_size=1, forward_only=False)
        self._hidden = None

        # Stats: sum over micro-batches (last stage), then DP, then pipeline (other stages add 0).
        dev = self.rt.device   # every tensor below meets a collective of the default/DP/PP group (NCCL on GPU)
        sums = torch.stack(per_mb).sum(0) if per_mb else torch.zeros(len(keys), dtype=torch.float64, device=dev)
        fed = torch.tensor([float(sum(mb.padded_tokens for mb in mbs)), float(len(samples))], dtype=torch.float64,
                           device=dev)
        vec = torch.cat([sums, fed])
        _, pp_group, dp_group = _groups()
        if dp > 1:
            dist.all_reduce(vec, group=dp_group)
        if self.rt.pp > 1:
            dist.all_reduce(vec, group=pp_group)
        vec = vec.cpu()

        loss_bad = torch.tensor(0.0 if math.isfinite(float(vec[0])) else 1.0, device=dev)
        bad = torch.stack([loss_bad, self._local_grads_nonfinite()])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = bad.cpu()
        skipped = bool(bad.max() > 0)
        lr = float(self.optimizer.param_groups[0]["lr"])   # the rate this step uses
        grad_norm = float("nan")
        if skipped:
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            ok, grad_norm, _ = self.optimizer.step()
            if not ok:
                skipped = True
            else:
                self.scheduler.step(increment=1)
        self.step += 1
        out = {k: float(vec[i]) for i, k in enumerate(keys)}
        out.update(tokens_fed=float(vec[len(keys)]), rollouts_fed=float(vec[len(keys) + 1]),
                   num_microbatches=float(n_mb), grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   lr=lr, skipped=float(skipped),
                   nonfinite_loss=float(bad[0]), nonfinite_grad=float(bad[1]), step=float(self.step))
        return out

    def update_ema(self, stats: dict) -> None:
        """Eq. P6 after a policy step that was not skipped: the fp32 EMA moves towards the policy (the
        served view, ``served``, reads it at the next sync). Adds
        ``tau`` (the momentum used; NaN for a skipped step) to ``stats``. Nothing for GRPO/A3PO (no
        EMA, no tau: a NaN would be flagged on the console)."""
        if self.ema is None:
            return
        tau = float("nan")
        if not stats["skipped"]:
            tau = self.ema.update(self.model)
        stats["tau"] = tau

    def weights_to_serve(self, ema: bool):
        """What a weight sync sends (``served_model.send_weights`` reads its ``state_dict``): the served
        EMA copy when ``ema`` and the objective keeps an EMA (Eq. P6: the engine serves the target),
        else the live policy."""
        return self.served if (ema and self.served is not None) else self.model

    def _empty_micro_batch(self) -> MicroBatch:
        """A 2-token micro-batch whose masks are all zero, for a DP rank with no rollout while other
        ranks have some: it contributes nothing to any loss term or normaliser, but this rank still
        runs the schedule and joins the gradient all-reduce (instead of leaving the others hanging)."""
        dummy = RolloutSample(torch.zeros(2, dtype=torch.int64), 1, uid=0)
        (mb,) = pack_micro_batches([dummy], max(2, self.cfg.train.micro_batch_tokens),
                                   pad_multiple=self._token_multiple())
        mb.mask.zero_()
        mb.feature_mask.zero_()
        return mb.to(self.rt.device)

    def _local_grads_nonfinite(self) -> Tensor:
        """1.0 if a main_grad of this rank holds a NaN or inf, else 0.0: a 0-dim float32 tensor on the
        runtime's device. No host sync here (a ``bool()`` per parameter would wait for the GPU once
        per parameter per step): the caller all-reduces it with the loss flag and reads both once."""
        grads = [g for c in self.chunks for p in c.module.parameters()
                 if (g := getattr(p, "main_grad", None)) is not None]
        if not grads:
            return torch.zeros((), device=self.rt.device)
        return torch.stack([torch.isfinite(g).all() for g in grads]).all().logical_not().float()
