"""Kernel 1 (fused vocab-parallel log-prob + entropy) against its reference twin and float64 gold."""

import pytest
import torch

from popo_mega.ops import logprob_entropy, logprob_entropy_ref
from tests.unit.test_ops_common import require_extension, three_way


def _case(T, V, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V, generator=g) * 3).to(dtype)
    target = torch.randint(0, V, (T,), generator=g)
    g_lp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    return logits, target, g_lp, g_ent


def _run(fn, logits, target, g_lp, g_ent, **kw):
    z = logits.clone().requires_grad_(True)
    lp, ent = fn(z, target, **kw)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), z.grad


def _gold(logits, target, g_lp, g_ent):
    """float64 log_softmax formulation, autograd for the gradient."""
    x = logits.double().requires_grad_(True)
    lsm = torch.log_softmax(x, -1)
    lp = lsm.gather(1, target[:, None]).squeeze(1)
    ent = -(lsm.exp() * lsm).sum(-1)
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return lp.detach(), ent.detach(), x.grad


# T not a multiple of anything, V/tp not a multiple of the vector width (8 bf16 / 4 fp32)
@pytest.mark.parametrize("T,V", [(37, 1001), (1, 7), (5, 8)])
def test_fp32_matches_reference_and_float64(T, V):
    require_extension()
    args = _case(T, V, 0, torch.float32)
    k = _run(logprob_entropy, *args, impl="extension")
    r = _run(logprob_entropy_ref, *args)
    gold = _gold(*args)
    for kk, rr, gg, name in zip(k, r, gold, ["logp", "entropy", "grad"]):
        torch.testing.assert_close(kk, rr, atol=2e-6, rtol=2e-5, msg=name)
        torch.testing.assert_close(kk.double(), gg, atol=2e-6, rtol=2e-5, msg=name)


def test_bf16_three_way():
    require_extension()
    args = _case(29, 515, 1, torch.bfloat16)
    k = _run(logprob_entropy, *args, impl="extension")
    r = _run(logprob_entropy_ref, *args)
    args32 = (args[0].float(),) + args[1:]
    gold = _run(logprob_entropy_ref, *args32)
    assert k[2].dtype == torch.bfloat16
    for kk, rr, gg, name in zip(k, r, gold, ["logp", "entropy", "grad"]):
        three_way(kk, rr, gg, name, rtol_floor=2 ** -8)


def test_input_untouched_and_vocab_start_shard():
    require_extension()
    logits, target, g_lp, g_ent = _case(11, 40, 2, torch.float32)
    # a shard [10, 40) of a 40-vocab row set: targets outside it contribute nothing locally
    shard = logits[:, 10:].contiguous()
    before = shard.clone()
    stats_k = torch.ops.popo_mega.logprob_entropy_stats(shard, target, 10)
    assert torch.equal(shard, before)
    z = shard.double()
    m = z.max(1).values
    e = (z - m[:, None]).exp()
    inside = (target >= 10)
    zt = torch.where(inside, z.gather(1, (target - 10).clamp(min=0)[:, None]).squeeze(1), torch.zeros(()).double())
    expected = torch.stack([m, e.sum(1), (e * (z - m[:, None])).sum(1), zt])
    torch.testing.assert_close(stats_k.double(), expected, atol=1e-5, rtol=1e-5)


def test_opcheck():
    require_extension()
    logits, target, g_lp, g_ent = _case(6, 13, 3, torch.float32)
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (logits, target, 0))
    logz = torch.logsumexp(logits, 1)
    ent = torch.rand(6)
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_grad, (logits, target, 0, logz, ent, g_lp, g_ent))


def test_binding_rejects_bad_inputs():
    require_extension()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(RuntimeError, match="target must be"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32), 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(3, 2).t(), torch.zeros(2, dtype=torch.long), 0)
