"""HF <-> Megatron weight tables: one row per Megatron parameter, naming its HF tensors and sharding.

A :class:`WeightRule` says: megatron parameter ``mcore`` (``{j}``: the stage-local layer,
``{e}``: the expert local to this expert-parallel rank) is made of the HF tensors ``hf`` (``{i}``:
the global layer ``j + pp_rank * layers_per_stage``, ``{x}``: the global expert
``e + ep_rank * experts_per_rank``), sharded over tensor parallelism as ``shard`` says:

    replicated   every TP rank holds the whole tensor (norms, the MoE router)
    vocab        rows of the vocabulary padded to a multiple of divisible_by * tp, split by TP
    qkv          q/k/v stacked GROUPED per KV group [q heads of the group..., k, v]; TP rank r
                 holds groups r*G/tp..(r+1)*G/tp (a plain [Q;K;V] concatenation is wrong)
    gate_up      SwiGLU fc1 = cat(gate, up); TP rank r holds [gate_r; up_r] (megatron's stride 2)
    cols         the input dimension (dim 1) split by TP (row-parallel linears: o_proj, down_proj)

Expert weights are sharded over TP by megatron's expert-tensor-parallel group, whose size is TP
unless set otherwise (``ModelParallelConfig.expert_tensor_parallel_size``; popo_mega keeps the
default), and split over expert parallelism by whole experts.

Loading (:func:`read_shard`) and export (:func:`export_tensors`) both read these tables
(popo_mega.model.hf); a family's table is its complete list (popo_mega.model.families).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


class HFCheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class WeightRule:
    mcore: str                  # megatron name pattern ({j} stage-local layer, {e} EP-local expert)
    hf: tuple[str, ...]         # HF name patterns ({i} global layer, {x} global expert)
    shard: str                  # replicated | vocab | qkv | gate_up | cols
    tied: str | None = None     # the HF tensor that stands in when the embeddings are tied (output layer)
    pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.shard not in SHARDINGS:
            raise ValueError(f"unknown sharding {self.shard!r} for {self.mcore}")
        rx = re.escape(self.mcore).replace(r"\{j\}", r"(?P<j>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        object.__setattr__(self, "pattern", re.compile(f"^{rx}$"))

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.mcore

    def hf_names(self, match: re.Match, layout) -> list[str]:
        """The HF names of this parameter on ``layout``'s (pp_rank, ep_rank)."""
        g = match.groupdict()
        i = layout.layer_offset + int(g["j"]) if "j" in g else None
        x = layout.ep_rank * layout.experts_per_rank + int(g["e"]) if "e" in g else None
        return [n.format(i=i, x=x) for n in self.hf]


SHARDINGS = ("replicated", "vocab", "qkv", "gate_up", "cols")


def find_rule(table: tuple[WeightRule, ...], mcore_name: str) -> tuple[WeightRule, re.Match]:
    for rule in table:
        m = rule.pattern.match(mcore_name)
        if m:
            return rule, m
    raise HFCheckpointError(f"no HF name for megatron parameter '{mcore_name}' in this family's weight table")


# --------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------

_L, _D = "decoder.layers.{j}.", "model.layers.{i}."

_GLOBAL = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    WeightRule("output_layer.weight", ("lm_head.weight",), "vocab", tied="model.embed_tokens.weight"),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"),
)
_NORMS = (   # local spec names, then the Transformer Engine spec's (norm fused into the next linear)
    WeightRule(_L + "input_layernorm.weight", (_D + "input_layernorm.weight",), "replicated"),
    WeightRule(_L + "self_attention.linear_qkv.layer_norm_weight", (_D + "input_layernorm.weight",), "replicated"),
    WeightRule(_L + "pre_mlp_layernorm.weight", (_D + "post_attention_layernorm.weight",), "replicated"),
    WeightRule(_L + "mlp.linear_fc1.layer_norm_weight", (_D + "post_attention_layernorm.weight",), "replicated"),
)
_ATTENTION = (
    WeightRule(_L + "self_attention.linear_qkv.weight",
               tuple(_D + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    WeightRule(_L + "self_attention.linear_proj.weight", (_D + "self_attn.o_proj.weight",), "cols"),
)
_QKV_BIAS = (
    WeightRule(_L + "self_attention.linear_qkv.bias", tuple(_D + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
)
_QK_NORM = (
    WeightRule(_L + "self_attention.q_layernorm.weight", (_D + "self_attn.q_norm.weight",), "replicated"),
    WeightRule(_L + "self_attention.k_layernorm.weight", (_D + "self_attn.k_norm.weight",), "replicated"),
)
_DENSE_MLP = (
    WeightRule(_L + "mlp.linear_fc1.weight", (_D + "mlp.gate_proj.weight", _D + "mlp.up_proj.weight"), "gate_up"),
    WeightRule(_L + "mlp.linear_fc2.weight", (_D + "mlp.down_proj.weight",), "cols"),
)
_E, _X = _L + "mlp.experts.local_experts.{e}.", _D + "mlp.experts.{x}."
_MOE_MLP = (   # megatron's SequentialMLP experts (local spec, moe_grouped_gemm off) and top-k router
    WeightRule(_L + "mlp.router.weight", (_D + "mlp.gate.weight",), "replicated"),
    WeightRule(_E + "linear_fc1.weight", (_X + "gate_proj.weight", _X + "up_proj.weight"), "gate_up"),
    WeightRule(_E + "linear_fc2.weight", (_X + "down_proj.weight",), "cols"),
)

QWEN2 = _GLOBAL + _NORMS + _ATTENTION + _QKV_BIAS + _DENSE_MLP
LLAMA = _GLOBAL + _NORMS + _ATTENTION + _DENSE_MLP
QWEN3 = _GLOBAL + _NORMS + _ATTENTION + _QK_NORM + _DENSE_MLP
QWEN3_MOE = _GLOBAL + _NORMS + _ATTENTION + _QK_NORM + _MOE_MLP


# --------------------------------------------------------------------------------------------
# HF -> this rank's shard
# --------------------------------------------------------------------------------------------

def _vocab_rows(reader, name: str, layout) -> torch.Tensor:
    """Rows [lo, hi) of the padded vocabulary; rows past the real vocabulary are zeros."""
    lo, hi = layout.vocab_rows()
    real = layout.arch.vocab_size
    rows = reader.slice(name)[lo:min(hi, real)] if lo < real else None
    width = reader.shape(name)[1]
    out = torch.zeros(hi - lo, width, dtype=rows.dtype if rows is not None else torch.float32)
    if rows is not None:
        out[: rows.shape[0]] = rows
    return out


def read_shard(rule: WeightRule, names: list[str], reader, layout) -> torch.Tensor:
    """This (tp_rank) shard of the parameter made of HF tensors ``names``, reading only its slices."""
    r, tp, arch = layout.tp_rank, layout.tp, layout.arch
    if rule.shard == "replicated":
        return reader.slice(names[0])[:]
    if rule.shard == "vocab":
        name = names[0]
        if rule.tied is not None and (arch.tie_embeddings or name not in reader):
            name = rule.tied
        return _vocab_rows(reader, name, layout)
    if rule.shard == "qkv":
        hd, n, qpg = arch.head_dim, layout.groups_per_rank, layout.q_per_group
        g0, g1 = r * n, (r + 1) * n
        q = reader.slice(names[0])[g0 * qpg * hd:g1 * qpg * hd]
        k = reader.slice(names[1])[g0 * hd:g1 * hd]
        v = reader.slice(names[2])[g0 * hd:g1 * hd]
        tail = q.shape[1:]
        return torch.cat([q.reshape(n, qpg * hd, *tail), k.reshape(n, hd, *tail), v.reshape(n, hd, *tail)],
                         dim=1).reshape(n * (qpg + 2) * hd, *tail)
    if rule.shard == "gate_up":
        f = reader.shape(names[0])[0] // tp
        return torch.cat([reader.slice(names[0])[r * f:(r + 1) * f], reader.slice(names[1])[r * f:(r + 1) * f]], dim=0)
    if rule.shard == "cols":
        c = reader.shape(names[0])[1] // tp
        return reader.slice(names[0])[:, r * c:(r + 1) * c]
    raise AssertionError(rule.shard)


# --------------------------------------------------------------------------------------------
# TP shards -> HF tensors
# --------------------------------------------------------------------------------------------

def export_tensors(rule: WeightRule, names: list[str], parts: list[torch.Tensor], layout,
                   include_tied_output: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The HF (name, tensor) pairs of one parameter from its TP shards ``parts`` (in TP-rank order).

    The tied output layer gives nothing unless ``include_tied_output`` (HF ties it to the embeddings).
    """
    arch = layout.arch
    if rule.shard == "replicated":
        return [(names[0], parts[0])]
    if rule.shard == "vocab":
        if rule.tied is not None and arch.tie_embeddings and not include_tied_output:
            return []
        return [(names[0], torch.cat(parts, dim=0)[:arch.vocab_size])]
    if rule.shard == "qkv":
        full = torch.cat(parts, dim=0)
        hd, ng, qpg, tail = arch.head_dim, arch.num_kv_heads, layout.q_per_group, full.shape[1:]
        q, k, v = full.reshape(ng, (qpg + 2) * hd, *tail).split([qpg * hd, hd, hd], dim=1)
        return [(names[0], q.reshape(ng * qpg * hd, *tail)), (names[1], k.reshape(ng * hd, *tail)),
                (names[2], v.reshape(ng * hd, *tail))]
    if rule.shard == "gate_up":
        f = parts[0].shape[0] // 2
        return [(names[0], torch.cat([s[:f] for s in parts], dim=0)), (names[1], torch.cat([s[f:] for s in parts], dim=0))]
    if rule.shard == "cols":
        return [(names[0], torch.cat(parts, dim=1))]
    raise AssertionError(rule.shard)
