"""CUDA kernels against their reference twins (values, gradients, three-way bf16 check, opcheck).

Needs a CUDA device and a CUDA build of the extension; skipped without a device. Not run in the
session that wrote the kernels (no GPU was lent): the CUDA code was only compiled there.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from popo_mega.ops import (_extension, clipped_surrogate, clipped_surrogate_ref, cosine_penalty,  # noqa: E402
                           cosine_penalty_ref, logprob_entropy, logprob_entropy_ref, masked_mean_pool,
                           masked_mean_pool_ref)
from tests.unit.test_ops_common import three_way  # noqa: E402


@pytest.fixture(autouse=True)
def cuda_build():
    assert _extension.load(), f"popo_mega._C not built: {_extension._state['error']}; run {_extension.BUILD_COMMAND}"
    assert _extension.has_kernel("logprob_entropy_stats", torch.device("cuda")), \
        "popo_mega._C was built without CUDA kernels (torch without CUDA at build time?)"


def _cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("T,V", [(37, 1001), (64, 19008), (3, 152064)])
def test_logprob_entropy(T, V):
    g = torch.Generator().manual_seed(T)
    logits = torch.randn(T, V, generator=g) * 3
    target = torch.randint(0, V, (T,), generator=g)
    g_lp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    logits, target, g_lp, g_ent = _cuda(logits, target, g_lp, g_ent)

    def run(fn, z, **kw):
        z = z.clone().requires_grad_(True)
        lp, ent = fn(z, target, **kw)
        (lp * g_lp + ent * g_ent).sum().backward()
        return lp.detach(), ent.detach(), z.grad

    gold = run(logprob_entropy_ref, logits)
    k32 = run(logprob_entropy, logits, impl="extension")
    for kk, gg in zip(k32, gold):
        torch.testing.assert_close(kk, gg, atol=1e-5, rtol=1e-4)
    zb = logits.bfloat16()
    gold_b = run(logprob_entropy_ref, zb.float())
    k, r = run(logprob_entropy, zb, impl="extension"), run(logprob_entropy_ref, zb)
    for kk, rr, gg, name in zip(k, r, gold_b, ["logp", "entropy", "grad"]):
        three_way(kk, rr, gg, name, 2 ** -8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clipped_surrogate(dtype):
    g = torch.Generator().manual_seed(1)
    n = 100_003
    old = -torch.rand(n, generator=g) * 3
    logp = old + torch.randn(n, generator=g) * 0.3
    adv, mask, grad = torch.randn(n, generator=g), torch.rand(n, generator=g) > 0.2, torch.randn(n, generator=g)
    logp, old, adv, mask, grad = _cuda(logp.to(dtype), old.to(dtype), adv.to(dtype), mask, grad.to(dtype))

    def run(fn, lp, o, a, gr, **kw):
        x = lp.clone().requires_grad_(True)
        loss, st = fn(x, o, a, mask, 0.2, 0.28, **kw)
        (loss * gr).sum().backward()
        return loss.detach(), x.grad, torch.stack(list(st.values()))

    k, r = run(clipped_surrogate, logp, old, adv, grad, impl="extension"), run(clipped_surrogate_ref, logp, old, adv, grad)
    gold = run(clipped_surrogate_ref, logp.float(), old.float(), adv.float(), grad.float())
    for kk, rr, gg, name in zip(k, r, gold, ["loss", "grad", "stats"]):
        three_way(kk, rr, gg, name, 2 ** -8 if dtype == torch.bfloat16 and name != "stats" else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_and_cosine(dtype):
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 3, 3, 4, 8, 600, 600])
    H = 1029
    hidden = torch.randn(600, H, generator=g)
    mask = torch.rand(600, generator=g) > 0.3
    mask[3] = True
    mask[4:8] = False
    gout = torch.randn(6, H, generator=g)
    hidden, cu, mask, gout = _cuda(hidden.to(dtype), cu, mask, gout.to(dtype))

    def pool(fn, h, go, **kw):
        h = h.clone().requires_grad_(True)
        out = fn(h, cu, mask, **kw)
        (out * go).sum().backward()
        return out.detach(), h.grad

    k, r, gold = pool(masked_mean_pool, hidden, gout, impl="extension"), pool(masked_mean_pool_ref, hidden, gout), \
        pool(masked_mean_pool_ref, hidden.float(), gout.float())
    for kk, rr, gg, name in zip(k, r, gold, ["pooled", "grad"]):
        three_way(kk, rr, gg, name, 2 ** -8 if dtype == torch.bfloat16 else 1e-5)

    pred = torch.randn(6, H, generator=g).to(dtype).cuda()
    target = (torch.randn(6, H, generator=g)).to(dtype).cuda()
    w = torch.rand(6, generator=g).cuda()

    def cos(fn, p, **kw):
        p = p.clone().requires_grad_(True)
        loss = fn(p, target, w, 3.0, **kw)
        loss.backward()
        return loss.detach(), p.grad

    k, r, gold = cos(cosine_penalty, pred, impl="extension"), cos(cosine_penalty_ref, pred), cos(cosine_penalty_ref, pred.float())
    three_way(k[0], r[0], gold[0], "loss", 1e-5)
    three_way(k[1], r[1], gold[1], "grad", 2 ** -8 if dtype == torch.bfloat16 else 1e-5)


def test_opcheck_cuda():
    z = torch.randn(5, 24, device="cuda")
    t = torch.randint(0, 24, (5,), device="cuda")
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (z, t, 0))
    lp = torch.randn(40, device="cuda", requires_grad=True)
    args = (lp, torch.randn(40, device="cuda"), torch.randn(40, device="cuda"), torch.ones(40, device="cuda"), 0.2, 0.28)
    torch.library.opcheck(torch.ops.popo_mega.clipped_surrogate, args)
