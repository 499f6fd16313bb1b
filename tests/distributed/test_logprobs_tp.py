"""TP=2 (gloo) vocab-parallel log-probs and entropy equal a full-vocab float64 log_softmax at TP=1.

One 2-process world runs everything (process start-up dominates on 2 cores): the reference path
(popo_mega.model.logprobs) on even shards with the default vocab_start and on uneven shards with
an explicit one, and the fused kernel (popo_mega.ops, impl="extension") on the uneven shards, each
in float32 and bfloat16.
"""

import torch
import torch.distributed as dist

from tests.multiprocess import run_world

T, V = 23, 61          # odd sizes
UNEVEN = [(0, 30), (30, 61)]
DTYPES = {"float32": (2e-6, 1e-5), "bfloat16": (1e-3, 8e-3)}   # gradient atol, rtol (bf16: one rounding)


def _data():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(T, V, generator=g, dtype=torch.float64) * 4
    target = torch.randint(0, V, (T,), generator=g)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_ent = torch.randn(T, generator=g, dtype=torch.float64)
    return logits, target, g_lp, g_ent


def _cases(rank):
    """name -> (full logits, target, lo, hi, vocab_start argument, path)."""
    logits, target, _, _ = _data()
    lo, hi = rank * 30, (rank + 1) * 30      # even: 30 + 30 of the first 60 ids, default vocab_start
    even = (logits[:, :60], target.clamp(max=59), lo, hi, None, "reference")
    ulo, uhi = UNEVEN[rank]
    return {"even-ref": even,
            "uneven-ref": (logits, target, ulo, uhi, ulo, "reference"),
            "uneven-fused": (logits, target, ulo, uhi, ulo, "extension")}


def _worker(rank, world_size, with_fused):
    from popo_mega.model.logprobs import vocab_parallel_logprob_entropy
    from popo_mega.ops import logprob_entropy
    dist.init_process_group("gloo")
    _, _, g_lp, g_ent = _data()
    out = {}
    for dtype_name in DTYPES:
        for name, (full, tgt, lo, hi, start, path) in _cases(rank).items():
            if path == "extension" and not with_fused:
                continue
            shard = full[:, lo:hi].to(getattr(torch, dtype_name)).contiguous().requires_grad_(True)
            if path == "reference":
                lp, ent = vocab_parallel_logprob_entropy(shard, tgt, group=dist.group.WORLD, vocab_start=start,
                                                         chunk_tokens=4)
            else:
                lp, ent = logprob_entropy(shard, tgt, group=dist.group.WORLD, vocab_start=start, impl="extension")
            (lp * g_lp.float() + ent * g_ent.float()).sum().backward()
            out[dtype_name, name] = (lp.detach(), ent.detach(), shard.grad.double())
    return out


def _gold(logits, target, g_lp, g_ent):
    x = logits.clone().requires_grad_(True)
    lsm = torch.log_softmax(x, dim=-1)
    lp = lsm.gather(1, target[:, None]).squeeze(1)
    ent = -(lsm.exp() * lsm).sum(-1)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def test_tp2_reference_and_fused_equal_full_vocab_log_softmax():
    from popo_mega.ops import _extension
    from tests.unit.test_ops_common import require_extension
    with_fused = _extension.load()
    results = run_world(_worker, 2, with_fused)
    _, _, g_lp, g_ent = _data()
    checked = 0
    for (dtype_name, name), _ in results[0].items():
        atol, rtol = DTYPES[dtype_name]
        for rank, res in enumerate(results):
            full, tgt, lo, hi, _, _ = _cases(rank)[name]
            # gold on exactly the values the ranks hold (rounded to the dtype), in float64
            lp_ref, ent_ref, grad_ref = _gold(full.to(getattr(torch, dtype_name)).double(), tgt, g_lp, g_ent)
            lp, ent, grad = res[dtype_name, name]
            torch.testing.assert_close(lp.double(), lp_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent.double(), ent_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad, grad_ref[:, lo:hi], atol=atol, rtol=rtol)
            checked += 1
    assert checked == 2 * len(DTYPES) * (3 if with_fused else 2)
    if not with_fused:
        require_extension()  # the reference path passed; now fail (compiler present) or skip (none)
