"""Build megatron-core ``GPTModel``s for the registered families (popo_mega.model.families) from an HF config.

    arch  = Architecture.from_hf(read_hf_config(path), source=path)        # what the HF config says
    model = build_gpt_model(arch, model_cfg, tp=2, pp=1, pp_rank=0, ep=1)   # this rank's shard

The model code is megatron's; this module only translates the :class:`Architecture` (RMSNorm eps,
QKV bias, QK-norm, GQA and head_dim, rope base and llama3 rope scaling, tied or untied embeddings,
routed experts) into a ``TransformerConfig`` and picks the layer spec: Transformer Engine's when TE
imports (FP8 settings pass through), otherwise megatron's local spec with
:class:`~popo_mega.model.attention.SDPAttention` and :class:`~popo_mega.model.norm.RMSNorm` (both
support sequence parallelism; the RMSNorm also serves as Qwen3's per-head q/k norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from popo_mega.config import ConfigError, ModelConfig
from popo_mega.model.families import SUPPORTED_MODEL_TYPES, Architecture  # noqa: F401  (re-exported)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def moe_settings(arch: Architecture, ep: int = 1) -> dict:
    """megatron-core's MoE arguments for ``arch`` ({} for a dense model).

    Routing as HF Qwen3-MoE's: softmax over all experts, top-k; with ``norm_topk_prob`` the k
    probabilities are renormalised, which equals megatron's softmax over the top-k logits
    (``moe_router_pre_softmax=False``); without it megatron's pre-softmax top-k keeps them as they
    are. Dropless (no capacity factor), tokens exchanged by all-to-all over the EP group.
    Load balancing: megatron's per-layer ``aux_loss`` (E * sum_e f_e * P_e per layer) weighted by HF's
    ``router_aux_loss_coef``; HF computes its loss once over all layers' router logits concatenated
    (and only with ``output_router_logits``), so the weight is HF's, the per-layer form megatron's.
    """
    if not arch.is_moe:
        if ep != 1:
            raise ConfigError(f"expert parallelism {ep} needs a mixture-of-experts model ({arch.model_type} is dense)")
        return {}
    coef = arch.moe_aux_loss_coef
    return dict(num_moe_experts=arch.num_experts, moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
                moe_router_topk=arch.moe_top_k, moe_router_score_function="softmax",
                moe_router_pre_softmax=not arch.moe_norm_topk_prob,
                moe_router_load_balancing_type="aux_loss" if coef > 0 else "none", moe_aux_loss_coeff=coef,
                moe_grouped_gemm=False, moe_permute_fusion=False, moe_router_fusion=False,
                expert_model_parallel_size=ep)


def transformer_config(arch: Architecture, model_cfg: ModelConfig, tp: int = 1, pp: int = 1,
                       sequence_parallel: bool = False, use_te: bool = False, use_cpu_init: bool | None = None,
                       ep: int = 1):
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
        add_qkv_bias=arch.qkv_bias, qk_layernorm=arch.qk_norm, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=use_cpu_init, variable_seq_lengths=True, moe_token_dispatcher_type="alltoall", deallocate_pipeline_outputs=True,
        **fp8, **recompute, **moe_settings(arch, ep))


def layer_spec(use_te: bool, arch: Architecture | None = None):
    """TE's fused spec, or megatron's local spec with SDPA attention (works on CPU and GPU) and our
    :class:`~popo_mega.model.norm.RMSNorm` (megatron's torch-norm fallback refuses sequence parallelism)
    for the layer norms and QK-norm. MoE layers use megatron's ``MoELayer`` with ``SequentialMLP``
    experts in both specs (grouped GEMM is not wired: its weights have other names)."""
    qk_norm = bool(arch and arch.qk_norm)
    experts = arch.num_experts if arch is not None and arch.is_moe else None
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        # SequentialMLP experts under TE too: TE's grouped GEMM names its weights linear_fc1.weight<e>,
        # which the weight tables do not map yet (and moe_grouped_gemm is off in transformer_config).
        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=False,
                                                          qk_layernorm=qk_norm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from popo_mega.model.attention import SDPAttention
    from popo_mega.model.norm import RMSNorm

    spec = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=qk_norm,
                                    normalization="RMSNorm")
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if qk_norm:
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


def block_spec(use_te: bool, config, pp_rank: int, arch: Architecture | None = None):
    """The decoder spec for this pipeline stage. For the local spec it names the final norm too:
    given a bare layer spec, megatron's TransformerBlock picks its module-level fallback norm."""
    spec = layer_spec(use_te, arch)
    if use_te:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from popo_mega.model.norm import RMSNorm

    n = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


def _moe_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router GEMM (``moe_utils.RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None``, a name bound only when Transformer Engine imports: without TE
    every MoE forward raises NameError (CPU, or a GPU without TE). Binding it to None selects the
    torch.mm path that the same function already has."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(arch: Architecture, model_cfg: ModelConfig, tp: int = 1, pp: int = 1, pp_rank: int = 0,
                    sequence_parallel: bool = False, te_available: bool | None = None, ep: int = 1):
    """This rank's ``GPTModel`` shard (parallel_state must be initialised for this TP/PP layout).

    The output layer keeps its logits vocab-parallel ([s, b, V_padded/tp]): log-probs and entropy
    are computed on the shards (popo_mega.model.logprobs), never on a gathered vocabulary.
    """
    from megatron.core.models.gpt import GPTModel

    use_te = use_transformer_engine(model_cfg, te_available)
    if arch.is_moe:
        _moe_without_transformer_engine()
    config = transformer_config(arch, model_cfg, tp, pp, sequence_parallel, use_te, ep=ep)
    model = GPTModel(
        config=config, transformer_layer_spec=block_spec(use_te, config, pp_rank, arch),
        vocab_size=padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by, tp),
        max_sequence_length=arch.max_position_embeddings, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1,
        parallel_output=True, share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope", rotary_percent=1.0, rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
