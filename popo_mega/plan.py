"""``popo-plan``: per-GPU memory of a POPO training layout (model x TP/PP/DP/EP x FP8), and the largest
micro-batch that fits.

    popo-plan --model qwen2.5-72b --tp 8 --pp 4 --dp 2 --micro-batch-tokens 16384 --recompute full
    popo-plan --config configs/qwen2.5-72b-popo.yaml --dp 2 --json plan.json
    popo-plan --hf-config /models/X/config.json --tp 2 --dp 4
    popo-plan --model qwen3-30b-a3b --tp 2 --dp 8 --ep 8 --recompute full

Every term is per GPU, for the worst pipeline stage (and each stage in ``--json``). The terms and
their formulas are in docs/plan.md; in short, with N = this rank's parameters (its TP shard of the
layers of its PP stage, the padded-vocabulary embedding on the first stage, the output layer on the
last, a copy of a tied embedding on the last stage when PP > 1):

    weights     2 N                 bf16 model parameters (megatron's DDP parameter buffer)
    grads       4 N                 fp32 gradient buffer (DDP with grad_reduce_in_fp32, as the trainer)
    optimizer   12 N / dp_shard     fp32 main params + Adam m, v; dp_shard = DP with the distributed
                                    optimizer, 1 without; x (1 - f) with train.optimizer_cpu_offload at
                                    fraction f (megatron's HybridDeviceOptimizer keeps f of them on the
                                    host, with a pinned fp32 copy of their grads: host_optimizer, 16 per
                                    offloaded element, not GPU memory)
    ema         4 N                 fp32 EMA (Eq. P6), sharded like the parameters (TP/PP), NOT over DP
    served_ema  2 V_pad h (2 + 1/tp) transient, the weight sync: the served EMA is a view that casts the
                                    fp32 EMA one tensor at a time as the sync reads it (train/served_model.py);
                                    the largest tensor, the embedding / output layer, is its cast TP shard plus
                                    the gathered shards and their concatenation
    ema_swap    2 N                 transient: the trainer's target pass swaps the EMA into the policy
                                    and keeps a bf16 copy of the policy weights meanwhile
    predictor   16 P + 8 P/dp_shard fp32 h_phi (Eq. P3; P parameters, last stage): weights, fp32 grads,
                                    Adam m, v (fp32 params need no main copy)
    fp8_cache   2 N_linear          FP8 (Transformer Engine): fp8 copy of every layer GEMM weight and its
                                    transpose, kept alongside the bf16 weights
    activations in-flight micro-batches x stored bytes per micro-batch + one layer's working set
                (per-layer formula: :func:`layer_activation_bytes_per_token`)
    logits      [T, V_pad/tp] bf16 saved for the log-prob backward + its gradient, and the fp32
                chunk of the log-prob path (popo_mega.model.logprobs, ~4M elements)

Mixture-of-experts models (Qwen3-MoE, megatron-core's MoELayer): N includes this rank's experts
(E / ep of them per layer, each split over TP) and the replicated router; the optimizer shards the
experts' 12 bytes over the expert-data-parallel group (DP / EP) instead of DP; the activations count
the router's tensors and the top-k routed copies through the expert MLP
(:func:`moe_activation_bytes_per_token`); ``moe_dispatch`` is one layer's all-to-all buffers
(:func:`moe_dispatch_bytes`), a transient.

Peak = static (weights + grads + optimizer + ema + predictor + fp8 cache) + max(training transient
= activations + logits (+ moe_dispatch), target-pass transient = ema_swap + one layer forward +
logits forward (+ moe_dispatch), sync transient = served_ema).
The margin (default 6 GiB: CUDA context, NCCL buffers, allocator fragmentation) is subtracted from
``--gpu-mem-gib`` before deciding whether it fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from popo_mega.config import ConfigError

GIB = 1024 ** 3
FP32_CHUNK_ELEMENTS = 1 << 22   # rows x V_shard upcast at a time by popo_mega.model.logprobs (~16 MiB)

# Architecture facts from the public HF config.json of each model (hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings).
KNOWN_MODELS: dict[str, dict] = {
    "qwen2.5-math-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=10000.0),
    "qwen2.5-math-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                            tie_word_embeddings=False, max_position_embeddings=4096, rope_theta=10000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                        tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0),
    "qwen2.5-72b": dict(model_type="qwen2", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                        tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, vocab_size=151936,
                     tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1000000.0),
    # Qwen3-MoE (Qwen/Qwen3-30B-A3B, Qwen/Qwen3-235B-A22B config.json; their megatron arguments in slime's
    # scripts/models/qwen3-30B-A3B.sh and qwen3-235B-A22B.sh agree): every layer routed, no shared expert.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001,
                          vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
                          rope_theta=1000000.0),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001,
                            vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
                            rope_theta=1000000.0),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                       tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5),
}
# HF directory names (as in configs/*.yaml model.hf_path) -> built-in names.
_ALIASES = {"qwen2.5-math-1.5b": "qwen2.5-math-1.5b", "qwen2.5-math-7b": "qwen2.5-math-7b",
            "qwen2.5-7b": "qwen2.5-7b", "qwen2.5-32b": "qwen2.5-32b", "qwen2.5-72b": "qwen2.5-72b",
            "qwen3-8b": "qwen3-8b", "qwen3-8b-base": "qwen3-8b",
            "qwen3-30b-a3b": "qwen3-30b-a3b", "qwen3-30b-a3b-base": "qwen3-30b-a3b",
            "qwen3-235b-a22b": "qwen3-235b-a22b",
            "meta-llama-3-70b": "llama3-70b", "llama-3-70b": "llama3-70b", "llama3-70b": "llama3-70b"}


@dataclass(frozen=True)
class Layout:
    """What the planner needs besides the architecture (defaults: the trainer's)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1                              # expert parallelism (MoE): experts split over EP ranks of the DP group
    distributed_optimizer: bool = True
    sequence_parallel: bool = True
    fp8: bool = False
    recompute: str = "none"                  # none | selective | full (megatron's uniform, 1 layer/chunk)
    micro_batch_tokens: int = 8192           # packed tokens T per micro-batch
    seq_len: int = 4096                      # longest sequence (reported; no term depends on it with
                                             # flash attention)
    impl: str = "te"                         # te: Transformer Engine layers (flash attention, bf16 norms);
                                             # local: megatron's local spec + SDPAttention (CPU path)
    num_microbatches: int | None = None      # None: >= pp (the 1F1B worst case)
    popo: bool = True                        # EMA + predictor (POPO); False for GRPO/A3PO
    predictor_hidden: int = 1024
    predictor_layers: int = 2
    make_vocab_size_divisible_by: int = 128
    param_bytes: int = 2                     # bf16 (4 for an fp32 model)
    gpu_mem_gib: float = 80.0
    margin_gib: float = 6.0
    expert_load: float = 1.0                 # MoE: routed token copies on the busiest rank / the balanced T*k
    optimizer_offload_fraction: float = 0.0  # train.optimizer_cpu_offload: the fraction of the optimizer's
                                             # elements whose main params + Adam m, v live on the host (0: off)
    gpus_per_node: int = 8                   # for the host memory per node of the offloaded optimizer

    def check(self, arch) -> None:
        for name in ("tp", "pp", "dp", "ep", "micro_batch_tokens", "seq_len", "predictor_hidden", "predictor_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"popo-plan: {name} must be >= 1, got {getattr(self, name)}")
        if self.ep > 1 and not arch.is_moe:
            raise ConfigError(f"popo-plan: --ep {self.ep} needs a mixture-of-experts model ({arch.model_type} is dense)")
        if arch.is_moe:
            # megatron-core 0.16.1 (parallel_state.initialize_model_parallel): expert TP = TP, and the
            # expert-data-parallel size world / (TP x EP x PP) = DP / EP must be whole.
            if arch.num_experts % self.ep:
                raise ConfigError(f"popo-plan: --ep {self.ep} does not divide the model's {arch.num_experts} experts")
            if self.dp % self.ep:
                raise ConfigError(f"popo-plan: --ep {self.ep} does not divide --dp {self.dp} (expert-parallel ranks "
                                  "are data-parallel ranks)")
            if self.tp > 1 and not self.sequence_parallel:
                raise ConfigError("popo-plan: a mixture-of-experts model at --tp > 1 needs sequence parallelism "
                                  "(megatron-core's MoE layer refuses to train without it)")
            if self.expert_load < 1:
                raise ConfigError(f"popo-plan: expert_load must be >= 1 (1 = balanced routing), got {self.expert_load}")
        if not 0 <= self.optimizer_offload_fraction <= 1:
            raise ConfigError(f"popo-plan: optimizer_offload_fraction must be in [0, 1], got {self.optimizer_offload_fraction}")
        if self.optimizer_offload_fraction > 0 and not self.distributed_optimizer:
            raise ConfigError("popo-plan: optimizer CPU offload needs the distributed optimizer (megatron-core offloads "
                              "through its precision-aware distributed optimizer)")
        if self.recompute not in ("none", "selective", "full"):
            raise ConfigError(f"popo-plan: recompute must be none, selective or full, got {self.recompute!r}")
        if self.impl not in ("te", "local"):
            raise ConfigError(f"popo-plan: impl must be te or local, got {self.impl!r}")
        if arch.num_heads % self.tp or arch.num_kv_heads % self.tp:
            raise ConfigError(f"popo-plan: --tp {self.tp} does not divide the model's {arch.num_heads} heads / "
                              f"{arch.num_kv_heads} key-value heads")
        if arch.num_layers % self.pp:
            raise ConfigError(f"popo-plan: --pp {self.pp} does not divide the model's {arch.num_layers} layers")


# ------------------------------------------------------------------------------------------ parameters

def layer_params(arch, tp: int, ep: int = 1) -> dict[str, int]:
    """Elements of one transformer layer on one TP rank (megatron's local/TE GPT layer, SwiGLU, GQA).

    qkv [(a + 2g) d / tp, h] (+ bias when Qwen2), proj [h, a d / tp], fc1 [2F / tp, h],
    fc2 [h, F / tp], two RMSNorm weights [h] (replicated over TP), and Qwen3's q/k norms [d] when present.

    A mixture-of-experts layer (megatron-core 0.16.1 ``MoELayer``) has, instead of fc1/fc2: the router
    ``TopKRouter.weight`` [E, h] (replicated over TP and EP; no bias: add_bias_linear is off) and
    E / ep local experts (``SequentialMLP``), each an MLP sharded over the expert-TP group, which is
    the TP group (``expert_tensor_parallel_size`` unset): fc1 [2F_e / tp, h], fc2 [h, F_e / tp]."""
    h, d, a, g, f = arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.ffn_hidden_size
    qkv_out = (a + 2 * g) * d // tp
    attention = qkv_out * h + h * (a * d // tp)
    out = {"linear": attention + (2 * f // tp) * h + h * (f // tp), "bias": qkv_out if arch.qkv_bias else 0,
           "norm": 2 * h + (2 * d if arch.qk_norm else 0)}
    if arch.is_moe:
        fe = arch.moe_ffn_hidden_size
        out.update(linear=attention, router=arch.num_experts * h,
                   experts=arch.num_experts // ep * ((2 * fe // tp) * h + h * (fe // tp)))
    return out


def stage_params(arch, tp: int, pp: int, pp_rank: int, divisible_by: int = 128, ep: int = 1) -> dict[str, int]:
    """Parameter elements held by one (tp_rank, pp_rank[, ep_rank]): layers, embedding, final norm, output layer.

    Embedding [V_pad / tp, h] on the first stage; final norm [h] and output layer [V_pad / tp, h] on
    the last; a tied embedding is one tensor at PP=1 and a second copy on the last stage at PP > 1
    (megatron keeps both in sync by all-reducing their gradients). ``experts``: the part of ``layers``
    (and of ``total``) that is this rank's experts, which the distributed optimizer shards over the
    expert-data-parallel group instead of the data-parallel group (0 for a dense model)."""
    from popo_mega.model.builder import padded_vocab_size

    vp = padded_vocab_size(arch.vocab_size, divisible_by, tp)
    per = layer_params(arch, tp, ep)
    n_layers = arch.num_layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    experts = n_layers * per.get("experts", 0)
    out = {"layers": n_layers * sum(per.values()), "layers_linear": n_layers * per["linear"] + experts,
           "experts": experts,
           "embedding": vp // tp * arch.hidden_size if first else 0,
           "final_norm": arch.hidden_size if last else 0,
           "output_layer": vp // tp * arch.hidden_size if last and not (arch.tie_embeddings and first) else 0}
    out["total"] = out["layers"] + out["embedding"] + out["final_norm"] + out["output_layer"]
    out["norms"] = n_layers * per["norm"] + out["final_norm"]
    out["vocab_padded"] = vp
    return out


def predictor_params(in_dim: int, hidden: int = 1024, num_layers: int = 2) -> int:
    """Elements of h_phi (popo_mega.algorithms.predictor): [Linear -> LayerNorm -> ReLU] x (L-1) -> Linear."""
    n, width = 0, in_dim
    for _ in range(num_layers - 1):
        n += width * hidden + hidden + 2 * hidden
        width = hidden
    return n + width * in_dim + in_dim


# ------------------------------------------------------------------------------------------ activations

def layer_activation_bytes_per_token(arch, layout: Layout, mode: str | None = None, span: int | None = None) -> float:
    """Bytes one transformer layer keeps for backward per token of a micro-batch, on one TP rank.

    ``mode`` defaults to ``layout.recompute``. s = bytes per activation element (2 for bf16), e = bytes
    of a saved GEMM input (s, or 1 with FP8), t = TP, t_sp = t with sequence parallelism else 1,
    h hidden, a heads, g KV groups, d head dim, F ffn width:

      none (impl "te": Transformer Engine layers, flash attention):
          norms      2 x (s h / t_sp + 4 / t_sp)      RMSNorm inputs and fp32 rstd (x 2 norms)
          GEMM in    e (2 h / t_sp + F / t)            inputs of QKV, FC1 (un-gathered shards with SP)
                                                      and FC2
          attention  s (a d + 2 g d + a d) / t + 4 a / t   q (after rope), k, v, the output (which is
                                                      also the output projection's input; with FP8 a
                                                      1-byte copy of it is added) and fp32 log-sum-exp
          SwiGLU     s (2 F + F) / t                   FC1 output [gate, up] and silu(gate)
          QK-norm    (s d + 4) (a + g) / t             Qwen3's per-head q/k RMSNorm: input + fp32 rstd
                                                      (local: fp32 input and output, 2 x 4 d)
          MoE        instead of FC2's input and SwiGLU: :func:`moe_activation_bytes_per_token`
      none (impl "local": megatron's local spec + popo_mega's SDPAttention, the CPU path), instead:
          norms      2 x 2 x 4 h / t_sp (+ rstd)      fp32 norm weights promote: the fp32 input and
                                                      normalised output of each norm are kept
          attention  k, v expanded to a heads; rope cos/sin 4 s d; the [T, T] additive mask
                     (s T per token, T = the packed micro-batch: it is one segment-causal mask)
          SwiGLU     one more s F / t copy (measured on CPU; see docs/plan.md)
      selective: none minus the attention kernel's internals (lse, mask).
      full:      s h / t_sp                         each layer's input (the layer is recomputed in
                                                    backward; :func:`activation_bytes` adds one
                                                    layer's working set)

    This is the SwiGLU / GQA / no-dropout / flash-attention analogue of Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models"), whose GPT layer stores
    s b h (34 + 5 a s / h) / t bytes with TP+SP (their 34 counts dropout masks and a 4h GeLU MLP;
    5as/h is the score matrix that flash attention does not store).
    """
    mode = layout.recompute if mode is None else mode
    s = layout.param_bytes
    t = layout.tp
    t_sp = t if layout.sequence_parallel and t > 1 else 1
    h, a, g, d, f = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.ffn_hidden_size
    if mode == "full":
        return s * h / t_sp
    local = layout.impl == "local"
    e = 1 if layout.fp8 else s
    b = (2 * 2 * 4 * h if local else 2 * s * h) / t_sp + 2 * 4 / t_sp          # norms + rstd
    if arch.is_moe:
        b += e * 2 * h / t_sp                                                  # QKV and router/permute inputs
    else:
        b += e * (2 * h / t_sp + f / t)                                        # QKV, FC1, FC2 inputs
    b += (e * a * d / t) if layout.fp8 else 0                                  # fp8 copy of the proj input
    kv = a if local else g
    b += s * (2 * a * d + 2 * kv * d) / t                                      # q, k, v, output
    if arch.is_moe:
        b += sum(moe_activation_bytes_per_token(arch, layout).values())        # router + routed experts
    else:
        b += s * (2 * f + f) / t + (s * f / t if local else 0)                 # SwiGLU
    if arch.qk_norm:   # Qwen3's per-head q/k RMSNorm: its input (fp32 input and output on the local path) + rstd
        b += ((2 * 4 * d if local else s * d) + 4) * (a + g) / t
    if local:
        b += 4 * s * d                                                         # rope cos / sin
    if mode == "none":
        b += 4 * a / t                                                         # lse
        if local:
            b += s * (span if span is not None else layout.micro_batch_tokens)  # [T, T] mask
    return b


def moe_activation_bytes_per_token(arch, layout: Layout) -> dict[str, float]:
    """What one mixture-of-experts layer (megatron-core 0.16.1 ``MoELayer``: ``TopKRouter``, the
    all-to-all token dispatcher, ``SequentialMLP`` experts) keeps for backward beyond the attention
    block, in bytes per token of the micro-batch on one rank (read from megatron's code and
    measured by benchmarks/plan_check.py: docs/plan.md).

    T tokens per micro-batch, T / t_sp of them on this rank; E experts, top-k; F_e one expert's
    width; L = ``layout.expert_load``. Dropless routing sends k copies of each token to experts:
    with the experts' TP group equal to the TP group, a rank's E / ep experts receive, from the
    ep ranks of its EP group, the copies routed to them and all-gather them over TP, so each rank
    runs its expert shards [2F_e / t, h] and [h, F_e / t] on T k copies when routing is balanced
    (T k L on the busiest rank) -- whatever ep is.

      router  ((4 + s + 1) E + 20 k) / t_sp   fp32 routing scores and the model-dtype logits [T, E],
                                              the bool routing map, int64 top-k indices and fp32
                                              top-k probabilities [T, k], and the int64 permutation
                                              index [T k] (the permuted copies themselves are not kept)
      routed  L k (e h + s 4 F_e / t + e F_e / t + s (+ s F_e / t local))
                                              per copy: the experts' fc1 input (the dispatched
                                              hidden state), fc1's output [gate, up] and silu(gate),
                                              the gated product (kept by the probability scaling),
                                              fc2's input (the scaled product in the model dtype)
                                              and the copy's probability; the local spec keeps one
                                              more [F_e / t] copy, as its dense SwiGLU does.
    """
    s, t = layout.param_bytes, layout.tp
    t_sp = t if layout.sequence_parallel and t > 1 else 1
    e = 1 if layout.fp8 else s
    h, E, k, fe = arch.hidden_size, arch.num_experts, arch.moe_top_k, arch.moe_ffn_hidden_size
    per_copy = e * h + s * 4 * fe / t + e * fe / t + s + (s * fe / t if layout.impl == "local" else 0)
    return {"router": ((4 + s + 1) * E + 20 * k) / t_sp, "routed": layout.expert_load * k * per_copy}


def moe_dispatch_bytes(arch, layout: Layout) -> float:
    """Transient all-to-all buffers of one MoE layer (one layer at a time; not kept for backward).

    The permuted copies [T k / t_sp, h] that the dispatch sends and that the combine returns, and the
    experts' concatenated output [T k L, h] (the dispatched input they read is counted as saved);
    with ep > 1 the all-to-all also receives a copy of each ([T k L / t, h] and [T k / t_sp, h]).
    Backward moves gradients of the same shapes the other way. An estimate: transients are not
    measured on CPU (docs/plan.md)."""
    if not arch.is_moe:
        return 0.0
    s, t, T = layout.param_bytes, layout.tp, layout.micro_batch_tokens
    t_sp = t if layout.sequence_parallel and t > 1 else 1
    sent = T * arch.moe_top_k / t_sp
    routed = T * arch.moe_top_k * layout.expert_load
    rows = 2 * sent + routed + ((routed / t + sent) if layout.ep > 1 else 0)
    return s * arch.hidden_size * rows


def activation_bytes(arch, layout: Layout, pp_rank: int) -> dict[str, float]:
    """Activation memory of stage ``pp_rank`` at the 1F1B peak.

    stored: in-flight micro-batches (min(pp - pp_rank, num_microbatches)) x layers of the stage x T x
    the per-layer bytes; full recompute adds one layer's un-recomputed working set (the layer being
    back-propagated); the last stage adds the head: the final norm (as a layer norm above), the
    output layer's input (s h / t_sp) and the fp32 final hidden state pooled into POPO's features
    (4 h / t_sp)."""
    T = layout.micro_batch_tokens
    n_layers = arch.num_layers // layout.pp
    mbs = layout.num_microbatches or layout.pp
    in_flight = min(layout.pp - pp_rank, mbs)
    per_layer = layer_activation_bytes_per_token(arch, layout)
    stored = in_flight * n_layers * T * per_layer
    working = T * layer_activation_bytes_per_token(arch, layout, "none") if layout.recompute == "full" else 0.0
    t_sp = layout.tp if layout.sequence_parallel and layout.tp > 1 else 1
    h, s = arch.hidden_size, layout.param_bytes
    norm = (2 * 4 * h if layout.impl == "local" else s * h) + 4
    head = T * (norm + s * h + 4 * h) / t_sp if pp_rank == layout.pp - 1 else 0.0
    return {"in_flight": in_flight, "per_layer_per_token": per_layer, "stored": stored, "working": working,
            "head": head, "total": stored + working + head}


def logits_bytes(arch, layout: Layout, vocab_padded: int) -> float:
    """Last stage: logits [T, V_pad/tp] (bf16) kept for the log-prob backward, its gradient of the same
    size during backward, and the fp32 chunk of popo_mega.model.logprobs (~4M elements)."""
    vs = vocab_padded // layout.tp
    chunk = min(layout.micro_batch_tokens, max(1, FP32_CHUNK_ELEMENTS // vs)) * vs
    return 2 * layout.param_bytes * layout.micro_batch_tokens * vs + 4 * chunk


# ------------------------------------------------------------------------------------------ the plan

def plan_stage(arch, layout: Layout, pp_rank: int) -> dict:
    """All terms (bytes) for one pipeline stage; see the module docstring for the formulas."""
    p = stage_params(arch, layout.tp, layout.pp, pp_rank, layout.make_vocab_size_divisible_by, layout.ep)
    n = p["total"]
    shard = layout.dp if layout.distributed_optimizer else 1
    # megatron's distributed optimizer shards expert parameters over the expert-data-parallel group
    # (DP / EP ranks hold copies of the same experts), the others over the data-parallel group.
    n_exp = p["experts"]
    shard_exp = layout.dp // layout.ep if layout.distributed_optimizer else 1
    last = pp_rank == layout.pp - 1
    pb = layout.param_bytes
    # megatron 0.16.1's local spec creates torch RMSNorm weights in fp32, but PolicyTrainer casts them
    # to the model dtype (a bf16/fp32 mix broke distributed-optimizer checkpoints), so they are pb too.
    nb = pb
    norms = p["norms"]
    # fp32 main copies exist only for the parameters that are not fp32 already
    main = (4 * (n - n_exp - norms) if pb != 4 else 0) + (4 * norms if nb != 4 else 0)
    main_exp = 4 * n_exp if pb != 4 else 0
    opt_elements = (n - n_exp) / shard + n_exp / shard_exp     # the optimizer's parameters on this rank
    terms = {
        "weights": pb * (n - norms) + nb * norms,
        "grads": 4 * n,
        "optimizer": (main + 8 * (n - n_exp)) / shard + (main_exp + 8 * n_exp) / shard_exp,
        "ema": 4 * n if layout.popo else 0,
        # the served EMA (popo_mega.train.served_model.ServedModel) is a view: nothing resident; the sync
        # casts one tensor at a time, the largest being the [V_pad, h] embedding / output layer: its cast
        # TP shard, the gathered shards and their concatenation (model.hf.iter_hf_tensors). Transient.
        "served_ema": pb * p["vocab_padded"] * arch.hidden_size * (2 + 1 / layout.tp) if layout.popo else 0,
        "predictor": 0,
        "fp8_cache": 2 * p["layers_linear"] if layout.fp8 else 0,
    }
    if layout.popo and last:
        # The predictor lives in the model dtype (PolicyTrainer) with an fp32 grad buffer. In an fp32
        # model its Adam state is its own; otherwise its fp32 main copy + Adam sit in the optimizer.
        q = predictor_params(arch.hidden_size, layout.predictor_hidden, layout.predictor_layers)
        if pb == 4:
            terms["predictor"] = 8 * q + 8 * q / shard
        else:
            terms["predictor"] = pb * q + 4 * q
            terms["optimizer"] += 12 * q / shard
            opt_elements += q / shard
    # train.optimizer_cpu_offload (megatron-core 0.16.1 HybridDeviceOptimizer with the precision-aware
    # distributed optimizer): the first f of each optimizer's elements get their fp32 main param and
    # Adam m, v on the host, plus a pinned fp32 host copy of their grads (_set_sub_optimizer_grads);
    # the bf16 weights and fp32 grad buffer stay on the GPU.
    f = layout.optimizer_offload_fraction
    host = f * (terms["optimizer"] + 4 * opt_elements)
    terms["optimizer"] *= 1 - f
    act = activation_bytes(arch, layout, pp_rank)
    logits = logits_bytes(arch, layout, p["vocab_padded"]) if last else 0
    dispatch = moe_dispatch_bytes(arch, layout)
    terms["activations"] = act["total"]
    terms["logits"] = logits
    ema_swap = terms["weights"] if layout.popo else 0
    fwd_only = layout.micro_batch_tokens * layer_activation_bytes_per_token(arch, layout, "none") \
        + (logits / 2 if last else 0)
    terms["ema_swap"] = ema_swap
    if arch.is_moe:
        terms["moe_dispatch"] = dispatch
    static = sum(terms[k] for k in ("weights", "grads", "optimizer", "ema", "predictor", "fp8_cache"))
    train = act["total"] + logits + dispatch
    target = ema_swap + fwd_only + dispatch if layout.popo else 0
    sync = terms["served_ema"]
    total = static + max(train, target, sync)
    return {"pp_rank": pp_rank, "params": n, "params_detail": p, "terms": terms, "activation_detail": act,
            "static": static, "train_transient": train, "target_transient": target, "sync_transient": sync,
            "total": total, "host_optimizer": host}


def plan(arch, layout: Layout) -> dict:
    """Per-stage plans, the worst stage, whether it fits and the largest micro-batch that fits."""
    layout.check(arch)
    stages = [plan_stage(arch, layout, r) for r in range(layout.pp)]
    worst = max(stages, key=lambda s: s["total"])
    usable = (layout.gpu_mem_gib - layout.margin_gib) * GIB
    host = max(s["host_optimizer"] for s in stages)
    return {"layout": dataclasses.asdict(layout), "architecture": dataclasses.asdict(arch), "stages": stages,
            "worst_stage": worst["pp_rank"], "total": worst["total"], "usable": usable,
            "host_optimizer_per_gpu": host, "host_optimizer_per_node": host * layout.gpus_per_node,
            "fits": worst["total"] <= usable, "max_micro_batch_tokens": max_micro_batch_tokens(arch, layout)}


def max_micro_batch_tokens(arch, layout: Layout, step: int = 256, limit: int = 1 << 22) -> int:
    """Largest T (a multiple of ``step``) whose worst-stage total fits in the usable memory; 0 if none."""
    usable = (layout.gpu_mem_gib - layout.margin_gib) * GIB

    def fits(tokens: int) -> bool:
        lay = dataclasses.replace(layout, micro_batch_tokens=tokens)
        return max(plan_stage(arch, lay, r)["total"] for r in range(lay.pp)) <= usable

    if not fits(step):
        return 0
    lo, hi = 1, limit // step          # fits(lo*step) true
    if fits(hi * step):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


# ------------------------------------------------------------------------------------------ console

_ROWS = ("weights", "grads", "optimizer", "ema", "served_ema", "predictor", "fp8_cache", "activations", "logits", "ema_swap")


def format_table(result: dict, name: str = "") -> str:
    lay = result["layout"]
    moe = "moe_dispatch" in result["stages"][0]["terms"]
    ep = f" EP={lay['ep']}" if moe else ""
    head = (f"{name} TP={lay['tp']} PP={lay['pp']} DP={lay['dp']}{ep} "
            f"dist-opt={'on' if lay['distributed_optimizer'] else 'off'} SP={'on' if lay['sequence_parallel'] else 'off'} "
            f"fp8={'on' if lay['fp8'] else 'off'} recompute={lay['recompute']} T={lay['micro_batch_tokens']}"
            + (f" offload={lay['optimizer_offload_fraction']:g}" if lay["optimizer_offload_fraction"] else "")).strip()
    cols = [f"stage {s['pp_rank']}" for s in result["stages"]]
    lines = [head, f"{'GiB per GPU':<22}" + "".join(f"{c:>10}" for c in cols)]
    for row in _ROWS + (("moe_dispatch",) if moe else ()):
        lines.append(f"{row:<22}" + "".join(f"{s['terms'][row] / GIB:>10.2f}" for s in result["stages"]))
    lines.append(f"{'params (M)':<22}" + "".join(f"{s['params'] / 1e6:>10.1f}" for s in result["stages"]))
    if moe:
        lines.append(f"{'  of which experts (M)':<22}"
                     + "".join(f"{s['params_detail']['experts'] / 1e6:>10.1f}" for s in result["stages"]))
    lines.append(f"{'peak':<22}" + "".join(f"{s['total'] / GIB:>10.2f}" for s in result["stages"]))
    if lay["optimizer_offload_fraction"] > 0:
        lines.append(f"{'host: optimizer':<22}" + "".join(f"{s['host_optimizer'] / GIB:>10.2f}" for s in result["stages"]))
        lines.append(f"optimizer CPU offload, fraction {lay['optimizer_offload_fraction']:g}: host memory "
                     f"{result['host_optimizer_per_node'] / GIB:.1f} GiB per node ({lay['gpus_per_node']} GPUs, the "
                     "worst stage's) for main params + Adam m, v + pinned grad copies")
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    lines.append(f"worst stage {result['worst_stage']}: {result['total'] / GIB:.2f} GiB of "
                 f"{lay['gpu_mem_gib']:.0f} GiB ({lay['margin_gib']:.0f} GiB margin) -> {verdict}; "
                 f"largest micro-batch that fits: {result['max_micro_batch_tokens']} tokens")
    return "\n".join(lines)


def format_server_memory(arch, layout: Layout, result: dict, placement) -> str:
    """What a rollout server has per GPU: SGLang takes rollout.mem_fraction of the memory free when it
    starts (SGLang 0.5.23) for its weights (the whole model in the model dtype / server TP) and KV cache.
    Colocated, the trainer's static state (the worst stage's weights, grads, optimizer, EMA, predictor)
    stays on the GPU meanwhile; only the step's transients are given back."""
    server = placement.servers[0]
    weights = layout.param_bytes * stage_params(arch, 1, 1, 0, layout.make_vocab_size_divisible_by)["total"] \
        / len(server.gpus)
    trainer = max(s["static"] for s in result["stages"]) if placement.mode == "colocated" else 0.0
    share = server.mem_fraction * (layout.gpu_mem_gib * GIB - trainer)
    kv = share - weights
    where = (f"beside {trainer / GIB:.2f} GiB of trainer state" if trainer
             else "on GPUs of its own")
    verdict = f"{kv / GIB:.2f} GiB left for the KV cache" if kv > 0 else "DOES NOT FIT: no room for the KV cache"
    return (f"servers: {share / GIB:.2f} GiB per GPU (mem_fraction {server.mem_fraction}, {where}) for "
            f"{weights / GIB:.2f} GiB of weights (TP {len(server.gpus)}) -> {verdict}")


def _arch_from_name(name: str):
    from popo_mega.model.builder import Architecture

    key = _ALIASES.get(name.lower(), name.lower())
    if key not in KNOWN_MODELS:
        raise ConfigError(f"popo-plan: unknown --model {name!r}; built-in: {', '.join(KNOWN_MODELS)} "
                          "(or give --hf-config PATH/config.json)")
    return Architecture.from_hf(KNOWN_MODELS[key], source=f"built-in {key}")


def _arch_from_file(path: str):
    from popo_mega.model.builder import Architecture

    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"popo-plan: --hf-config {path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"popo-plan: --hf-config {path}: not valid JSON: {e}") from None
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise ConfigError(f"popo-plan: --hf-config {path}: missing key '{key}'")
    return Architecture.from_hf(hf, source=path)


def _arch_from_run_config(cfg):
    """A run config's model: its hf_path/config.json if present, else a built-in matched by directory name."""
    path = cfg.model.hf_path
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return _arch_from_file(path), os.path.basename(path.rstrip("/"))
    base = os.path.basename(path.rstrip("/")).lower()
    if base in _ALIASES:
        return _arch_from_name(base), base
    raise ConfigError(f"popo-plan: {cfg.source}: model.hf_path {path!r} has no config.json here and its name "
                      f"matches no built-in model ({', '.join(KNOWN_MODELS)}); pass --model or --hf-config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popo-plan", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help=f"built-in architecture: {', '.join(KNOWN_MODELS)}")
    src.add_argument("--hf-config", help="an HF config.json (or its directory)")
    p.add_argument("--config", help="a run config (configs/X.yaml): model, parallel and train settings; "
                                    "flags given explicitly override it")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--dp", type=int, help="data-parallel size (default: the config's placement, else 1)")
    p.add_argument("--ep", type=int, help="expert-parallel size (MoE models; divides DP and the experts)")
    p.add_argument("--expert-load", type=float, help="MoE: routed copies on the busiest rank / the balanced "
                   "T x top-k (default 1: balanced routing)")
    p.add_argument("--nodes", type=int, help="nodes, for the placement of a config that leaves placement.nodes unset")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, where placement.gpus_per_node is unset")
    p.add_argument("--fp8", action="store_true", default=None)
    p.add_argument("--micro-batch-tokens", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--recompute", choices=("full", "selective", "none"))
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--margin-gib", type=float, default=6.0)
    p.add_argument("--distributed-optimizer", dest="distributed_optimizer", action="store_true", default=None)
    p.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false")
    p.add_argument("--sequence-parallel", dest="sequence_parallel", action="store_true", default=None)
    p.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false")
    p.add_argument("--optimizer-cpu-offload", dest="optimizer_offload_fraction", type=float, nargs="?", const=1.0,
                   help="train.optimizer_cpu_offload: keep this fraction (default 1) of the optimizer's main params "
                   "and Adam m, v on the host (0: off)")
    p.add_argument("--impl", choices=("te", "local"), help="te: Transformer Engine layers with flash attention "
                   "(default, GPU); local: megatron's local spec + SDPAttention (the CPU path)")
    p.add_argument("--algorithm", choices=("popo", "grpo", "a3po"), help="grpo/a3po keep no EMA or predictor")
    p.add_argument("--json", help="also write the full plan as JSON to this path")
    return p


def resolve(args) -> tuple:
    """(Architecture, Layout, name, Placement or None) from parsed arguments (a --config supplies
    defaults, and its GPU placement the data-parallel size when its node count is known)."""
    kw: dict = {}
    arch = name = placement = None
    if args.config:
        from popo_mega.config import load_config
        from popo_mega.rollout.placement import place

        cfg = load_config(args.config)
        arch, name = _arch_from_run_config(cfg)
        if (cfg.placement.nodes or args.nodes) and (cfg.placement.gpus_per_node or args.gpus_per_node):
            placement = place(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
            kw["dp"] = placement.data_parallel
            kw["server_gpu_fraction"] = cfg.rollout.mem_fraction
        kw.update(tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline, ep=cfg.parallel.expert,
                  sequence_parallel=cfg.parallel.sequence_parallel,
                  distributed_optimizer=cfg.parallel.distributed_optimizer, fp8=cfg.model.fp8 is not None,
                  recompute=cfg.model.recompute_granularity or "none",
                  micro_batch_tokens=cfg.train.micro_batch_tokens, popo=cfg.algorithm.name == "popo",
                  predictor_hidden=cfg.algorithm.popo.predictor_hidden,
                  predictor_layers=cfg.algorithm.popo.predictor_layers,
                  make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
                  param_bytes=4 if cfg.model.dtype == "float32" else 2,
                  optimizer_offload_fraction=(cfg.train.optimizer_offload_fraction
                                              if cfg.train.optimizer_cpu_offload else 0.0),
                  seq_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    if args.model:
        arch, name = _arch_from_name(args.model), args.model
    elif args.hf_config:
        arch, name = _arch_from_file(args.hf_config), os.path.basename(os.path.dirname(os.path.abspath(args.hf_config)))
    if arch is None:
        raise ConfigError("popo-plan: give --model, --hf-config or --config")
    for flag in ("tp", "pp", "dp", "ep", "expert_load", "fp8", "micro_batch_tokens", "seq_len", "recompute", "gpu_mem_gib", "margin_gib",
                 "distributed_optimizer", "sequence_parallel", "impl", "optimizer_offload_fraction"):
        value = getattr(args, flag)
        if value is not None:
            kw[flag] = value
    if args.algorithm:
        kw["popo"] = args.algorithm == "popo"
    gpn = args.gpus_per_node or (cfg.placement.gpus_per_node if args.config else None)
    if gpn:
        kw["gpus_per_node"] = gpn
    kw.pop("server_gpu_fraction", None)
    return arch, Layout(**kw), name, placement


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        arch, layout, name, placement = resolve(args)
        result = plan(arch, layout)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result, name))
    if placement is not None:
        from popo_mega.rollout.placement import format_placement

        print(format_placement(placement))
        if placement.servers:
            print(format_server_memory(arch, layout, result, placement))
    elif args.config:
        print("placement: decided at launch (placement.nodes / placement.gpus_per_node unset; "
              "give --nodes and --gpus-per-node to see it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"name": name, **result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
