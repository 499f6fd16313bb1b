"""Micro-batching with global normalisers gives exactly the full-batch gradient (POPO P2-P5 with
every term on, GRPO with both aggregations and k3 KL). The helpers here are also used by
tests/distributed/test_loss_dp.py."""

import pytest
import torch
from torch import nn

from popo_mega.algorithms.grpo import group_advantages, policy_loss
from popo_mega.algorithms.packing import broadcast_to_tokens
from popo_mega.algorithms.popo import popo_loss, popo_normalisers, positive_weights
from popo_mega.algorithms.predictor import Predictor
from popo_mega.algorithms.similarity import masked_mean_pool

VOCAB, WIDTH, GROUP, PROMPTS = 7, 6, 4, 3


class TinyPolicy(nn.Module):
    """p(y_t | y_{t-1}) = softmax(W tanh(E[y_{t-1}])), float64; hidden = tanh(E[y_{t-1}])."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(VOCAB + 1, WIDTH, generator=g, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(VOCAB, WIDTH, generator=g, dtype=torch.float64))

    def forward(self, seqs):
        ctx = torch.cat([torch.cat([torch.tensor([VOCAB]), s[:-1]]) for s in seqs])
        hidden = torch.tanh(self.emb[ctx])
        logprobs = torch.log_softmax(hidden @ self.out.T, -1)
        logp = logprobs.gather(1, torch.cat(seqs)[:, None])[:, 0]
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return logp, entropy, hidden


def make_models():
    torch.manual_seed(0)
    return TinyPolicy(), Predictor(in_dim=WIDTH, hidden=16).double()


def make_batch():
    """12 rollouts (3 prompts x 4), prompt 2 without positive; per-row tensors for slicing."""
    g = torch.Generator().manual_seed(11)
    B = GROUP * PROMPTS
    lens = torch.randint(1, 7, (B,), generator=g)
    seqs = [torch.randint(0, VOCAB, (int(n),), generator=g) for n in lens]
    masks = [(torch.rand(int(n), generator=g) > 0.25).double() for n in lens]
    masks[0][:] = 1.0
    old = [torch.randn(int(n), generator=g, dtype=torch.float64) * 0.2 for n in lens]      # offsets
    ref = [torch.randn(int(n), generator=g, dtype=torch.float64) * 0.2 for n in lens]
    rewards = torch.tensor([1.0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    target = torch.randn(B, WIDTH, generator=g, dtype=torch.float64)
    lbar = -torch.rand(B, generator=g, dtype=torch.float64) * 3
    return dict(seqs=seqs, masks=masks, old_off=old, ref_off=ref, rewards=rewards, target=target, lbar=lbar)


def _cu(rows):
    return torch.tensor([0] + torch.tensor([len(r) for r in rows]).cumsum(0).tolist())


def popo_local_normalisers(batch, rows):
    positive = batch["rewards"] > 0
    w = positive_weights(batch["lbar"], positive, GROUP)
    mask = torch.cat([batch["masks"][i] for i in rows])
    cu = _cu([batch["seqs"][i] for i in rows])
    return popo_normalisers(mask, cu, w[rows], positive[rows], entropy_on="all")


def popo_microbatch_loss(model, predictor, batch, rows, norms):
    """POPO loss of the rollouts ``rows`` with the given GLOBAL normalisers (all terms on)."""
    positive = batch["rewards"] > 0
    w = positive_weights(batch["lbar"], positive, GROUP)        # per prompt, before any split
    seqs = [batch["seqs"][i] for i in rows]
    cu = _cu(seqs)
    mask = torch.cat([batch["masks"][i] for i in rows])
    logp, entropy, hidden = model(seqs)
    old = logp.detach() + torch.cat([batch["old_off"][i] for i in rows])
    pred = predictor(masked_mean_pool(hidden, cu, mask))
    total, _ = popo_loss(logp, mask, cu, w[rows], positive[rows],
                         num_positive_tokens=norms["num_positive_tokens"], old_logp=old, is_correction="token",
                         pred=pred, target=batch["target"][rows], weight_sum=norms["weight_sum"],
                         entropy=entropy, entropy_token_count=norms["entropy_token_count"], entropy_on="all")
    return total


def grpo_microbatch_loss(model, batch, rows, normaliser, agg):
    adv = group_advantages(batch["rewards"], GROUP)[rows]
    seqs = [batch["seqs"][i] for i in rows]
    cu = _cu(seqs)
    mask = torch.cat([batch["masks"][i] for i in rows])
    logp, _, _ = model(seqs)
    old = logp.detach() + torch.cat([batch["old_off"][i] for i in rows])
    ref = logp.detach() + torch.cat([batch["ref_off"][i] for i in rows])
    loss, _ = policy_loss(logp, old, broadcast_to_tokens(adv, cu, logp.shape[0]), mask, normaliser=normaliser,
                          agg=agg, cu_seqlens=cu, eps_low=0.2, eps_high=0.28, beta_kl=0.04, ref_logp=ref)
    return loss


def grads(modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


def sum_norms(parts):
    return {k: sum(p[k] for p in parts) for k in parts[0]}


CHUNKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]   # cuts through the middle of prompts


def test_popo_microbatches_equal_full_batch():
    model, pred = make_models()
    batch = make_batch()
    full_rows = list(range(12))
    full_norms = popo_local_normalisers(batch, full_rows)
    loss_full = popo_microbatch_loss(model, pred, batch, full_rows, full_norms)
    loss_full.backward()
    g_full = grads([model, pred])

    model.zero_grad(); pred.zero_grad()
    norms = sum_norms([popo_local_normalisers(batch, c) for c in CHUNKS])
    assert {k: v.item() for k, v in norms.items()} == {k: v.item() for k, v in full_norms.items()}
    loss_sum = 0.0
    for c in CHUNKS:
        loss = popo_microbatch_loss(model, pred, batch, c, norms)
        loss.backward()
        loss_sum += loss.item()
    assert loss_sum == pytest.approx(loss_full.item(), abs=1e-13)
    for a, b in zip(grads([model, pred]), g_full):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)

    # Teeth: per-micro-batch (local) normalisers, averaged, do NOT give the full-batch gradient.
    model.zero_grad(); pred.zero_grad()
    for c in CHUNKS:
        (popo_microbatch_loss(model, pred, batch, c, popo_local_normalisers(batch, c)) / len(CHUNKS)).backward()
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads([model, pred]), g_full))


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_grpo_microbatches_equal_full_batch(agg):
    model, _ = make_models()
    batch = make_batch()
    normaliser = float(sum(m.sum() for m in batch["masks"])) if agg == "token_mean" else 12.0
    loss_full = grpo_microbatch_loss(model, batch, list(range(12)), normaliser, agg)
    loss_full.backward()
    g_full = grads([model])
    model.zero_grad()
    total = 0.0
    for c in CHUNKS:
        loss = grpo_microbatch_loss(model, batch, c, normaliser, agg)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(loss_full.item(), abs=1e-13)
    for a, b in zip(grads([model]), g_full):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)
