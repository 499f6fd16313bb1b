"""The embedded server as a separate process (``popo-rollout-server``) driven by the real client.

One server on a free loopback port with an API key; it is always stopped, even on failure.
"""

import os
import shutil
import sys
import threading
import time

import pytest
import requests
import torch

from popo_mega.rollout.engine import SamplingParams

KEY = "test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from popo_mega.rollout.sglang_launcher import free_port, launch
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    root = tmp_path_factory.mktemp("embedded")
    path = save_tiny_qwen2(str(root / "model"), seed=0, eos_token_id=2)
    port = free_port()
    exe = shutil.which("popo-rollout-server")
    cmd = [exe] if exe else [sys.executable, "-m", "popo_mega.rollout.server"]  # console script when installed
    cmd += ["--model-path", path, "--port", str(port), "--device", "cpu", "--api-key", KEY, "--random-seed", "7",
            "--strict-sglang"]  # SGLang 0.5.23's rules (see popo_mega/rollout/server.py)
    proc = launch(cmd, f"http://127.0.0.1:{port}", log_path=str(root / "server.log"), health_timeout_s=120, api_key=KEY)
    try:
        yield proc.url, path, root
    finally:
        proc.stop()


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _teacher(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return logp[len(prompt) - 1:-1].gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


def test_generate_logprobs_stop_and_versions(server):
    from popo_mega.rollout.http_engine import HttpEngine

    url, path, _ = server
    model = _hf(path)
    engine = HttpEngine([url], api_key=KEY, request_timeout_s=60)
    assert engine.weight_version() == "default"  # before any sync: what the server reports
    prompts = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15]]
    rows = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10), n=3)
    assert [len(r) for r in rows] == [3, 3, 3]
    for prompt, row in zip(prompts, rows):
        for c in row:
            assert c.weight_version == "default"
            assert c.finish_reason == ("stop" if c.output_ids[-1] == 2 else "length")
            assert 2 not in c.output_ids[:-1] and len(c.output_ids) <= 10
            ref = _teacher(model, prompt, c.output_ids)
            assert torch.allclose(torch.tensor(c.output_logprobs, dtype=torch.float64), ref, atol=2e-5)
    greedy = engine.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(99,)))
    ids = [5, 6, 7, 8]
    for _ in range(len(greedy[0][0].output_ids)):  # greedy = repeated argmax of a full forward
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy[0][0].output_ids == ids[4:]


def test_auth_and_bad_requests_get_clear_answers(server):
    url, _, _ = server
    assert requests.post(f"{url}/generate", json={"input_ids": [1]}, timeout=10).status_code == 401
    h = {"Authorization": f"Bearer {KEY}"}
    r = requests.post(f"{url}/generate", json={"input_ids": [1, 10_000]}, headers=h, timeout=10)
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = requests.post(f"{url}/generate", json={"text": "hello"}, headers=h, timeout=10)
    assert r.status_code == 400 and "input_ids" in r.json()["error"]["message"]
    r = requests.post(f"{url}/update_weights_from_disk", json={"model_path": "/nonexistent"}, headers=h, timeout=10)
    assert r.status_code == 400 and "/nonexistent" in r.json()["message"]


def test_pause_continue_flush_release_and_disk_update(server):
    from popo_mega.rollout.http_engine import HttpEngine
    from popo_mega.rollout.tiny_model import save_tiny_qwen2
    from popo_mega.rollout.weight_sync import prompt_logprobs

    url, path, root = server
    engine = HttpEngine([url], api_key=KEY, request_timeout_s=60)
    engine.pause_generation()
    result = {}
    t = threading.Thread(target=lambda: result.update(out=engine.generate([[3, 4]], SamplingParams(max_new_tokens=3))))
    t.start()
    time.sleep(1.0)
    assert "out" not in result  # held while paused
    engine.flush_cache(retries=1)  # SGLang: a paused scheduler's flush ignores the waiting queue
    engine.continue_generation()
    t.join(timeout=30)
    assert len(result["out"][0][0].output_ids) == 3
    engine.flush_cache()
    engine.release_memory_occupation(["weights", "kv_cache"])
    engine.resume_memory_occupation(["weights", "kv_cache"])  # resuming cuda_graph too is 400, as in SGLang
    # a disk update swaps the weights and the version
    other = save_tiny_qwen2(str(root / "other"), seed=3, eos_token_id=2)
    os.remove(os.path.join(other, "config.json"))  # safetensors alone are enough for the embedded server
    h = {"Authorization": f"Bearer {KEY}"}
    r = requests.post(f"{url}/update_weights_from_disk", json={"model_path": other, "weight_version": "d1"},
                      headers=h, timeout=30)
    assert r.status_code == 200 and r.json()["success"]
    prompt = [4, 5, 6, 7]
    got = torch.tensor(prompt_logprobs(url, prompt, api_key=KEY), dtype=torch.float64)
    new = _teacher(_hf_from(other, path), prompt[:1], prompt[1:])
    assert torch.allclose(got, new, atol=2e-5)
    assert requests.get(f"{url}/model_info", headers=h, timeout=10).json()["weight_version"] == "d1"


def _hf_from(weights_dir, config_dir):
    """The HF model with ``config_dir``'s config and ``weights_dir``'s safetensors."""
    from safetensors.torch import load_file

    model = _hf(config_dir)
    model.load_state_dict(load_file(os.path.join(weights_dir, "model.safetensors")))
    return model


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without NCCL, so the group cannot form")
def test_auto_sync_falls_back_to_disk_when_the_group_cannot_form(server):
    from popo_mega.rollout.http_engine import HttpEngine
    from popo_mega.rollout.tiny_model import save_tiny_qwen2
    from popo_mega.rollout.weight_sync import prompt_logprobs

    url, path, root = server
    new = _hf(save_tiny_qwen2(str(root / "fallback_model"), seed=5, eos_token_id=2))
    engine = HttpEngine([url], api_key=KEY, sync_method="auto", sync_backend="nccl", disk_dir=str(root / "sync"),
                        sync_timeout_s=20)
    with pytest.warns(UserWarning, match="distributed weight sync unavailable.*nccl"):
        engine.sync_weights(new.state_dict().items(), "fb1")
    assert engine.last_sync.method == "disk" and engine.weight_version() == "fb1"
    prompt = [4, 5, 6, 7]
    got = torch.tensor(prompt_logprobs(url, prompt, api_key=KEY), dtype=torch.float64)
    assert torch.allclose(got, _teacher(new, prompt[:1], prompt[1:]), atol=2e-5)
    strict = HttpEngine([url], api_key=KEY, sync_method="distributed", sync_backend="nccl", sync_timeout_s=20)
    from popo_mega.rollout.weight_sync import WeightSyncError
    with pytest.raises(WeightSyncError, match="nccl"):
        strict.sync_weights(new.state_dict().items(), "fb2")
