"""A trainer process syncs its weights into two embedded server processes over
``/update_weights_from_distributed`` (gloo), with its own default torch.distributed world (2 ranks,
as a TP=2 trainer has) left working; then the servers' sampled-token log-probs equal the trainer's
for the same tokens (fp32), and a stale or garbled sync is caught by the post-sync checks.

Two trainers: a plain ``transformers`` model's state_dict (exercises every sync path and check),
and a Megatron GPT at TP=2 on gloo whose shards ``popo_mega.model.hf.iter_hf_tensors`` gathers
into HF tensors (split QKV per query group, split GLU fc1) on the fly while rank 0 sends them.
The first trainer's world also checks ``funnel_pipeline_stages`` (PP stages -> the one sender).
"""

import pytest
import torch

from tests.multiprocess import run_world

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
ATOL = 2e-5  # fp32: KV-cache decoding vs one full forward differs by a few 1e-6


def _teacher_logprobs(model, prompt, response):
    """log p(response[t] | prompt, response[:t]) by one full fp32 forward (no cache): [len(response)]."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return logp[len(prompt) - 1:-1].gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


def _prompt_logprobs(model, prompt):
    return _teacher_logprobs(model, prompt[:1], prompt[1:])


def _trainer(rank, world_size, urls, trainer_dir, disk_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the trainer's own world (e.g. its TP=2 group)
    before = torch.ones(1)
    dist.all_reduce(before)
    out = {"before": before.item()}
    if rank == 0:
        from transformers import AutoModelForCausalLM

        from popo_mega.rollout.engine import SamplingParams
        from popo_mega.rollout.http_engine import HttpEngine
        from popo_mega.rollout.weight_sync import WeightSyncError, verify_weight_version

        model = AutoModelForCausalLM.from_pretrained(trainer_dir).eval()
        engine = HttpEngine(urls, sync_method="distributed", bucket_bytes=4096, sync_timeout_s=60,
                            request_timeout_s=60, load_format="flattened_bucket")
        engine.sync_weights(model.state_dict().items(), "v1")  # checks version and probes itself
        out["buckets"] = engine.last_sync.buckets
        out["version"] = engine.weight_version()
        out["prompt_diff"] = engine.verify_prompt_logprobs(PROMPT, _prompt_logprobs(model, PROMPT), atol=ATOL)
        rows = engine.generate([PROMPT, [7, 8]], SamplingParams(temperature=1.0, max_new_tokens=12), n=2)
        out["sample_diff"] = max(
            float((torch.tensor(c.output_logprobs, dtype=torch.float64) - _teacher_logprobs(model, p, c.output_ids)).abs().max())
            for p, row in zip([PROMPT, [7, 8]], rows) for c in row)
        out["sample_versions"] = sorted({c.weight_version for row in rows for c in row})

        # the trainer moves on (one optimizer step's worth of change) ...
        torch.manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ref = _prompt_logprobs(model, PROMPT)
        # ... stale: the sync is skipped -> both checks fire
        out["stale"] = []
        for check in (lambda: engine.verify_prompt_logprobs(PROMPT, ref, atol=ATOL),
                      lambda: verify_weight_version(urls, "v2")):
            try:
                check()
            except WeightSyncError as exc:
                out["stale"].append(str(exc))
        # ... garbled: a wrong split (two rows of one projection swapped) slips past the probes,
        # not past the log-prob check
        garbled = {k: v.clone() for k, v in model.state_dict().items()}
        w = garbled["model.layers.1.mlp.down_proj.weight"]
        w[[5, 6]] = w[[6, 5]]
        engine.sync_weights(garbled.items(), "v2")
        try:
            engine.verify_prompt_logprobs(PROMPT, ref, atol=ATOL)
            out["garbled"] = None
        except WeightSyncError as exc:
            out["garbled"] = str(exc)
        engine.close()  # destroys the group on the servers
        # a correct sync with one broadcast per tensor (load_format=None), then the disk fallback
        per_tensor = HttpEngine(urls, sync_method="distributed", load_format=None, bucket_bytes=1 << 20,
                                sync_timeout_s=60)
        per_tensor.sync_weights(model.state_dict().items(), "v3")
        out["per_tensor_diff"] = per_tensor.verify_prompt_logprobs(PROMPT, ref, atol=ATOL)
        per_tensor.close()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)
        disk = HttpEngine(urls, sync_method="disk", disk_dir=disk_dir)
        disk.sync_weights(model.state_dict().items(), "v4")
        out["disk_diff"] = disk.verify_prompt_logprobs(PROMPT, _prompt_logprobs(model, PROMPT), atol=ATOL)
    after = torch.full((1,), 2.0)
    dist.all_reduce(after)  # the default world still works after the weight-update group came and went
    out["after"] = after.item()
    out["funnel"] = _funnel(rank)  # same world, spared a second spawn: PP stages -> the sender
    return out


def _stage_tensors(rank):
    named = [(f"stage{rank}.t{i}", torch.arange(i + 1 + rank * 10, dtype=torch.float32).reshape(1, -1) + 0.5)
             for i in range(3)]
    return named + [(f"stage{rank}.bf16", torch.full((2, 2), 1.5 + rank, dtype=torch.bfloat16))]


def _funnel(rank):
    import torch.distributed as dist

    from popo_mega.rollout.pipeline_funnel import funnel_pipeline_stages

    pp = dist.new_group([0, 1])  # two pipeline stages, TP rank 0 of each
    got = [(n, t.clone()) for n, t in funnel_pipeline_stages(iter(_stage_tensors(rank)), pp_group=pp, tp_rank=0)]
    drained = list(funnel_pipeline_stages(iter(_stage_tensors(rank)), pp_group=pp, tp_rank=1))  # TP rank != 0
    return got, drained


def _megatron_trainer(rank, world_size, urls, hf_dir):
    from megatron.core import parallel_state as ps

    from popo_mega.config import ModelConfig
    from popo_mega.model.forward import forward_only
    from popo_mega.model.hf import iter_hf_tensors
    from popo_mega.model.loader import build_from_hf, gather_vocab
    from popo_mega.runtime import initialize

    rt = initialize(2, 1, seed=0, device="cpu")  # TP=2 over gloo: the trainer's own default world
    loaded = build_from_hf(ModelConfig(hf_path=hf_dir, dtype="float32"), rt)
    tp_group = ps.get_tensor_model_parallel_group()
    tensors = iter_hf_tensors(loaded.model, loaded.arch, loaded.layout, tp_group=tp_group)  # collective
    out = {}
    if rank == 0:
        from popo_mega.rollout.engine import SamplingParams
        from popo_mega.rollout.http_engine import HttpEngine

        engine = HttpEngine(urls, sync_method="distributed", bucket_bytes=4096, sync_timeout_s=60, request_timeout_s=60)
        engine.sync_weights(tensors, "mcore-1")  # rank 0 drives the gathers while it sends
        rows = engine.generate([PROMPT], SamplingParams(temperature=1.0, max_new_tokens=12), n=4)
        out["sent"] = engine.last_sync.tensors
        out["versions"] = sorted({c.weight_version for c in rows[0]})
        engine.close()
        payload = [[c.output_ids for c in rows[0]], [c.output_logprobs for c in rows[0]]]
    else:
        for _ in tensors:  # consume in step with rank 0 (the TP all-gathers)
            pass
        payload = [None, None]
    torch.distributed.broadcast_object_list(payload, src=0, group=tp_group)
    responses, server_logprobs = payload
    ids = torch.tensor([PROMPT + r for r in responses])  # all 12 new tokens long (no EOS)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = forward_only(loaded.model, [{"tokens": ids, "position_ids": pos}],
                          lambda o, b: gather_vocab(o, loaded.arch.vocab_size, tp_group))[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = len(PROMPT)
    trainer_lp = logp[:, p - 1:-1].gather(-1, ids[:, p:, None]).squeeze(-1)  # [4, 12]
    out["diff"] = float((trainer_lp - torch.tensor(server_logprobs, dtype=torch.float64)).abs().max())
    out["spread"] = float(trainer_lp.std())
    return out


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    root = tmp_path_factory.mktemp("weight_sync")
    served = save_tiny_qwen2(str(root / "served"), seed=0)
    trainer = save_tiny_qwen2(str(root / "trainer"), seed=1)
    servers = launch_servers("embedded", served, num_servers=2, device="cpu", log_dir=str(root), health_timeout_s=120)
    try:
        yield [s.url for s in servers], trainer, str(root / "disk")
    finally:
        stop_servers(servers)


def test_trainer_syncs_two_servers_and_checks_catch_stale_and_garbled(two_servers):
    urls, trainer_dir, disk_dir = two_servers
    rank0, rank1 = run_world(_trainer, 2, urls, trainer_dir, disk_dir, timeout=150)
    assert rank0["before"] == rank1["before"] == 2.0
    assert rank0["after"] == rank1["after"] == 4.0
    assert rank0["buckets"] > 5 and rank0["version"] == "v1"
    assert rank0["prompt_diff"] <= ATOL and rank0["sample_diff"] <= ATOL
    assert rank0["sample_versions"] == ["v1"]
    assert len(rank0["stale"]) == 2
    assert "prompt log-probs differ" in rank0["stale"][0] and "stale weight version" in rank0["stale"][1]
    assert rank0["garbled"] is not None and "prompt log-probs differ" in rank0["garbled"]
    assert rank0["per_tensor_diff"] <= ATOL and rank0["disk_diff"] <= ATOL
    # pipeline funnel: rank 0 gets stage 0's then stage 1's tensors, bit-exact; nobody else gets any
    (got0, drained0), (got1, drained1) = rank0["funnel"], rank1["funnel"]
    assert got1 == [] and drained0 == [] and drained1 == []
    assert [n for n, _ in got0] == [n for r in range(2) for n, _ in _stage_tensors(r)]
    for (name, got), (_, want) in zip(got0, [kv for r in range(2) for kv in _stage_tensors(r)]):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_megatron_tp2_trainer_syncs_and_logprobs_match(two_servers, tmp_path):
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    urls, _, _ = two_servers
    hf_dir = save_tiny_qwen2(str(tmp_path / "mcore_trainer"), seed=2)  # weights no server holds yet
    rank0, rank1 = run_world(_megatron_trainer, 2, urls, hf_dir, timeout=150)
    assert rank0["sent"] == 2 + 2 * 12 + 1  # embed, lm_head, 12 HF tensors per layer, final norm
    assert rank0["versions"] == ["mcore-1"]
    print(f"max |megatron TP=2 - server| sampled-token log-prob: {rank0['diff']:.2e}")
    # fp32 Megatron at TP=2 vs the server's HF model with a KV cache: both ranks agree with the server
    assert rank0["diff"] < 1e-4 and rank1["diff"] < 1e-4 and rank0["spread"] > 0.1

