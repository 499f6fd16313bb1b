"""Logged quantities of Eq. P7 (docs/algorithms.md), never part of the gradient.

Every value is returned as a detached SUM together with the count it should be divided by, so
that the trainer can add them over micro-batches and all-reduce them over DP ranks before
dividing. (The clip counts, rho, cosine and entropy sums come from ``popo_loss``'s parts.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from popo_mega.algorithms.grpo import k3_kl

__all__ = ["rollout_sums", "target_kl_sums"]


@torch.no_grad()
def rollout_sums(weights: Tensor, positive: Tensor, group_size: int, lengths: Tensor) -> dict[str, Tensor]:
    """Per-batch sums for the positive rate, prompts with a positive, weight entropy, length.

    Args:
        weights:    [B] w_i of Eq. P1 (0 off the positive set).
        positive:   [B] bool; rollouts of one prompt contiguous, ``group_size`` each.
        group_size: G.
        lengths:    [B] response lengths in tokens.

    Returns float64 0-dim tensors:
        "rollouts", "positives"                 -> positive rate = positives / rollouts
        "prompts", "prompts_with_positive"      -> fraction = prompts_with_positive / prompts
        "weight_entropy_sum": sum over prompts with a positive of -sum_i w_i log w_i (0 log 0 = 0)
                                                -> mean weight entropy = / prompts_with_positive
        "response_length_sum"                   -> mean length = / rollouts
    """
    if positive.dtype != torch.bool or positive.shape != weights.shape or lengths.shape != weights.shape:
        raise ValueError(f"rollout_sums: weights [B], positive [B] bool and lengths [B] expected, got "
                         f"{tuple(weights.shape)}, {tuple(positive.shape)} {positive.dtype}, {tuple(lengths.shape)}")
    if group_size < 1 or weights.shape[0] % group_size != 0:
        raise ValueError(f"rollout_sums: group_size {group_size} must divide B={weights.shape[0]}")
    w = weights.detach().to(torch.float64).reshape(-1, group_size)
    pos = positive.reshape(-1, group_size)
    has = pos.any(dim=1)
    plogp = torch.where(w > 0, w * torch.log(w.clamp_min(1e-300)), torch.zeros_like(w))
    f = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return {
        "rollouts": f(positive.numel()),
        "positives": f(int(positive.sum())),
        "prompts": f(pos.shape[0]),
        "prompts_with_positive": f(int(has.sum())),
        "weight_entropy_sum": -(plogp.sum(dim=1) * has).sum(),
        "response_length_sum": lengths.detach().to(torch.float64).sum(),
    }


@torch.no_grad()
def target_kl_sums(logp: Tensor, target_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """k3 estimate of KL(online || EMA target) on response tokens (P7), as sums.

    logp [T] online log-probs, target_logp [T] EMA-model log-probs of the same tokens, mask [T].
    Returns "kl_sum" (sum of m_t k3_t, k3 = exp(d) - d - 1, d = target - online) and
    "token_count" (sum of m_t); the logged KL is kl_sum / token_count.
    """
    if logp.shape != target_logp.shape or logp.shape != mask.shape or logp.dim() != 1:
        raise ValueError(f"target_kl_sums: logp, target_logp, mask must all be [T], got "
                         f"{tuple(logp.shape)}, {tuple(target_logp.shape)}, {tuple(mask.shape)}")
    valid = mask != 0
    lp = logp.detach().to(torch.float64)
    tl = torch.where(valid, target_logp.detach().to(torch.float64), lp)
    m = mask.to(torch.float64)
    k3 = torch.where(valid, k3_kl(lp, tl), torch.zeros_like(lp))
    return {"kl_sum": (k3 * m).sum(), "token_count": m.sum()}

