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
    stats_k = torch.ops.popo_mega.logprob_entropy_stats(shard, target, 10, 40)
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
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (logits, target, 0, 13))
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_stats, (logits, target.clamp(max=9), 0, 10))
    logz = torch.logsumexp(logits, 1)
    ent = torch.rand(6)
    torch.library.opcheck(torch.ops.popo_mega.logprob_entropy_grad, (logits, target, 0, 13, logz, ent, g_lp, g_ent))


def test_binding_rejects_bad_inputs():
    require_extension()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), 0, 3)
    with pytest.raises(RuntimeError, match="target must be"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32), 0, 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(3, 2).t(), torch.zeros(2, dtype=torch.long), 0, 3)
    with pytest.raises(RuntimeError, match="vocab_size must be >= 1"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0, 0)
    with pytest.raises(RuntimeError, match="vocab_start must be >= 0"):
        torch.ops.popo_mega.logprob_entropy_stats(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), -1, 3)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        logprob_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), vocab_size=0, impl="extension")


# ---- padded vocabulary (defect 11) ----
# megatron pads the vocabulary (Qwen2.5: 151,665 real ids -> 151,936 columns). Before the fix the
# trainer masked the padding columns with finfo(bf16).min/2 = -1.7e38; the CPU kernel's exp then
# returned a clamped 1e-38 and 1e-38 * -1.7e38 added ~-2 per padding column to the entropy sums
# (entropy 24 instead of 1.9), and the CUDA kernel overflowed d*s to -inf (NaN). Fewer than 2,048
# real columns per row is what the CUDA kernel needed to fail (a whole thread saw only padding).

def _padded_case(T, V_pad, real, dtype, seed=5, vocab_start=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, V_pad, generator=g) * 3).to(dtype)
    target = vocab_start + torch.randint(0, real, (T,), generator=g)
    g_lp, g_ent = torch.randn(T, generator=g) * 3, torch.randn(T, generator=g) * 3
    return logits, target, g_lp, g_ent


def _gold_real(logits, target, g_lp, g_ent, real, vocab_start=0):
    """float64 gold over the real columns only; the gradient of padding columns is 0."""
    lp, ent, grad = _gold(logits[:, :real], target - vocab_start, g_lp, g_ent)
    full = torch.zeros(logits.shape, dtype=torch.float64)
    full[:, :real] = grad
    return lp, ent, full


@pytest.mark.parametrize("impl", ["extension", "reference"])
def test_bf16_padding_masked_at_finfo_min_half_gives_the_real_vocab_entropy(impl):
    """What the trainer did before ``vocab_size``: padding set to finfo.min/2 (fails before the fix
    for impl=extension on CPU: entropy off by ~2 per padding column / sum-exp)."""
    if impl == "extension":
        require_extension()
    real = 1000
    logits, target, g_lp, g_ent = _padded_case(7, 1024, real, torch.bfloat16)
    masked = logits.clone()
    masked[:, real:] = torch.finfo(torch.bfloat16).min / 2
    lp, ent, grad = _run(logprob_entropy, masked, target, g_lp, g_ent, impl=impl)
    gold = _gold_real(logits, target, g_lp, g_ent, real)
    assert torch.isfinite(ent).all() and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(lp.double(), gold[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.double(), gold[2], atol=2e-3, rtol=8e-3)   # bf16: one rounding
    assert (grad[:, real:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["extension", "reference"])
def test_vocab_size_skips_padding_columns_unread(dtype, impl):
    """With ``vocab_size`` the padding columns are never read: NaN and +1e4 there change nothing,
    and their gradient is exactly 0. 1,001 real of 1,024 columns: a tail that is not a whole vector."""
    if impl == "extension":
        require_extension()
    real = 1001
    logits, target, g_lp, g_ent = _padded_case(9, 1024, real, dtype, seed=6)
    junk = logits.clone()
    junk[:, real::2] = float("nan")
    junk[:, real + 1::2] = 1e4
    lp, ent, grad = _run(logprob_entropy, junk, target, g_lp, g_ent, impl=impl, vocab_size=real)
    gold = _gold_real(logits, target, g_lp, g_ent, real)
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=8e-3)
    torch.testing.assert_close(lp.double(), gold[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), gold[1], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad.double(), gold[2], **tol)
    assert grad.dtype == dtype and (grad[:, real:] == 0).all()


@pytest.mark.parametrize("impl", ["extension", "reference"])
def test_vocab_size_with_a_shard_start_and_a_target_in_the_padding(impl):
    """A last TP shard [96, 160) of a vocabulary of 130 real ids: 34 real columns; a target id in
    the padding (>= vocab_size) lies in no shard and must fail the in-shard assert."""
    if impl == "extension":
        require_extension()
    start, real = 96, 130
    logits, target, g_lp, g_ent = _padded_case(5, 64, real - start, torch.float32, seed=8, vocab_start=start)
    lp, ent, grad = _run(logprob_entropy, logits, target, g_lp, g_ent, impl=impl, vocab_start=start, vocab_size=real)
    gold = _gold_real(logits, target, g_lp, g_ent, real - start, vocab_start=start)
    for k, gg in zip((lp, ent, grad), gold):
        torch.testing.assert_close(k.double(), gg, atol=2e-6, rtol=2e-5)
    bad = target.clone()
    bad[2] = real + 3
    with pytest.raises(RuntimeError, match="padding id >= vocab_size"):
        logprob_entropy(logits, bad, vocab_start=start, vocab_size=real, impl=impl)


def test_stats_of_an_all_padding_shard():
    """A shard wholly past vocab_size (TP rank beyond the real ids): max -inf, sums 0, grad 0."""
    require_extension()
    logits, target, g_lp, g_ent = _case(4, 16, 9, torch.bfloat16)
    stats = torch.ops.popo_mega.logprob_entropy_stats(logits, target, 32, 20)
    assert torch.equal(stats[0], torch.full((4,), float("-inf")))
    assert torch.equal(stats[1:], torch.zeros(3, 4))
    grad = torch.ops.popo_mega.logprob_entropy_grad(logits, target, 32, 20, torch.zeros(4), torch.zeros(4), g_lp, g_ent)
    assert (grad == 0).all()


def _tp2_padded_worker(rank, world_size, impls):
    """TP=2 over a vocabulary of 40 real ids padded to 2 x 32 columns: rank 1 holds 8 real ids.
    And 2 x 32 columns with 20 real ids: rank 1's shard is all padding."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    out = {}
    for impl in impls:
        for real in (40, 20):
            logits, target, g_lp, g_ent = _padded_case(6, 64, real, torch.float32, seed=real)
            shard = logits[:, rank * 32:(rank + 1) * 32].contiguous().requires_grad_(True)
            lp, ent = logprob_entropy(shard, target, group=dist.group.WORLD, vocab_size=real, impl=impl)
            (lp * g_lp + ent * g_ent).sum().backward()
            out[impl, real] = (lp, ent, shard.grad)
    return out


@pytest.mark.slow   # one 2-process world: 58 s on a loaded 2-core machine, process start-up dominating
def test_tp2_padded_vocab_with_an_all_padding_shard():
    """Reference twin and kernel in one gloo world (process start-up dominates)."""
    from tests.multiprocess import run_world
    require_extension()
    results = run_world(_tp2_padded_worker, 2, ("reference", "extension"))
    for impl in ("reference", "extension"):
        for real in (40, 20):
            logits, target, g_lp, g_ent = _padded_case(6, 64, real, torch.float32, seed=real)
            gold = _gold_real(logits, target, g_lp, g_ent, real)
            for rank, res in enumerate(results):
                lp, ent, grad = res[impl, real]
                msg = f"{impl}, {real} real ids, rank {rank}"
                torch.testing.assert_close(lp.double(), gold[0], atol=2e-6, rtol=2e-5, msg=msg)
                torch.testing.assert_close(ent.double(), gold[1], atol=2e-6, rtol=2e-5, msg=msg)
                torch.testing.assert_close(grad.double(), gold[2][:, rank * 32:(rank + 1) * 32], atol=2e-6,
                                           rtol=2e-5, msg=msg)
