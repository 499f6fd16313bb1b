"""POPO (Eq. P1-P5 of docs/algorithms.md): weights, loss values, gradients, positive-only property,
and the implicit negative gradient on a tiny softmax policy."""

import math

import pytest
import torch
from torch import nn

from popo_mega.algorithms.popo import popo_loss, popo_normalisers, positive_weights

# ----------------------------------------------------------------------------------------- P1


def test_weights_hand_values():
    # group 0: lbar = log(1), log(2), log(3), log(5), positives {0, 1, 3}: softmax = c_j / sum c_j
    # group 1: no positive
    lbar = torch.log(torch.tensor([1.0, 2.0, 3.0, 5.0, 1.0, 1.0, 1.0, 1.0]))
    pos = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    w = positive_weights(lbar, pos, group_size=4)
    assert w.tolist() == pytest.approx([1 / 8, 2 / 8, 0, 5 / 8, 0, 0, 0, 0], abs=1e-7)
    # temperature 2: weights proportional to sqrt(c_j)
    w2 = positive_weights(lbar, pos, group_size=4, temperature=2.0)
    z = 1 + math.sqrt(2) + math.sqrt(5)
    assert w2[:4].tolist() == pytest.approx([1 / z, math.sqrt(2) / z, 0, math.sqrt(5) / z], abs=1e-7)
    # uniform: 1/|S+|
    wu = positive_weights(lbar, pos, group_size=4, mode="uniform")
    assert wu.tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0, 0], abs=1e-7)
    # length normalisation: (w / |y|) renormalised: (1/8)/1, (2/8)/2, (5/8)/5 are all 1/8 -> 1/3 each
    wl = positive_weights(lbar, pos, group_size=4, length=torch.tensor([1.0, 2.0, 7.0, 5.0, 1, 1, 1, 1]))
    assert wl.tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0, 0, 0, 0], abs=1e-7)


def test_weights_bounded_and_normalised_per_prompt():
    g = torch.Generator().manual_seed(0)
    for mode in ("softmax", "uniform"):
        lbar = -torch.rand(64, generator=g) * 30      # very different log-probs: no overflow
        pos = torch.rand(64, generator=g) > 0.6
        pos[:8] = False                               # prompt 0 has no positive
        w = positive_weights(lbar, pos, group_size=8, mode=mode).reshape(8, 8)
        assert ((w >= 0) & (w <= 1)).all()
        assert (w[~pos.reshape(8, 8)] == 0).all()
        has = pos.reshape(8, 8).any(1)
        assert torch.allclose(w.sum(1)[has], torch.ones(int(has.sum())), atol=1e-6)
        assert (w.sum(1)[~has] == 0).all()


def test_weights_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        positive_weights(torch.zeros(6), torch.ones(6, dtype=torch.bool), group_size=4)
    with pytest.raises(ValueError, match="mode"):
        positive_weights(torch.zeros(4), torch.ones(4, dtype=torch.bool), group_size=4, mode="max")
    with pytest.raises(ValueError, match="bool"):
        positive_weights(torch.zeros(4), torch.ones(4), group_size=4)


# ----------------------------------------------------------------------------------------- P2


def _hand_batch():
    # 3 rollouts: seq0 positive (w 0.25) tokens logp [-1, -2]; seq1 negative [-3];
    # seq2 positive (w 0.75) [-0.5, (-4 masked)].  N+ = 3.
    logp = torch.tensor([-1.0, -2.0, -3.0, -0.5, -4.0], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    cu = torch.tensor([0, 2, 3, 5])
    w = torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64)
    pos = torch.tensor([True, False, True])
    return logp, mask, cu, w, pos


def test_pg_weighted_nll_hand_value_and_gradient():
    logp, mask, cu, w, pos = _hand_batch()
    total, parts = popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0)
    # -(0.25*(-1) + 0.25*(-2) + 0.75*(-0.5)) / 3 = 1.125 / 3
    assert total.item() == pytest.approx(0.375, abs=1e-12)
    assert parts["pg"].item() == pytest.approx(0.375, abs=1e-12)
    total.backward()
    assert logp.grad.tolist() == pytest.approx([-0.25 / 3, -0.25 / 3, 0.0, -0.75 / 3, 0.0], abs=1e-12)
    assert parts["positive_token_count"].item() == 3.0


def test_pg_clipped_equals_weighted_nll_gradient_at_rho_one():
    """P2: with rho = 1 the clipped surrogate's gradient equals the weighted-NLL gradient."""
    g = torch.Generator().manual_seed(3)
    lens = [3, 5, 2, 4, 6, 1]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    T = sum(lens)
    base = torch.randn(T, generator=g, dtype=torch.float64) - 2
    mask = (torch.rand(T, generator=g) > 0.2).double()
    pos = torch.tensor([True, False, True, True, False, True])
    w = torch.rand(6, generator=g, dtype=torch.float64) * pos
    n_pos = float((mask * pos.repeat_interleave(torch.tensor(lens))).sum())
    grads = {}
    for mode in ("none", "token"):
        logp = base.clone().requires_grad_()
        total, _ = popo_loss(logp, mask, cu, w, pos, num_positive_tokens=n_pos,
                             old_logp=base.clone(), is_correction=mode)
        total.backward()
        grads[mode] = logp.grad
    # Independent expectation: d/dlogp_t of -(1/N+) w_i m_t logp_t is -w_i m_t / N+ on positives.
    expected = -(w * pos).repeat_interleave(torch.tensor(lens)) * mask / n_pos
    assert torch.allclose(grads["none"], expected, atol=1e-14)
    assert torch.allclose(grads["token"], expected, atol=1e-14)


def test_pg_clipped_token_above_one_plus_eps_high_gets_zero_gradient():
    logp, mask, cu, w, pos = _hand_batch()
    old = logp.detach().clone()
    old[1] -= 0.4            # rho_1 = e^0.4 = 1.49 > 1 + 0.28: clipped, zero gradient
    old[3] -= 0.1            # rho_3 = e^0.1 = 1.105: inside the range, gradient -rho*w/N+
    total, parts = popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0, old_logp=old,
                             is_correction="token", eps_low=0.2, eps_high=0.28)
    total.backward()
    assert logp.grad[1].item() == 0.0
    assert logp.grad[0].item() == pytest.approx(-0.25 / 3, abs=1e-12)
    assert logp.grad[3].item() == pytest.approx(-math.exp(0.1) * 0.75 / 3, abs=1e-12)
    assert parts["clip_high_count"].item() == 1.0
    # value: -(0.25*1 + 0.25*1.28 + 0.75*e^0.1) / 3
    assert total.item() == pytest.approx((0.25 + 0.25 * 1.28 + 0.75 * math.exp(0.1)) / -3, abs=1e-12)


# ----------------------------------------------------------------------------------------- P3-P5


def test_total_is_pg_plus_alpha_sim_plus_beta_ent_hand_values():
    logp, mask, cu, w, pos = _hand_batch()
    pred = torch.tensor([[1.0, 0.0], [5.0, 5.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    entropy = torch.tensor([0.5, 1.0, 9.0, 2.0, 7.0], dtype=torch.float64, requires_grad=True)
    total, parts = popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0,
                             pred=pred, target=target, weight_sum=1.0, alpha=0.1,
                             entropy=entropy, entropy_token_count=3.0, entropy_on="positive", beta=0.01)
    sim = -(0.25 / math.sqrt(2) + 0.75 * 1.0) / 1.0          # seq1 (negative) is ignored
    ent = -(0.5 + 1.0 + 2.0) / 3.0                           # positive, unmasked tokens only
    assert parts["sim"].item() == pytest.approx(sim, abs=1e-12)
    assert parts["ent"].item() == pytest.approx(ent, abs=1e-12)
    assert total.item() == pytest.approx(0.375 + 0.1 * sim + 0.01 * ent, abs=1e-12)
    total.backward()
    assert entropy.grad.tolist() == pytest.approx([-0.01 / 3, -0.01 / 3, 0, -0.01 / 3, 0], abs=1e-12)
    assert pred.grad[1].tolist() == [0.0, 0.0]
    # entropy_on=all: every unmasked response token, here 4 of them
    _, parts_all = popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0,
                             entropy=entropy, entropy_token_count=4.0, entropy_on="all")
    assert parts_all["ent"].item() == pytest.approx(-(0.5 + 1.0 + 9.0 + 2.0) / 4.0, abs=1e-12)


def test_normalisers_hand_values():
    _, mask, cu, w, pos = _hand_batch()
    n = popo_normalisers(mask, cu, w, pos, entropy_on="positive")
    assert (n["num_positive_tokens"].item(), n["weight_sum"].item(), n["entropy_token_count"].item()) == (3.0, 1.0, 3.0)
    assert popo_normalisers(mask, cu, w, pos, entropy_on="all")["entropy_token_count"].item() == 4.0


def test_bad_options_are_named():
    logp, mask, cu, w, pos = _hand_batch()
    with pytest.raises(ValueError, match="is_correction"):
        popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0, is_correction="seq")
    with pytest.raises(ValueError, match="old_logp"):
        popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0, is_correction="token")
    with pytest.raises(ValueError, match="entropy_on"):
        popo_loss(logp, mask, cu, w, pos, num_positive_tokens=3.0, entropy_on="negative")
    with pytest.raises(ValueError, match="cu_seqlens"):
        popo_loss(logp, mask, torch.tensor([0, 2, 4]), w[:2], pos[:2], num_positive_tokens=3.0)


# ------------------------------------------------------------------------- positive-only property


class Bigram(nn.Module):
    """Tiny policy: p(y_t | y_{t-1}) = softmax(W tanh(E[y_{t-1}])). Features = tanh(E[y_{t-1}])."""

    def __init__(self, vocab=6, width=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab + 1, width, generator=g, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(vocab, width, generator=g, dtype=torch.float64) * 0.5)
        self.bos = vocab

    def forward(self, seqs):
        """seqs: list of 1-D token tensors -> (logp [T], entropy [T], hidden [T, H], cu_seqlens [B+1])."""
        ctx = torch.cat([torch.cat([torch.tensor([self.bos]), s[:-1]]) for s in seqs])
        tgt = torch.cat(seqs)
        hidden = torch.tanh(self.emb[ctx])
        logits = hidden @ self.out.T
        logprobs = torch.log_softmax(logits, -1)
        logp = logprobs.gather(1, tgt[:, None])[:, 0]
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist())
        return logp, entropy, hidden, cu


def _popo_step_loss(model, seqs, positive, weights, target_feats):
    from popo_mega.algorithms.similarity import masked_mean_pool
    logp, entropy, hidden, cu = model(seqs)
    mask = torch.ones_like(logp)
    n = popo_normalisers(mask, cu, weights, positive, entropy_on="positive")
    feats = masked_mean_pool(hidden, cu, mask)
    total, _ = popo_loss(logp, mask, cu, weights, positive, num_positive_tokens=n["num_positive_tokens"],
                         pred=feats, target=target_feats, weight_sum=n["weight_sum"],
                         entropy=entropy, entropy_token_count=n["entropy_token_count"], entropy_on="positive")
    return total


def test_negative_rollouts_do_not_change_loss_or_gradient():
    """Changing the tokens and rewards of negatives (same positive set) changes nothing."""
    model = Bigram()
    pos_seqs = [torch.tensor([0, 1, 2]), torch.tensor([3, 3, 0, 1])]
    neg_a = [torch.tensor([5, 4]), torch.tensor([2, 2, 2, 2, 2])]
    neg_b = [torch.tensor([1, 0, 4, 4, 4, 3]), torch.tensor([0])]
    positive = torch.tensor([True, False, True, False])
    target = torch.randn(4, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def run(negs, neg_lbar, neg_target, entropy_on_check=False):
        seqs = [pos_seqs[0], negs[0], pos_seqs[1], negs[1]]
        lbar = torch.tensor([-1.0, neg_lbar, -2.0, neg_lbar], dtype=torch.float64)
        w = positive_weights(lbar, positive, group_size=4)
        t = target.clone()
        t[1] = t[3] = neg_target
        model.zero_grad()
        loss = _popo_step_loss(model, seqs, positive, w, t)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    la, ga = run(neg_a, -0.3, 1.0)
    lb, gb = run(neg_b, -7.0, -4.0)
    assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_prompt_without_positive_contributes_exactly_zero():
    model = Bigram()
    seqs = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([1, 1]), torch.tensor([5])]
    positive = torch.tensor([True, False, False, False])      # prompt 1 (rows 2, 3) has no positive
    w = positive_weights(torch.zeros(4, dtype=torch.float64), positive, group_size=2)
    assert w[2:].tolist() == [0.0, 0.0]
    logp, entropy, hidden, cu = model(seqs)
    logp.retain_grad()
    mask = torch.ones_like(logp)
    total, parts = popo_loss(logp, mask, cu, w, positive, num_positive_tokens=2.0, entropy=entropy,
                             entropy_token_count=2.0, entropy_on="positive")
    total.backward()
    assert (logp.grad[2:] == 0).all()
    # Same as the batch holding only prompt 0, with the same global normalisers.
    logp0, entropy0, _, cu0 = model(seqs[:2])
    total0, _ = popo_loss(logp0, torch.ones_like(logp0), cu0, w[:2], positive[:2], num_positive_tokens=2.0,
                          entropy=entropy0, entropy_token_count=2.0, entropy_on="positive")
    assert total.item() == total0.item()


class SoftmaxTable(nn.Module):
    """Tabular policy: p(y_t | x, y_{t-1}) = softmax(logits[x, y_{t-1}]) (y_0 = BOS)."""

    def __init__(self, prompts=3, vocab=6, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.randn(prompts, vocab + 1, vocab, generator=g, dtype=torch.float64) * 0.1)
        self.bos = vocab

    def forward(self, prompt_ids, seqs):
        """-> (logp [T], entropy [T], cu_seqlens [B+1])."""
        rows = [self.logits[x, torch.cat([torch.tensor([self.bos]), s[:-1]])] for x, s in zip(prompt_ids, seqs)]
        logprobs = torch.log_softmax(torch.cat(rows), -1)
        logp = logprobs.gather(1, torch.cat(seqs)[:, None])[:, 0]
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist())
        return logp, entropy, cu


def test_implicit_negative_gradient_lowers_held_out_negatives():
    """The paper's central claim: POPO steps on positives only lower held-out negatives' log-prob
    (for a softmax policy grad logp(y+) = e_{y+} - pi pushes every other continuation down)."""
    model = SoftmaxTable()
    # 3 prompts x 2 positives (correct answers), trained on; held-out negatives never seen by the loss.
    prompt_ids = [0, 0, 1, 1, 2, 2]
    positives = [torch.tensor([1, 2]), torch.tensor([1, 3]), torch.tensor([0, 5]),
                 torch.tensor([4, 4, 0]), torch.tensor([2]), torch.tensor([3, 1])]
    neg_prompts = [0, 0, 1, 2, 2]
    held_out_negatives = [torch.tensor([2, 2]), torch.tensor([5, 0, 1]), torch.tensor([3, 3]),
                          torch.tensor([0, 1]), torch.tensor([5])]
    positive = torch.ones(6, dtype=torch.bool)

    def seq_logps(pids, seqs):
        with torch.no_grad():
            logp, _, cu = model(pids, seqs)
            return [logp[cu[i]:cu[i + 1]].sum().item() for i in range(len(seqs))]

    before_neg, before_pos = seq_logps(neg_prompts, held_out_negatives), seq_logps(prompt_ids, positives)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for _ in range(5):
        logp, entropy, cu = model(prompt_ids, positives)
        with torch.no_grad():
            lbar = torch.stack([logp[cu[i]:cu[i + 1]].mean() for i in range(6)])
        w = positive_weights(lbar, positive, group_size=2)
        mask = torch.ones_like(logp)
        total, _ = popo_loss(logp, mask, cu, w, positive, num_positive_tokens=float(mask.sum()),
                             entropy=entropy, entropy_token_count=float(mask.sum()))
        opt.zero_grad()
        total.backward()
        opt.step()
    after_neg, after_pos = seq_logps(neg_prompts, held_out_negatives), seq_logps(prompt_ids, positives)
    print("\nimplicit negative gradient (sequence log-probs, before -> after 5 POPO steps on positives only):")
    for name, b, a in (("held-out negatives", before_neg, after_neg), ("positives", before_pos, after_pos)):
        print(f"  {name:18s} " + "  ".join(f"{x:.3f}->{y:.3f}" for x, y in zip(b, a)))
    print(f"  mean held-out negative {sum(before_neg) / 5:.4f} -> {sum(after_neg) / 5:.4f}")
    assert all(a > b for a, b in zip(after_pos, before_pos))
    assert all(a < b for a, b in zip(after_neg, before_neg))
    assert sum(after_neg) / 5 < sum(before_neg) / 5 - 0.1


def test_garbage_in_masked_and_negative_positions_gives_finite_values_and_gradients():
    logp = torch.tensor([-1.0, float("-inf"), float("-inf"), -0.5, float("nan")], dtype=torch.float64,
                        requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)   # token 2 belongs to a negative
    cu = torch.tensor([0, 2, 3, 5])
    w = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    pos = torch.tensor([True, False, True])
    old = torch.tensor([-1.0, float("inf"), float("nan"), -0.5, float("-inf")], dtype=torch.float64)
    entropy = torch.tensor([1.0, float("inf"), float("nan"), 2.0, float("inf")], dtype=torch.float64,
                           requires_grad=True)
    for mode in ("none", "token"):
        logp.grad = entropy.grad = None
        total, _ = popo_loss(logp, mask, cu, w, pos, num_positive_tokens=2.0, old_logp=old, is_correction=mode,
                             entropy=entropy, entropy_token_count=2.0, entropy_on="positive")
        total.backward()
        # none: -(0.5*(-1) + 0.5*(-0.5))/2; token (rho = 1): -(0.5*1 + 0.5*1)/2; entropy: -0.01*(1 + 2)/2
        expected = (0.375 if mode == "none" else -0.5) - 0.015
        assert total.item() == pytest.approx(expected, abs=1e-12), mode
        assert torch.isfinite(logp.grad).all() and torch.isfinite(entropy.grad).all(), mode
        assert logp.grad.tolist() == pytest.approx([-0.25, 0, 0, -0.25, 0], abs=1e-12)
