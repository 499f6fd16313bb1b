"""Build megatron-core ``GPTModel``s for the Qwen2 / Qwen2.5 and Llama-3 families from an HF config.

    arch  = Architecture.from_hf(read_hf_config(path), source=path)   # what the HF config says
    model = build_gpt_model(arch, model_cfg, tp=2, pp=1, pp_rank=0)    # this rank's shard

The model code is megatron's; this module only translates the HF config (RMSNorm eps, QKV bias,
GQA, rope base and llama3 rope scaling, tied or untied embeddings) into a ``TransformerConfig``
and picks the layer spec: Transformer Engine's when TE imports (FP8 settings pass through),
otherwise megatron's local spec with :class:`~popo_mega.model.attention.SDPAttention` and
:class:`~popo_mega.model.norm.RMSNorm` (both support sequence parallelism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from popo_mega.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Architecture:
    """The facts of an HF Qwen2/Llama config that the Megatron model needs."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    rope_theta: float
    rope_scaling_factor: float | None   # llama3-style scaling factor, None when absent
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Architecture":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2/Qwen2.5, Llama-3)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu / SwiGLU)")
        if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ConfigError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        # transformers >= 5 writes rope_parameters; released checkpoints carry rope_theta/rope_scaling.
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
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   ffn_hidden_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
                   norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=(model_type == "qwen2"),
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling_factor=scaling,
                   max_position_embeddings=hf.get("max_position_embeddings", 4096))


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp`` (151,936 -> 152,576 at TP=8)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except Exception:
        return False
    return True


def use_transformer_engine(model_cfg: ModelConfig, te_available: bool | None = None) -> bool:
    """Whether to build with the TE layer spec; asking for TE or FP8 without TE is a clear error."""
    te = transformer_engine_available() if te_available is None else te_available
    if model_cfg.transformer_impl == "transformer_engine" and not te:
        raise ConfigError("model.transformer_impl: transformer_engine was asked for but Transformer Engine does "
                          "not import; install it on a CUDA machine with `pip install -e .[te]`")
    if model_cfg.fp8 is not None and not (te and model_cfg.transformer_impl != "local"):
        raise ConfigError(f"model.fp8: {model_cfg.fp8!r} needs Transformer Engine (not importable here, or "
                          "model.transformer_impl is local); install it with `pip install -e .[te]` on a CUDA machine")
    return model_cfg.transformer_impl != "local" and te


def transformer_config(arch: Architecture, model_cfg: ModelConfig, tp: int = 1, pp: int = 1,
                       sequence_parallel: bool = False, use_te: bool = False, use_cpu_init: bool | None = None):
    """The ``TransformerConfig`` for ``arch`` at this layout (dropout off: RL fine-tuning)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = _DTYPES[model_cfg.dtype]
    fp8 = {}
    if model_cfg.fp8 is not None:
        fp8 = dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe,
                   fp8_amax_history_len=model_cfg.fp8_amax_history_len,
                   fp8_amax_compute_algo=model_cfg.fp8_amax_compute_algo)
    recompute = {}
    if model_cfg.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    if use_cpu_init is None:
        use_cpu_init = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=arch.norm_eps, add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=use_cpu_init, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall", deallocate_pipeline_outputs=True,
        **fp8, **recompute)


def layer_spec(use_te: bool):
    """TE's fused spec, or megatron's local spec with SDPA attention (works on CPU and GPU) and our
    :class:`~popo_mega.model.norm.RMSNorm` (megatron's torch-norm fallback refuses sequence parallelism)."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from popo_mega.model.attention import SDPAttention
    from popo_mega.model.norm import RMSNorm

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def block_spec(use_te: bool, config, pp_rank: int):
    """The decoder spec for this pipeline stage. For the local spec it names the final norm too:
    given a bare layer spec, megatron's TransformerBlock picks its module-level fallback norm."""
    spec = layer_spec(use_te)
    if use_te:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from popo_mega.model.norm import RMSNorm

    n = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


def build_gpt_model(arch: Architecture, model_cfg: ModelConfig, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                    sequence_parallel: bool = False, te_available: bool | None = None):
    """This rank's ``GPTModel`` shard (parallel_state must be initialised for this TP/PP layout).

    The output layer keeps its logits vocab-parallel ([s, b, V_padded/tp]): log-probs and entropy
    are computed on the shards (popo_mega.model.logprobs), never on a gathered vocabulary.
    """
    from megatron.core.models.gpt import GPTModel

    use_te = use_transformer_engine(model_cfg, te_available)
    config = transformer_config(arch, model_cfg, tp, pp, sequence_parallel, use_te)
    model = GPTModel(
        config=config, transformer_layer_spec=block_spec(use_te, config, pp_rank),
        vocab_size=padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=arch.max_position_embeddings, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
