"""The registry of model families: what an HF ``config.json`` means for the Megatron model.

    arch = Architecture.from_hf(hf_config, source="ckpt/config.json")   # picks the family by model_type
    FAMILIES["qwen3_moe"].weights                                       # its HF <-> Megatron weight table

One :class:`Family` per HF ``model_type``: ``parse`` turns the HF config into an
:class:`Architecture` (the facts the ``TransformerConfig`` and the layer spec are built from, in
popo_mega.model.builder), refusing with a named error whatever the Megatron model would compute
differently; ``weights`` is the family's ONE table of HF <-> Megatron names and shardings
(popo_mega.model.weight_table), from which both loading and export derive (popo_mega.model.hf).

Adding a family is one ``parse`` function and one table here; nothing in the builder or the
converter branches on the family name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from popo_mega.config import ConfigError
from popo_mega.model import weight_table as wt


@dataclass(frozen=True)
class Architecture:
    """The facts of an HF config that the Megatron model needs (dense and MoE families)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int                       # kv_channels: Qwen3 sets it apart from hidden / heads
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    rope_theta: float
    rope_scaling_factor: float | None   # llama3-style scaling factor, None when absent
    max_position_embeddings: int
    qk_norm: bool = False               # RMSNorm over each head's q and k (Qwen3: q_norm / k_norm)
    num_experts: int = 0                # 0: dense MLP in every layer; else routed experts in every layer
    moe_ffn_hidden_size: int = 0        # one expert's intermediate size
    moe_top_k: int = 0                  # experts per token
    moe_norm_topk_prob: bool = True     # renormalise the top-k softmax probabilities (HF norm_topk_prob)
    moe_aux_loss_coef: float = 0.0      # load-balancing loss weight (HF router_aux_loss_coef)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def family(self) -> "Family":
        return FAMILIES[self.model_type]

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Architecture":
        return family_for(hf, source).parse(hf, source)


@dataclass(frozen=True)
class Family:
    model_type: str                                     # HF config's model_type
    description: str                                    # the checkpoints it covers
    parse: Callable[[dict, str], Architecture]          # HF config -> Architecture (named errors)
    weights: tuple[wt.WeightRule, ...]                  # HF <-> Megatron names and shardings


def family_for(hf: dict, source: str = "config.json") -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.model_type} ({f.description})" for f in FAMILIES.values())
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported: {supported}")
    return FAMILIES[model_type]


# --------------------------------------------------------------------------------------------
# Parsing HF configs
# --------------------------------------------------------------------------------------------

def _rope(hf: dict, source: str) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None). transformers >= 5 writes ``rope_parameters``;
    released checkpoints carry ``rope_theta`` / ``rope_scaling``."""
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:
        rope = dict(hf.get("rope_scaling") or {})
        rope["rope_theta"] = hf.get("rope_theta", 10000.0)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, want in expected.items():
            if float(rope.get(key, want)) != want:
                raise ConfigError(f"{source}: llama3 rope scaling with {key}={rope[key]} is not supported "
                                  f"(megatron-core fixes it at {want})")
        scaling = float(rope["factor"])
    elif rope_type not in ("default", None):
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (default or llama3)")
    return float(rope.get("rope_theta", 10000.0)), scaling


def _dense(hf: dict, source: str, *, qkv_bias: bool, qk_norm: bool = False) -> Architecture:
    """The fields every family shares: SwiGLU MLP, RMSNorm, rope, GQA."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu / SwiGLU)")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not supported")
    theta, scaling = _rope(hf, source)
    heads = hf["num_attention_heads"]
    return Architecture(
        model_type=hf["model_type"], vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta, rope_scaling_factor=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096), qk_norm=qk_norm)


def _parse_qwen2(hf: dict, source: str) -> Architecture:
    return _dense(hf, source, qkv_bias=True)


def _parse_llama(hf: dict, source: str) -> Architecture:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
    return _dense(hf, source, qkv_bias=False)


def _no_attention_bias(hf: dict, source: str) -> None:
    # HF Qwen3's attention_bias puts a bias on q/k/v AND o_proj; megatron's add_qkv_bias covers q/k/v only.
    if hf.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not supported for {hf['model_type']} "
                          "(released Qwen3 checkpoints have none)")


def _parse_qwen3(hf: dict, source: str) -> Architecture:
    _no_attention_bias(hf, source)
    return _dense(hf, source, qkv_bias=False, qk_norm=True)


def _parse_qwen3_moe(hf: dict, source: str) -> Architecture:
    """Qwen3-MoE: routed experts in every layer (``decoder_sparse_step`` 1, no ``mlp_only_layers``,
    as in Qwen3-30B-A3B and Qwen3-235B-A22B), softmax top-k routing, no shared expert."""
    _no_attention_bias(hf, source)
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise ConfigError(f"{source}: decoder_sparse_step={hf.get('decoder_sparse_step')} / mlp_only_layers="
                          f"{hf.get('mlp_only_layers')} (dense layers between MoE layers) is not supported")
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers >= 5 writes num_local_experts
    if not experts or experts < 1:
        raise ConfigError(f"{source}: qwen3_moe needs num_experts >= 1, got {experts!r}")
    top_k = hf.get("num_experts_per_tok", 8)
    if not 1 <= top_k <= experts:
        raise ConfigError(f"{source}: num_experts_per_tok={top_k} must be in [1, num_experts={experts}]")
    base = _dense(hf, source, qkv_bias=False, qk_norm=True)
    return Architecture(**{**base.__dict__, "num_experts": int(experts),
                           "moe_ffn_hidden_size": hf["moe_intermediate_size"], "moe_top_k": int(top_k),
                           "moe_norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                           "moe_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0))})


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2", "Qwen2/Qwen2.5", _parse_qwen2, wt.QWEN2),
    Family("llama", "Llama-3", _parse_llama, wt.LLAMA),
    Family("qwen3", "Qwen3 dense", _parse_qwen3, wt.QWEN3),
    Family("qwen3_moe", "Qwen3-MoE", _parse_qwen3_moe, wt.QWEN3_MOE),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
