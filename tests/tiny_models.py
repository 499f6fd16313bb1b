"""Tiny random HF checkpoints built with transformers configs (nothing is downloaded)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def qwen2_config(**over) -> Qwen2Config:
    """Qwen2 with QKV bias and GQA (4 query heads, 2 KV groups), untied embeddings."""
    kw = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    kw.update(over)
    return Qwen2Config(**kw)


def llama3_config(**over) -> LlamaConfig:
    """Llama-3.2 style: tied embeddings, GQA, llama3 rope scaling, no biases."""
    kw = dict(vocab_size=263, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=True,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    kw.update(over)
    return LlamaConfig(**kw)


def save_tiny(config, path, seed=0, dtype=torch.float32, max_shard_size=None):
    """Random weights (biases made non-zero so a wrong bias mapping cannot hide), saved as safetensors."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kw)
    return model.eval()


def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def qwen3_config(**over):
    """Qwen3 dense: QK-norm, no QKV bias, head_dim 32 != hidden/heads (64/4 = 16), tied embeddings (as the
    0.6B-4B sizes), GQA."""
    from transformers import Qwen3Config

    kw = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rope_theta=1000000.0,
              rms_norm_eps=1e-6, tie_word_embeddings=True)
    kw.update(over)
    return Qwen3Config(**kw)


def qwen3_moe_config(**over):
    """Qwen3-MoE: 4 experts, top-2 with renormalised probabilities (norm_topk_prob, as Qwen3-30B-A3B),
    QK-norm, head_dim 32, untied embeddings, the HF default router_aux_loss_coef (0.001)."""
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=251, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
              norm_topk_prob=True, max_position_embeddings=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    kw.update(over)
    return Qwen3MoeConfig(**kw)
