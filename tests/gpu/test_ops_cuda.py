"""CUDA kernels against their reference twins (values, gradients, three-way bf16 check, opcheck).

Needs a CUDA device and a CUDA build of the extension; skipped without a device. Run them with
``bash benchmarks/gpu/check.sh`` (builds the extension first). Not yet run on a GPU (none was lent
to the sessions that wrote them): the CUDA code was compiled, and these tests' bodies passed on the
CPU with ``.cuda()`` removed (the CPU kernels standing in for the CUDA ones).
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


def test_opcheck_all_ops_cuda():
    """torch.library.opcheck (schema, fake impl, autograd registration, AOT dispatch) of every op and
    its gradient op on CUDA tensors."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 24, generator=g).cuda()
    t = torch.randint(0, 20, (5,), generator=g).cuda()
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (z, t, 0, 24))
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (z, t, 0, 20))        # 4 padding columns
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (z.bfloat16(), t, 8, 40))   # targets < 8 outside
    logz, ent = torch.logsumexp(z, 1), torch.rand(5, device="cuda")
    g_lp, g_ent = torch.randn(5, device="cuda"), torch.randn(5, device="cuda")
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_grad, (z, t, 0, 20, logz, ent, g_lp, g_ent))

    lp = torch.randn(40, device="cuda", requires_grad=True)
    args = (lp, torch.randn(40, device="cuda"), torch.randn(40, device="cuda"), torch.ones(40, device="cuda"), 0.2, 0.28)
    torch.library.opcheck(torch.ops.popo_mega.clipped_surrogate, args)
    torch.library.opcheck(torch.ops.popo_mega.clipped_surrogate_grad, (torch.randn(40, device="cuda"), lp.detach(),
                                                                       *args[1:]))

    hidden = torch.randn(16, 8, device="cuda", requires_grad=True)
    cu = torch.tensor([0, 5, 5, 16], device="cuda")
    mask = torch.rand(16, generator=g).cuda() > 0.3
    torch.library.opcheck(torch.ops.popo_mega.masked_mean_pool, (hidden, cu, mask))
    torch.library.opcheck(torch.ops.popo_mega.masked_mean_pool_grad, (torch.randn(3, 8, device="cuda"), cu, mask))

    pred = torch.randn(4, 9, device="cuda", requires_grad=True)
    target, w, D = torch.randn(4, 9, device="cuda"), torch.rand(4, device="cuda"), torch.tensor(3.0, device="cuda")
    torch.library.opcheck(torch.ops.popo_mega.cosine_penalty, (pred, target, w, D))
    torch.library.opcheck(torch.ops.popo_mega.cosine_penalty_grad,
                          (torch.tensor(1.3, device="cuda"), pred.detach(), target, w, D))


# ---- kernel 1 on shards: out-of-shard targets, padded vocabularies (defect 11), the Qwen size ----

def _gold64(logits, target, g_lp, g_ent):
    """float64 log_softmax on the CPU, autograd for the gradient."""
    x = logits.detach().cpu().double().requires_grad_(True)
    lsm = torch.log_softmax(x, -1)
    lp = lsm.gather(1, target.cpu()[:, None]).squeeze(1)
    ent = -(lsm.exp() * lsm).sum(-1)
    (lp * g_lp.cpu().double() + ent * g_ent.cpu().double()).sum().backward()
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1000, 1003])      # vectorised rows, and rows of odd length
def test_out_of_shard_targets_match_the_cpu_kernel(dtype, cols):
    """A TP shard starting at vocab_start=1000 of a 3000-id vocabulary; most targets lie in other
    shards (their target logit is 0 and the gradient has no one-hot term). The CUDA stats and
    gradient equal the CPU kernel's (itself checked against float64 in tests/unit)."""
    g = torch.Generator().manual_seed(cols)
    T, start = 300, 1000
    z = (torch.randn(T, cols, generator=g) * 3).to(dtype)
    target = torch.randint(0, 3000, (T,), generator=g)
    target[:4] = torch.tensor([start - 1, start, start + cols - 1, start + cols])   # the shard's edges
    stats_cpu = torch.ops.popo_mega.logprob_entropy_stats(z, target, start, 3000)
    stats_gpu = torch.ops.popo_mega.logprob_entropy_stats(z.cuda(), target.cuda(), start, 3000).cpu()
    torch.testing.assert_close(stats_gpu, stats_cpu, atol=1e-5, rtol=2e-5)
    inside = (target >= start) & (target < start + cols)
    assert 0 < int(inside.sum()) < T and (stats_gpu[3][~inside] == 0).all()
    logz = stats_cpu[0] + stats_cpu[1].log()
    ent = stats_cpu[1].log() - stats_cpu[2] / stats_cpu[1]
    g_lp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    grad_cpu = torch.ops.popo_mega.logprob_entropy_grad(z, target, start, 3000, logz, ent, g_lp, g_ent)
    grad_gpu = torch.ops.popo_mega.logprob_entropy_grad(*_cuda(z, target), start, 3000,
                                                        *_cuda(logz, ent, g_lp, g_ent)).cpu()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)
    torch.testing.assert_close(grad_gpu.float(), grad_cpu.float(), **tol)


def _padded(T, cols, real, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, cols, generator=g) * 3).to(dtype)
    target = torch.randint(0, real, (T,), generator=g)
    return logits, target, torch.randn(T, generator=g) * 3, torch.randn(T, generator=g) * 3


def _run_padded(logits, target, g_lp, g_ent, **kw):
    z = logits.cuda().requires_grad_(True)
    lp, ent = logprob_entropy(z, target.cuda(), impl="extension", **kw)
    (lp * g_lp.cuda() + ent * g_ent.cuda()).sum().backward()
    return lp.detach().cpu(), ent.detach().cpu(), z.grad.cpu()


# 1000 / 1001 real columns (< 2,048 = 256 threads x 8 bf16: some threads see only padding), rows of
# 1024 (vectorised) and 1030 (scalar path) columns, and 100 real of 4,096.
@pytest.mark.parametrize("cols,real", [(1024, 1000), (1030, 1001), (4096, 100)])
def test_bf16_padding_masked_at_finfo_min_half_is_finite_and_exact(cols, real):
    """Defect 11: padding masked with finfo(bf16).min/2 (the trainer's old way) gave NaN entropies."""
    logits, target, g_lp, g_ent = _padded(64, cols, real, torch.bfloat16, cols + real)
    masked = logits.clone()
    masked[:, real:] = torch.finfo(torch.bfloat16).min / 2
    lp, ent, grad = _run_padded(masked, target, g_lp, g_ent)
    gold = _gold64(logits[:, :real], target, g_lp, g_ent)
    assert torch.isfinite(ent).all() and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(lp.double(), gold[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad[:, :real].double(), gold[2], atol=2e-3, rtol=8e-3)
    assert (grad[:, real:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols,real", [(1024, 1000), (1030, 1001), (4096, 100), (2048, 2047)])
def test_vocab_size_skips_padding_unread(dtype, cols, real):
    """vocab_size: padding columns hold NaN / 1e4 and are neither read nor given a gradient."""
    logits, target, g_lp, g_ent = _padded(64, cols, real, dtype, cols * 7 + real)
    junk = logits.clone()
    junk[:, real::2] = float("nan")
    junk[:, real + 1::2] = 1e4
    lp, ent, grad = _run_padded(junk, target, g_lp, g_ent, vocab_size=real)
    gold = _gold64(logits[:, :real], target, g_lp, g_ent)
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=8e-3)
    torch.testing.assert_close(lp.double(), gold[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad[:, :real].double(), gold[2], **tol)
    assert grad.dtype == dtype and (grad[:, real:] == 0).all()


def test_all_padding_shard_cuda():
    z = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.zeros(4, dtype=torch.long, device="cuda")
    stats = torch.ops.popo_mega.logprob_entropy_stats(z, t, 128, 100).cpu()
    assert torch.equal(stats[0], torch.full((4,), float("-inf"))) and torch.equal(stats[1:], torch.zeros(3, 4))
    v = torch.randn(4, device="cuda")
    assert (torch.ops.popo_mega.logprob_entropy_grad(z, t, 128, 100, v, v, v, v) == 0).all()


def test_qwen_vocab_8192_tokens_bf16():
    """8,192 tokens x 152,064 columns (Qwen2.5 at TP=1; 151,665 real ids), bf16: three-way check of
    the kernel (with vocab_size) against the reference twin in bf16 and in fp32."""
    T, V, real = 8192, 152064, 151665
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(T, V, generator=g, device="cuda") * 3).bfloat16()
    target = torch.randint(0, real, (T,), generator=g, device="cuda")
    g_lp, g_ent = torch.randn(T, generator=g, device="cuda"), torch.randn(T, generator=g, device="cuda")

    def run(fn, z, **kw):
        z = z.clone().requires_grad_(True)
        lp, ent = fn(z, target, vocab_size=real, **kw)
        (lp * g_lp + ent * g_ent).sum().backward()
        return lp.detach(), ent.detach(), z.grad

    k = run(logprob_entropy, logits, impl="extension")
    r = run(logprob_entropy_ref, logits)
    gold = run(logprob_entropy_ref, logits.float())      # fp32 on the same bf16-rounded values
    assert k[2].dtype == torch.bfloat16 and (k[2][:, real:] == 0).all() and (r[2][:, real:] == 0).all()
    assert torch.isfinite(k[1]).all()
    for kk, rr, gg, name in zip(k[:2], r[:2], gold[:2], ["logp", "entropy"]):
        three_way(kk, rr, gg, name, 2 ** -8)
    # the gradient is 1.2e9 elements: the same three-way criterion, row block by row block in fp32
    k_err = r_err = g_max = 0.0
    for r0 in range(0, T, 512):
        kk, rr, gg = k[2][r0:r0 + 512].float(), r[2][r0:r0 + 512].float(), gold[2][r0:r0 + 512]
        k_err = max(k_err, (kk - gg).abs().max().item())
        r_err = max(r_err, (rr - gg).abs().max().item())
        g_max = max(g_max, gg.abs().max().item())
    assert k_err <= 1.05 * r_err + 1e-6 + 2 ** -8 * g_max, f"grad: kernel error {k_err:.3g} > reference {r_err:.3g}"
