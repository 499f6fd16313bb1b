"""A one-process trainer syncs its weights into an embedded server (a separate, unrelated process
on this host, started with --strict-sglang and --tp-size 2) over ``/update_weights_from_tensor``,
as colocated servers are synced: the served log-probs then equal the trainer's; an update with a
wrong shape is rejected naming the server, and nothing of it is applied (log-probs and version as
before); an update outside a begin/end window is refused as SGLang 0.5.23 refuses it.
"""

import pytest
import requests
import torch

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
ATOL = 2e-5  # fp32: the server's forward and the trainer's differ by a few 1e-6 at most


def _prompt_logprobs(model, prompt):
    """log p(prompt[t] | prompt[:t]), t = 1..P-1, by one fp32 forward of the trainer's model: [P-1]."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    root = tmp_path_factory.mktemp("tensor_sync")
    served = save_tiny_qwen2(str(root / "served"), seed=0)
    trainer = save_tiny_qwen2(str(root / "trainer"), seed=1)
    servers = launch_servers("embedded", served, num_servers=1, device="cpu", log_dir=str(root),
                             health_timeout_s=120, extra_args=("--tp-size", "2"))
    try:
        yield servers[0].url, trainer
    finally:
        stop_servers(servers)


def test_tensor_sync_matches_trainer_and_rejects_bad_update_whole(server, monkeypatch):
    from transformers import AutoModelForCausalLM

    import popo_mega.rollout.weight_sync as weight_sync

    from popo_mega.rollout.http_engine import HttpEngine
    from popo_mega.rollout.weight_sync import WeightSyncError, prompt_logprobs, verify_weight_version

    url, trainer_dir = server
    model = AutoModelForCausalLM.from_pretrained(trainer_dir).eval()
    want = _prompt_logprobs(model, PROMPT)
    before = torch.tensor(prompt_logprobs(url, PROMPT), dtype=torch.float64)
    assert float((before - want).abs().max()) > 1e-2  # the served model (seed 0) is not the trainer's (seed 1)

    engine = HttpEngine([url], sync_method="distributed", tensor_urls=[url], bucket_bytes=8192, sync_timeout_s=60,
                        request_timeout_s=60)
    tp_reads = []  # each server's TP size is read from /server_info once per engine, not per sync
    real_tp_sizes = weight_sync.server_tp_sizes
    monkeypatch.setattr(weight_sync, "server_tp_sizes", lambda *a, **k: tp_reads.append(a) or real_tp_sizes(*a, **k))
    try:
        engine.sync_weights(model.state_dict().items(), "v0")
        engine.sync_weights(model.state_dict().items(), "v1")
        assert len(tp_reads) == 1
        assert engine.last_sync.method == "tensor"
        assert engine.last_sync.buckets > 1
        assert engine.verify_prompt_logprobs(PROMPT, want, atol=ATOL) <= ATOL
        info = requests.get(f"{url}/server_info", timeout=10).json()["popo_weight_updates"]
        n = len(model.state_dict())
        assert info["closed_windows"][-1] == [n, n]  # both TP ranks read their own payload, inside one window

        # a bad update: one bucket holding a changed tensor and one of the wrong shape
        state = model.state_dict()
        bad = [("model.norm.weight", state["model.norm.weight"] + 1.0),
               ("model.layers.0.mlp.down_proj.weight", state["model.layers.0.mlp.down_proj.weight"][:, :-1])]
        with pytest.raises(WeightSyncError) as err:
            engine.sync_weights(bad, "v2")
        assert url in str(err.value) and "down_proj" in str(err.value)
        verify_weight_version([url], "v1")
        after = torch.tensor(prompt_logprobs(url, PROMPT), dtype=torch.float64)
        assert float((after - want).abs().max()) <= ATOL  # model.norm.weight + 1 was not applied
        assert requests.get(f"{url}/server_info", timeout=10).json()["popo_weight_updates"]["window_open"] is False
    finally:
        engine.close()


def test_update_from_tensor_outside_a_window_is_refused(server):
    from popo_mega.rollout import sglang_api as api
    from popo_mega.rollout.tensor_ipc import serialize_named_tensors

    url, _ = server
    payloads, held = serialize_named_tensors([("model.norm.weight", torch.zeros(32))], copies=2)
    r = requests.post(f"{url}/update_weights_from_tensor", json=api.update_weights_from_tensor_request(payloads),
                      timeout=30)
    del held
    assert r.status_code == 400 and "begin_weight_update" in r.text
