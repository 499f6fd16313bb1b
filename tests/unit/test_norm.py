"""popo_mega.model.norm.RMSNorm: the norm of the local layer spec, usable under sequence parallelism.

The expected output is HF Qwen2/Llama's RMSNorm written out in float64: x / sqrt(mean(x^2) + eps) * w.
"""

import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from popo_mega.model.norm import RMSNorm


def _config(**kw):
    base = dict(num_layers=1, hidden_size=8, num_attention_heads=2, normalization="RMSNorm")
    return TransformerConfig(**{**base, **kw})


def test_weight_is_marked_for_the_tp_all_reduce_only_under_sp():
    # megatron's finalize_model_grads sums over TP the grads of parameters with sequence_parallel=True
    sp = RMSNorm(_config(tensor_model_parallel_size=2, sequence_parallel=True), 8, eps=1e-6)
    assert sp.weight.sequence_parallel is True
    plain = RMSNorm(_config(tensor_model_parallel_size=2), 8, eps=1e-6)
    assert plain.weight.sequence_parallel is False
    # HF conversion and checkpoints see torch's RMSNorm names; the weight is in the model's dtype
    assert list(sp.state_dict()) == ["weight"]
    assert RMSNorm(_config(params_dtype=torch.bfloat16, bf16=True), 8).weight.dtype == torch.bfloat16


def test_forward_is_hf_rmsnorm():
    norm = RMSNorm(_config(), 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0))     # [s, b, h]
    xd = x.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert torch.allclose(norm(x).double(), expected, atol=1e-6)


def test_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="normalization='LayerNorm'"):
        RMSNorm(_config(normalization="LayerNorm"), 8)
    with pytest.raises(ValueError, match="zero-centered gamma"):
        RMSNorm(_config(layernorm_zero_centered_gamma=True), 8)
