"""GRPO (section 2 of docs/algorithms.md): advantages, k3 KL, aggregation, hand-derived values."""

import math

import pytest
import torch

from popo_mega.algorithms.grpo import group_advantages, k3_kl, policy_loss


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])
    a = group_advantages(r, group_size=4)
    s0 = math.sqrt(1 / 3)     # unbiased std of (1,0,0,1): sqrt(4 * 0.25 / 3)
    s2 = 0.5                  # unbiased std of (0,0,0,1): sqrt((3 * 0.0625 + 0.5625) / 3)
    expected = [0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6),
                0.0, 0.0, 0.0, 0.0,
                -0.25 / (s2 + 1e-6), -0.25 / (s2 + 1e-6), -0.25 / (s2 + 1e-6), 0.75 / (s2 + 1e-6)]
    assert a.tolist() == pytest.approx(expected, abs=1e-6)
    assert a[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]           # equal rewards: exactly zero
    dr = group_advantages(r, group_size=4, std_normalize=False)
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75])


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.zeros(4), group_size=1)


def test_k3_hand_values_and_gradient():
    logp = torch.tensor([0.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([math.log(2.0), -1.0], dtype=torch.float64)
    k = k3_kl(logp, ref)
    assert k.tolist() == pytest.approx([1 - math.log(2.0), 0.0], abs=1e-12)   # e^d - d - 1
    k.sum().backward()
    assert logp.grad.tolist() == pytest.approx([1 - 2.0, 0.0], abs=1e-12)    # d/dlogp = 1 - e^d


def _hand_batch():
    # seq0: 2 tokens, A = +1; seq1: 3 valid tokens + 1 masked, A = -0.5; on-policy (rho = 1)
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.7, -9.0], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -0.5, -0.5, -0.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0], dtype=torch.float64)
    cu = torch.tensor([0, 2, 6])
    return logp, adv, mask, cu


def test_policy_loss_token_mean_hand_value():
    logp, adv, mask, cu = _hand_batch()
    loss, st = policy_loss(logp, logp.detach(), adv, mask, normaliser=5.0, agg="token_mean")
    assert loss.item() == pytest.approx((-1 - 1 + 0.5 * 3) / 5, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.2, -0.2, 0.1, 0.1, 0.1, 0.0], abs=1e-12)
    assert st["token_count"].item() == 5.0


def test_policy_loss_seq_mean_token_mean_hand_value():
    logp, adv, mask, cu = _hand_batch()
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, normaliser=2.0, agg="seq_mean_token_mean", cu_seqlens=cu)
    assert loss.item() == pytest.approx((-1 + 0.5) / 2, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([-1 / 4, -1 / 4, 0.5 / 6, 0.5 / 6, 0.5 / 6, 0.0], abs=1e-12)


def test_policy_loss_with_k3_kl_hand_value():
    logp, adv, mask, cu = _hand_batch()
    ref = logp.detach() + math.log(2.0)          # every token: k3 = 1 - log 2
    loss, st = policy_loss(logp, logp.detach(), adv, mask, normaliser=5.0, beta_kl=0.04, ref_logp=ref)
    assert st["kl"].item() == pytest.approx(1 - math.log(2.0), abs=1e-12)
    assert loss.item() == pytest.approx(-0.1 + 0.04 * (1 - math.log(2.0)), abs=1e-12)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), adv, mask, normaliser=5.0, beta_kl=0.04)


def test_policy_loss_matches_float64_loop_off_policy():
    g = torch.Generator().manual_seed(7)
    lens = [4, 1, 6, 3]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    T = sum(lens)
    logp = (torch.randn(T, generator=g, dtype=torch.float64) * 0.3 - 1).requires_grad_()
    old = logp.detach() + torch.randn(T, generator=g, dtype=torch.float64) * 0.3
    ref = logp.detach() + torch.randn(T, generator=g, dtype=torch.float64) * 0.3
    a_seq = torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64)
    adv = a_seq.repeat_interleave(torch.tensor(lens))
    mask = torch.ones(T, dtype=torch.float64)
    mask[5] = 0
    lo, hi, beta = 0.2, 0.28, 0.1
    loss, _ = policy_loss(logp, old, adv, mask, normaliser=4.0, agg="seq_mean_token_mean", cu_seqlens=cu,
                          eps_low=lo, eps_high=hi, beta_kl=beta, ref_logp=ref)
    # Second formulation: per-sequence python loop with the min written out.
    total = 0.0
    for b in range(4):
        terms = []
        for t in range(int(cu[b]), int(cu[b + 1])):
            if mask[t] == 0:
                continue
            r = math.exp(logp[t].item() - old[t].item())
            a = a_seq[b].item()
            surr = min(r * a, min(max(r, 1 - lo), 1 + hi) * a)
            d = ref[t].item() - logp[t].item()
            terms.append(-surr + beta * (math.exp(d) - d - 1))
        total += sum(terms) / len(terms) if terms else 0.0
    assert loss.item() == pytest.approx(total / 4, abs=1e-12)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_k3_term_value_and_gradient_by_hand(agg):
    """The KL term alone (A = 0, so the policy term is 0 with zero gradient), float64.
    seq0: d = ref - logp = (log 2, 0); seq1: d = (log 3, -log 2, 0) and one masked token whose
    reference is junk (0, as the trainer's reference pass leaves it off the mask: d = 9).
    k3 = e^d - d - 1: (1 - log 2, 0 | 2 - log 3, log 2 - 1/2, 0); d k3 / d logp = 1 - e^d:
    (-1, 0 | -2, 1/2, 0); the masked token contributes nothing."""
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.5, -0.7, -9.0], dtype=torch.float64, requires_grad=True)
    d = torch.tensor([math.log(2), 0.0, math.log(3), -math.log(2), 0.0, 0.0], dtype=torch.float64)
    ref = logp.detach() + d
    ref[5] = 0.0
    mask = torch.tensor([1.0, 1, 1, 1, 1, 0], dtype=torch.float64)
    cu = torch.tensor([0, 2, 6])
    beta = 0.04
    k3 = [1 - math.log(2), 0.0, 2 - math.log(3), math.log(2) - 0.5, 0.0]
    dk3 = [-1.0, 0.0, -2.0, 0.5, 0.0]
    if agg == "token_mean":   # normaliser: 5 response tokens
        norm, w = 5.0, [1 / 5] * 5
        kl = sum(k3) / 5
    else:                     # normaliser: 2 rollouts; rollout i's tokens weigh 1 / (2 L_i)
        norm, w = 2.0, [1 / 4] * 2 + [1 / 6] * 3
        kl = (sum(k3[:2]) / 2 + sum(k3[2:]) / 3) / 2
    loss, st = policy_loss(logp, logp.detach(), torch.zeros(6, dtype=torch.float64), mask, normaliser=norm,
                           agg=agg, cu_seqlens=cu, beta_kl=beta, ref_logp=ref)
    assert st["kl"].item() == pytest.approx(kl, abs=1e-12)
    assert st["pg"].item() == 0.0
    assert loss.item() == pytest.approx(beta * kl, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist() == pytest.approx([beta * wi * g for wi, g in zip(w, dk3)] + [0.0], abs=1e-12)


@pytest.mark.parametrize("key, value", [("algorithm.grpo.beta_kl", -0.04), ("algorithm.grpo.beta_kl", float("nan")),
                                        ("train.updates_per_rollout", 0)])
def test_bad_kl_weight_or_update_count_is_a_config_error(key, value):
    from popo_mega.config import ConfigError, config_from_dict

    section, *mid, last = key.split(".")
    raw = node = {}
    for part in [section, *mid]:
        node = node.setdefault(part, {})
    node[last] = value
    with pytest.raises(ConfigError, match=rf"<dict>: key '{key}' must be >= "):
        config_from_dict(raw)
