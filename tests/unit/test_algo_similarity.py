"""masked_mean_pool and cosine_penalty (Eq. P3) against hand numbers and brute force."""

import math

import pytest
import torch

from popo_mega.algorithms.similarity import cosine_penalty, masked_mean_pool


def test_pool_hand_values_and_empty_segment():
    hidden = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [0.0, 1.0]],
                          requires_grad=True)
    cu = torch.tensor([0, 3, 4, 4, 6])            # segments of 3, 1, 0 and 2 tokens
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    out = masked_mean_pool(hidden, cu, mask)
    expected = [[4.0, 5.0],        # mean of rows 1, 2
                [0.0, 0.0],        # the only token is masked out
                [0.0, 0.0],        # empty segment
                [4.5, 5.5]]        # mean of rows 4, 5
    assert out.tolist() == expected
    out.sum().backward()
    assert hidden.grad[:, 0].tolist() == [0.0, 0.5, 0.5, 0.0, 0.5, 0.5]


def test_pool_matches_loop():
    g = torch.Generator().manual_seed(1)
    lens = [5, 0, 3, 7, 1]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    hidden = torch.randn(sum(lens), 4, generator=g, dtype=torch.float64)
    mask = (torch.rand(sum(lens), generator=g) > 0.3).double()
    out = masked_mean_pool(hidden, cu, mask)
    for b in range(len(lens)):
        rows = [hidden[t] for t in range(cu[b], cu[b + 1]) if mask[t] > 0]
        exp = torch.stack(rows).mean(0) if rows else torch.zeros(4, dtype=torch.float64)
        assert torch.allclose(out[b], exp, atol=1e-12)


def test_pool_bad_cu_seqlens():
    with pytest.raises(ValueError, match="cu_seqlens"):
        masked_mean_pool(torch.zeros(4, 2), torch.tensor([0, 2, 3]), torch.ones(4))


def test_cosine_penalty_hand_values():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 1.0], [0.0, -2.0], [1.0, 1.0]])
    w = torch.tensor([0.5, 0.25, 0.25])
    out = cosine_penalty(pred, target, w, 1.5)
    # cos = 1/sqrt(2), -1, and 0 for the zero vector (defined as 0)
    assert out.item() == pytest.approx(-(0.5 / math.sqrt(2) - 0.25) / 1.5, rel=1e-6)
    out.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[2].tolist() == [0.0, 0.0]            # zero vector: no gradient
    # d cos(p, t)/dp at p=(1,0), t=(1,1)/sqrt2: t_hat - cos * p_hat = (0, 1/sqrt2); times -w/normaliser
    assert pred.grad[0].tolist() == pytest.approx([0.0, -0.5 / 1.5 / math.sqrt(2)], abs=1e-7)
    # anti-parallel: gradient of cos is 0 (a stationary point)
    assert pred.grad[1].tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_cosine_penalty_bounded_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    val = cosine_penalty(pred, target, w, w.sum())
    assert -1.0 <= val.item() <= 1.0
    assert torch.autograd.gradcheck(lambda p: cosine_penalty(p, target, w, w.sum()).double(), (pred,))
    # Independent formulation: a loop over the rows in float64.
    exp = -sum(w[b] * torch.dot(pred[b], target[b]) / (pred[b].norm() * target[b].norm()) for b in range(6)) / w.sum()
    assert val.item() == pytest.approx(exp.item(), rel=1e-6)


def test_target_gets_no_gradient_and_zero_normaliser():
    pred = torch.randn(2, 3, requires_grad=True)
    target = torch.randn(2, 3, requires_grad=True)
    cosine_penalty(pred, target, torch.ones(2), 2.0).backward()
    assert target.grad is None
    assert cosine_penalty(pred, target, torch.zeros(2), 0.0).item() == 0.0
