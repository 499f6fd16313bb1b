"""TP=2 (gloo) vocab-parallel log-probs and entropy equal a full-vocab float64 log_softmax at TP=1."""

import torch
import torch.distributed as dist

from tests.multiprocess import run_world

T, V = 23, 61   # odd sizes; V is split unevenly below to exercise vocab_start


def _data():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, V, (T,), generator=g)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_ent = torch.randn(T, generator=g, dtype=torch.float64)
    return logits, target, g_lp, g_ent


def _shards(dtype):
    # rank 0 owns [0, 30), rank 1 owns [30, 61): uneven shards with explicit vocab_start
    return [(0, 30), (30, 61)]


def _worker(rank, world_size, dtype_name):
    from popo_mega.model.logprobs import vocab_parallel_logprob_entropy
    dist.init_process_group("gloo")
    dtype = getattr(torch, dtype_name)
    logits, target, g_lp, g_ent = _data()
    out = {}
    for name, spans in [("even", None), ("uneven", _shards(dtype))]:
        if spans is None:
            lo, hi = rank * (V - 1) // 2, (rank + 1) * (V - 1) // 2   # 30 + 30 of the first 60 ids
            full = logits[:, : V - 1]
            tgt = target.clamp(max=V - 2)
            start = None
        else:
            lo, hi = spans[rank]
            full, tgt, start = logits, target, lo
        shard = full[:, lo:hi].to(dtype).requires_grad_(True)
        lp, ent = vocab_parallel_logprob_entropy(shard, tgt, group=dist.group.WORLD, vocab_start=start,
                                                 chunk_tokens=4)
        (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
        out[name] = (lp.detach(), ent.detach(), shard.grad.double(), lo, hi)
    return out


def _gold(logits, target, g_lp, g_ent):
    x = logits.clone().requires_grad_(True)
    lsm = torch.log_softmax(x, dim=-1)
    lp = lsm.gather(1, target[:, None]).squeeze(1)
    ent = -(lsm.exp() * lsm).sum(-1)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def _check(results, dtype, atol_grad, rtol_grad):
    logits, target, g_lp, g_ent = _data()
    for name in ["even", "uneven"]:
        if name == "even":
            full, tgt = logits[:, : V - 1], target.clamp(max=V - 2)
        else:
            full, tgt = logits, target
        full = full.to(dtype).double()          # gold on exactly the values the ranks hold
        lp_ref, ent_ref, grad_ref = _gold(full, tgt, g_lp, g_ent)
        for rank, res in enumerate(results):
            lp, ent, grad, lo, hi = res[name]
            torch.testing.assert_close(lp.double(), lp_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent.double(), ent_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad, grad_ref[:, lo:hi], atol=atol_grad, rtol=rtol_grad)


def test_tp2_equals_full_vocab_fp32_and_bf16():
    results = run_world(_worker, 2, "float32")
    _check(results, torch.float32, 2e-6, 1e-5)
    results = run_world(_worker, 2, "bfloat16")
    _check(results, torch.bfloat16, 1e-3, 8e-3)
