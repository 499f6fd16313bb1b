"""A3PO token-level advantage shaping (section 3 of docs/algorithms.md) against hand values and
a brute-force python loop."""

import math

import pytest
import torch

from popo_mega.algorithms.a3po import shape_advantages


def test_hand_example_with_ties():
    # p = exp(old_logp); row 0 positive A=1, L=5 -> k = max(1, floor(1.0)) = 1: the lowest p.
    # row 1 negative A=-2, L=10 -> k = 2: the two highest p; a tie at the top (positions 3 and 7)
    # and a tie for second (positions 1 and 8) -> earliest first: positions 3 and 7.
    old = torch.log(torch.tensor([
        [0.5, 0.2, 0.9, 0.2, 0.7, 0.3, 0.3, 0.3, 0.3, 0.3],
        [0.1, 0.8, 0.5, 0.9, 0.4, 0.3, 0.2, 0.9, 0.8, 0.6],
    ]))
    mask = torch.tensor([[1] * 5 + [0] * 5, [1] * 10])
    out = shape_advantages(torch.tensor([1.0, -2.0]), old, mask, step=0)
    # row 0: lowest p among the 5 valid is 0.2 at positions 1 and 3 -> position 1 (earliest)
    assert out[0].tolist() == [1.0, 2.0, 1.0, 1.0, 1.0, 0, 0, 0, 0, 0]
    assert out[1].tolist() == [-2.0, -2.0, -2.0, -4.0, -2.0, -2.0, -2.0, -4.0, -2.0, -2.0]


def test_decay_reaches_one():
    old = torch.log(torch.tensor([[0.1, 0.5, 0.9, 0.4, 0.6]]))
    mask = torch.ones(1, 5)
    # scale max(2 - 0.005 * s, 1): s=100 -> 1.5, s=200 -> 1, s=1000 -> 1
    assert shape_advantages(torch.tensor([1.0]), old, mask, step=100)[0, 0].item() == pytest.approx(1.5)
    assert shape_advantages(torch.tensor([1.0]), old, mask, step=200)[0].tolist() == [1.0] * 5
    assert shape_advantages(torch.tensor([1.0]), old, mask, step=1000)[0].tolist() == [1.0] * 5


def _brute_force(adv, old, mask, step, ratio, rho, alpha):
    B, T = len(old), len(old[0])
    scale = max(rho - alpha * step, 1.0)
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b][t]]
        L = len(valid)
        a = adv[b]
        chosen = set()
        if L > 0 and a != 0:
            k = max(1, int(math.floor(L * ratio)))
            p = {t: math.exp(old[b][t]) for t in valid}
            # positives: lowest p first; negatives: highest p first; ties: earlier position first
            key = (lambda t: (p[t], t)) if a > 0 else (lambda t: (-p[t], t))
            chosen = set(sorted(valid, key=key)[:k])
        for t in valid:
            out[b][t] = a * scale if t in chosen else a
    return out


@pytest.mark.parametrize("ratio,step", [(0.2, 0), (0.2, 37), (0.5, 10), (0.05, 0), (1.0, 3)])
def test_matches_brute_force(ratio, step):
    g = torch.Generator().manual_seed(int(ratio * 100) + step)
    B, T = 12, 17
    # coarse probabilities so that ties are frequent
    old = torch.log(torch.randint(1, 6, (B, T), generator=g).double() / 6)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 0, 1
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[2] = 0.0
    out = shape_advantages(adv, old, mask, step=step, ratio=ratio, rho=2.0, alpha=0.005)
    exp = _brute_force(adv.tolist(), old.tolist(), mask.tolist(), step, ratio, 2.0, 0.005)
    assert torch.allclose(out, torch.tensor(exp, dtype=torch.float64), atol=1e-12)
    # exactly max(1, floor(L * ratio)) scaled tokens per non-empty response with A != 0
    scale = max(2.0 - 0.005 * step, 1.0)
    if scale > 1:
        n_scaled = ((out != adv[:, None]) & (mask != 0)).sum(1)
        for b in range(B):
            L = int(lengths[b])
            want = 0 if L == 0 or adv[b] == 0 else max(1, math.floor(L * ratio))
            assert int(n_scaled[b]) == want


def test_separate_negative_schedule_and_bad_inputs():
    old = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    out = shape_advantages(torch.tensor([1.0, -1.0]), old, torch.ones(2, 2), step=0, ratio=0.5,
                           rho=3.0, alpha=0.0, rho_neg=1.5, alpha_neg=0.0)
    assert out.tolist() == [[3.0, 1.0], [-1.0, -1.5]]
    with pytest.raises(ValueError, match="advantages"):
        shape_advantages(torch.ones(2, 2), old, torch.ones(2, 2), step=0)
    with pytest.raises(ValueError, match="ratio"):
        shape_advantages(torch.ones(2), old, torch.ones(2, 2), step=0, ratio=1.5)
