"""A tiny random Qwen2 saved with ``save_pretrained``: the model the rollout tests, the rollout
benchmark and CPU smoke runs serve (nothing is downloaded)."""

from __future__ import annotations


def save_tiny_qwen2(path: str, *, seed: int = 0, vocab_size: int = 64, hidden_size: int = 32,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                    intermediate_size: int = 64, tie_word_embeddings: bool = False,
                    eos_token_id: int | None = None) -> str:
    """Write a random fp32 Qwen2ForCausalLM (config.json + model.safetensors) to ``path``; return it.

    ``eos_token_id`` None means no EOS (generation stops only on stop tokens or length).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=tie_word_embeddings, eos_token_id=eos_token_id,
                         bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen it so logits are not all ~uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path
