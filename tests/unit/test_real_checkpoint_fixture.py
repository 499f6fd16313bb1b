"""The miniature real checkpoints (tests/real_checkpoints.py) hold what a real one does, and load
through popo_mega's two consumers: the Megatron loader (``build_from_hf``) and the embedded server.

Expected token ids are facts of the released tokenizers (Qwen2.5: "Hello world" = 9707 1879,
<|im_start|> = 151644, <|im_end|> = 151645; Llama-3: <|begin_of_text|> = 128000, "Hello world" =
9906 1917), not outputs of the code under test.
"""

import json
import os

import pytest
import torch

from tests.multiprocess import run_world
from tests.real_checkpoints import LLAMA3_VOCAB, QWEN25_VOCAB


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_qwen25_checkpoint_has_the_real_tokenizer_and_vocabulary(real_qwen25_checkpoint):
    ckpt = real_qwen25_checkpoint
    config = json.load(open(os.path.join(ckpt.path, "config.json")))
    assert (config["model_type"], config["vocab_size"], config["tie_word_embeddings"]) == ("qwen2", 151936, False)
    assert config["rope_parameters"]["rope_theta"] == 1e6 and config["rms_norm_eps"] == 1e-6
    tok = _tokenizer(ckpt.path)
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert tok.eos_token_id == config["eos_token_id"] == 151645
    assert len(tok) <= QWEN25_VOCAB  # every id the tokenizer can produce has an embedding row
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_checkpoint_has_the_real_tokenizer_and_vocabulary(real_llama3_checkpoint):
    ckpt = real_llama3_checkpoint
    config = json.load(open(os.path.join(ckpt.path, "config.json")))
    assert (config["model_type"], config["vocab_size"], config["tie_word_embeddings"]) == ("llama", 128256, True)
    assert config["rope_parameters"]["rope_type"] == "llama3"
    tok = _tokenizer(ckpt.path)
    assert tok.encode("Hello world") == [128000, 9906, 1917]  # the BOS is added, as Llama-3 does
    assert tok.eos_token_id == config["eos_token_id"] == 128001
    assert max(tok.encode("<|eot_id|> x <|end_of_text|>")) < LLAMA3_VOCAB


def _megatron_logits(rank, world_size, paths, ids):
    from popo_mega.config import ModelConfig
    from popo_mega.model.forward import forward_only
    from popo_mega.model.loader import build_from_hf, gather_vocab
    from popo_mega.runtime import initialize

    rt = initialize(1, 1, seed=0, device="cpu")
    out = {}
    for name, path in paths.items():
        loaded = build_from_hf(ModelConfig(hf_path=path, dtype="float32"), rt)
        tokens = ids[name]
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        res = forward_only(loaded.model, [{"tokens": tokens, "position_ids": pos}],
                           lambda o, b: gather_vocab(o, loaded.arch.vocab_size))
        out[name] = (loaded.arch.vocab_size, res[0])
    return out


def test_megatron_loader_builds_both_checkpoints_and_matches_hf(real_qwen25_checkpoint, real_llama3_checkpoint):
    from transformers import AutoModelForCausalLM

    paths = {"qwen2.5": real_qwen25_checkpoint.path, "llama3": real_llama3_checkpoint.path}
    text = {"qwen2.5": "<|im_start|>user\nThe answer to 17 * 3 is<|im_end|>", "llama3": "The answer to 17 * 3 is"}
    ids = {k: torch.tensor([_tokenizer(p).encode(text[k])]) for k, p in paths.items()}
    assert ids["llama3"][0, 0] == 128000 and ids["qwen2.5"].max() == 151645  # real ids, high in the vocabulary
    got = run_world(_megatron_logits, 1, paths, ids)[0]
    for name, path in paths.items():
        vocab, logits = got[name]
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(ids[name]).logits
        assert vocab == hf.config.vocab_size and logits.shape == ref.shape
        assert ref.std() > 1.0  # peaked, non-trivial logits
        assert (logits - ref).abs().max().item() < 1e-3, name


def test_embedded_server_serves_the_qwen25_checkpoint(real_qwen25_checkpoint, tmp_path):
    """A chat prompt from the real template through popo-rollout-server: seeded samples repeat,
    ids stay in the vocabulary, log-probs equal an HF teacher-forcing pass over the full 151,936 ids."""
    from transformers import AutoModelForCausalLM

    from popo_mega.rollout.engine import SamplingParams
    from popo_mega.rollout.http_engine import HttpEngine
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers

    path = real_qwen25_checkpoint.path
    tok = _tokenizer(path)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 6 * 7?"}], tokenize=False,
                                                add_generation_prompt=True))
    assert prompt[0] == 151644  # <|im_start|>
    servers = launch_servers("embedded", path, device="cpu", log_dir=str(tmp_path), health_timeout_s=240,
                             extra_args=("--enable-deterministic-inference",))  # honour sampling_seed, as SGLang
    try:
        engine = HttpEngine([servers[0].url], request_timeout_s=240)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
        first, again = (engine.generate([prompt, prompt[:5]], sampling)[0][0] for _ in range(2))
    finally:
        stop_servers(servers)
    assert first.output_ids == again.output_ids and len(first.output_ids) == 8
    assert all(0 <= t < QWEN25_VOCAB for t in first.output_ids)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    full = torch.tensor([prompt + first.output_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].double(), dim=-1)
    ref = logp[len(prompt) - 1:-1].gather(-1, full[0, len(prompt):, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(first.output_logprobs, dtype=torch.float64), ref, atol=1e-4)
