"""clipped_surrogate (Eq. P2 extension / GRPO) against hand-derived numbers and a float64 loop."""

import math

import pytest
import torch

from popo_mega.algorithms.surrogate import clipped_surrogate


def test_hand_derived_values_gradients_and_stats():
    # token: (logp, A, mask); old_logp = 0 so rho = exp(logp); eps_low 0.2, eps_high 0.28
    logp = torch.tensor([0.0, 0.5, -0.5, 0.1, math.log(1.1), -0.5, 0.5], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 0.0, -2.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1])
    loss, st = clipped_surrogate(logp, torch.zeros(7, dtype=torch.float64), adv, mask, 0.2, 0.28)
    e5, em5 = math.exp(0.5), math.exp(-0.5)
    expected = [
        -1.0,        # rho 1: -rho*A
        -1.28,       # A>0, rho 1.65 > 1.28: clipped branch, -1.28*A
        0.8,         # A<0, rho 0.61 < 0.8: clipped branch, -(0.8 * -1)
        0.0,         # masked
        2.2,         # rho 1.1 inside the range: -(1.1 * -2)
        -em5,        # A>0, rho 0.61 < 0.8: min picks rho*A (unclipped), not a clip
        e5,          # A<0, rho 1.65 > 1.28: min picks rho*A (unclipped), not a clip
    ]
    assert loss.tolist() == pytest.approx(expected, abs=1e-12)
    loss.sum().backward()
    # d/dlogp of -rho*A is -rho*A on unclipped tokens, 0 on clipped / masked ones
    assert logp.grad.tolist() == pytest.approx([-1.0, 0.0, 0.0, 0.0, 2.2, -em5, e5], abs=1e-12)
    assert st["clip_high_count"].item() == 1.0
    assert st["clip_low_count"].item() == 1.0
    assert st["token_count"].item() == 6.0
    assert st["rho_sum"].item() == pytest.approx(1 + e5 + em5 + 1.1 + em5 + e5, rel=1e-6)
    assert all(not v.requires_grad for v in st.values())


def test_masked_garbage_gives_no_nan():
    logp = torch.tensor([-1.0, 50.0], requires_grad=True)
    old = torch.tensor([-1.0, float("-inf")])
    loss, st = clipped_surrogate(logp, old, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]), 0.2, 0.2)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert loss[1].item() == 0.0 and logp.grad[1].item() == 0.0
    assert st["rho_sum"].item() == pytest.approx(1.0)


def test_matches_float64_branch_loop():
    g = torch.Generator().manual_seed(0)
    n = 200
    logp = (torch.randn(n, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    old = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, generator=g) > 0.2).double()
    lo, hi = 0.2, 0.28
    loss, st = clipped_surrogate(logp, old, adv, mask, lo, hi)
    loss.sum().backward()
    exp_loss, exp_grad, n_low, n_high = [], [], 0, 0
    for lp, o, a, m in zip(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist()):
        r = math.exp(lp - o)
        if m == 0:
            exp_loss.append(0.0); exp_grad.append(0.0); continue
        # Write the min out by cases: the clipped branch wins when it is strictly smaller.
        if a > 0 and r > 1 + hi:
            exp_loss.append(-(1 + hi) * a); exp_grad.append(0.0); n_high += 1
        elif a < 0 and r < 1 - lo:
            exp_loss.append(-(1 - lo) * a); exp_grad.append(0.0); n_low += 1
        else:
            exp_loss.append(-r * a); exp_grad.append(-r * a)
    assert loss.tolist() == pytest.approx(exp_loss, abs=1e-12)
    assert logp.grad.tolist() == pytest.approx(exp_grad, abs=1e-12)
    assert (st["clip_low_count"].item(), st["clip_high_count"].item()) == (n_low, n_high)
    assert n_low > 0 and n_high > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="share one shape"):
        clipped_surrogate(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.ones(3), 0.2, 0.2)
    with pytest.raises(ValueError, match="eps_low"):
        clipped_surrogate(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), -0.1, 0.2)
