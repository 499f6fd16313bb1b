"""Kernel 2 (fused clipped surrogate) against its reference twin, fp32 gold and hand-computed values."""

import pytest
import torch

from popo_mega.ops import clipped_surrogate, clipped_surrogate_ref
from tests.unit.test_ops_common import require_extension, three_way

EPS = (0.2, 0.28)


def _case(n, seed, dtype, mask_kind="bool"):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g) * 3
    logp = old + torch.randn(n, generator=g) * 0.3          # rho spread over both clip sides
    adv = torch.randn(n, generator=g)
    adv[::7] = 0.0
    mask = torch.rand(n, generator=g) > 0.2
    if mask_kind == "float":
        mask = mask.float() * torch.rand(n, generator=g)
    logp[~(mask != 0)] = float("nan")                       # padding garbage must not leak
    grad = torch.randn(n, generator=g)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, grad.to(dtype)


def _run(fn, logp, old, adv, mask, grad, **kw):
    x = logp.clone().requires_grad_(True)
    loss, stats = fn(x, old, adv, mask, *EPS, **kw)
    (loss * grad).sum().backward()
    return loss.detach(), x.grad, torch.stack([stats[k] for k in ("clip_low_count", "clip_high_count",
                                                                 "rho_sum", "token_count")])


@pytest.mark.parametrize("n,mask_kind", [(4097, "bool"), (1, "bool"), (333, "float")])
def test_fp32_matches_reference(n, mask_kind):
    require_extension()
    args = _case(n, n, torch.float32, mask_kind)
    k, r = _run(clipped_surrogate, *args, impl="extension"), _run(clipped_surrogate_ref, *args)
    for kk, rr, name in zip(k, r, ["loss", "grad", "stats"]):
        assert torch.isfinite(kk).all(), name
        torch.testing.assert_close(kk, rr, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_three_way():
    require_extension()
    args = _case(1000, 5, torch.bfloat16)
    k, r = _run(clipped_surrogate, *args, impl="extension"), _run(clipped_surrogate_ref, *args)
    gold = _run(clipped_surrogate_ref, *[a.float() if a.is_floating_point() else a for a in args])
    assert k[0].dtype == torch.bfloat16 and k[1].dtype == torch.bfloat16
    three_way(k[0], r[0], gold[0], "loss", 2 ** -8)
    three_way(k[1], r[1], gold[1], "grad", 2 ** -8)
    three_way(k[2], r[2], gold[2], "stats", 1e-5)


def test_hand_computed_values():
    require_extension()
    # rho = e^{ln 1.5} = 1.5 with A = +1: clipped at 1.28 -> loss -1.28, no gradient, clip_high.
    # rho = 0.5 with A = -2: clip(0.5) = 0.8 -> min(-1.0, -1.6) = -1.6 -> loss 1.6, no grad, clip_low.
    # rho = 1.1 with A = 3: inside -> loss -3.3, d/dlogp = -A rho = -3.3.
    # masked token: loss 0, grad 0, not counted.
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 7.0])).requires_grad_(True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -2.0, 3.0, 1.0])
    mask = torch.tensor([True, True, True, False])
    loss, stats = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28, impl="extension")
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.28, 1.6, -3.3, 0.0]))
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.0, -3.3, 0.0]))
    assert stats["clip_high_count"].item() == 1 and stats["clip_low_count"].item() == 1
    assert stats["token_count"].item() == 3
    torch.testing.assert_close(stats["rho_sum"], torch.tensor(3.1))


def test_opcheck():
    require_extension()
    logp, old, adv, mask, grad = _case(50, 1, torch.float32)
    logp = torch.nan_to_num(logp)
    torch.library.opcheck(torch.ops.popo_mega.clipped_surrogate,
                          (logp.requires_grad_(True), old, adv, mask, *EPS))
    torch.library.opcheck(torch.ops.popo_mega.clipped_surrogate_grad, (grad, logp.detach(), old, adv, mask, *EPS))


def test_traces_under_torch_compile():
    """The registered op (fake impl + autograd) runs inside a compiled graph (aot_eager backend:
    dynamo + AOT autograd, no code generation, so it is quick)."""
    require_extension()
    logp, old, adv, mask, grad = _case(257, 9, torch.float32)

    def loss_fn(x):
        loss, stats = torch.ops.popo_mega.clipped_surrogate(x, old, adv, mask, *EPS)
        return (loss * grad).sum(), stats

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    x1 = logp.clone().requires_grad_(True)
    x2 = logp.clone().requires_grad_(True)
    (l1, s1), (l2, s2) = compiled(x1), loss_fn(x2)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(x1.grad, x2.grad)
