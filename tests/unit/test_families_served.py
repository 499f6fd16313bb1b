"""The embedded rollout server's model (transformers) with Qwen3 and Qwen3-MoE checkpoints.

* generation: ``generate_batch`` (the server's sampler, K/V cache and all) returns log-probs equal to a
  teacher-forced forward of the same model, for both families;
* weights: checkpoint / export names reach the served tensors. For Qwen3-MoE transformers 5 holds the
  experts fused, so popo_mega.model.served_names maps the per-expert names to views; writing a
  second checkpoint through them gives exactly the model transformers loads from it;
* the server's own /update_weights_from_disk reader on Qwen3 (dense), and on Qwen3-MoE, whose
  per-expert checkpoint names the server maps onto the fused experts through served_names: after
  loading a second checkpoint the served model's logits equal transformers' load of it.
"""

import pytest
import torch
from safetensors.torch import load_file

from popo_mega.model.served_names import checkpoint_tensors
from tests.tiny_models import qwen3_config, qwen3_moe_config, save_tiny

CONFIGS = {"qwen3": qwen3_config, "qwen3_moe": qwen3_moe_config}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    out = {}
    for name, make in CONFIGS.items():
        save_tiny(make(), root / f"{name}_a", seed=0)
        save_tiny(make(), root / f"{name}_b", seed=5)
        out[name] = (str(root / f"{name}_a"), str(root / f"{name}_b"))
    return out


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", list(CONFIGS))
def test_generation_logprobs_equal_teacher_forcing(dirs, family):
    from popo_mega.rollout.generation import SequenceRequest, generate_batch

    model = _hf(dirs[family][0])
    seqs = [SequenceRequest(prompt=[5, 6, 7, 8], max_new_tokens=6), SequenceRequest(prompt=[9, 3], max_new_tokens=6)]
    generate_batch(model, seqs, pad_token_id=0, eos_token_ids=frozenset(), generator=torch.Generator().manual_seed(1),
                   device=torch.device("cpu"))
    for s in seqs:
        assert len(s.output_ids) == 6
        ids = torch.tensor([s.prompt + s.output_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        teacher = logp[len(s.prompt) - 1:-1].gather(-1, ids[0, len(s.prompt):, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.output_logprobs, dtype=torch.float64), teacher, atol=1e-4), family


@pytest.mark.parametrize("family", list(CONFIGS))
def test_checkpoint_names_reach_the_served_tensors(dirs, family):
    a, b = dirs[family]
    model = _hf(a)
    views = checkpoint_tensors(dict(model.named_parameters()))
    first, second = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert sorted(set(views) - tied) == sorted(first)
    for name, tensor in first.items():
        assert torch.equal(views[name], tensor), name
    with torch.no_grad():
        for name, tensor in second.items():
            views[name].copy_(tensor)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _hf(b)(ids).logits)


def _server_reads_own_checkpoint(path, other=None):
    """Serve ``path``, load ``other`` (default: ``path``) through the server's disk reader; with
    ``other``, the served model must then compute what transformers' load of ``other`` does."""
    from popo_mega.rollout.server import RolloutServer, parse_args

    server = RolloutServer(parse_args(["--model-path", path, "--device", "cpu"]))
    try:
        named = server.read_disk_checkpoint(other or path)
        server.load_named_tensors(named)
        if other is not None:
            ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
            with torch.no_grad():
                assert not torch.equal(_hf(path)(ids).logits, _hf(other)(ids).logits)  # the update changes them
                assert torch.equal(server.model(ids).logits, _hf(other)(ids).logits)
        return len(named)
    finally:
        server.stopping.set()


def test_server_updates_qwen3_from_disk(dirs):
    assert _server_reads_own_checkpoint(dirs["qwen3"][0]) == len(load_file(f"{dirs['qwen3'][0]}/model.safetensors"))


def test_server_updates_qwen3_moe_from_disk(dirs):
    a, b = dirs["qwen3_moe"]
    assert _server_reads_own_checkpoint(a, b) == len(load_file(f"{b}/model.safetensors"))
