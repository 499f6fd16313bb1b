"""A3PO (arXiv 2512.21625): adaptive asymmetric token-level advantage shaping, section 3 of
docs/algorithms.md. Built on DAPO (clip 0.2/0.28, token_mean, no KL): the shaped advantages go
into ``grpo.policy_loss`` in place of the broadcast sequence advantage.

    Ahat_t = A * max(rho_pos - alpha_pos * s, 1)   if A > 0 and p_t among the k lowest of its response
    Ahat_t = A * max(rho_neg - alpha_neg * s, 1)   if A < 0 and p_t among the k highest of its response
    Ahat_t = A                                     otherwise
    k = max(1, floor(L * ratio)) for a response of L valid tokens, p_t = exp(old_logp_t)

The defaults (ratio 0.2, rho 2, alpha 0.005) come from a secondary summary of the paper; the
authors' public code has the per-response top-k selection but no decay. All are configurable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["shape_advantages", "selected_tokens", "shaping_factor"]


def shaping_factor(step: int, rho: float, alpha: float) -> float:
    """max(rho - alpha * step, 1): the decayed scale of the selected tokens."""
    return max(rho - alpha * step, 1.0)


def selected_tokens(old_logp: Tensor, mask: Tensor, ratio: float, lowest: Tensor) -> Tensor:
    """[B, T] bool: in each row, the k = max(1, floor(L * ratio)) valid tokens with the lowest
    (``lowest[b]`` True) or highest (False) old log-prob; ties broken by position, earliest
    first; L = number of valid tokens of the row (a row with L = 0 selects nothing).

    Ranking by old_logp is ranking by p_t = exp(old_logp_t) (exp is increasing).
    """
    valid = mask != 0
    lengths = valid.sum(dim=1)
    k = torch.clamp(torch.floor(lengths.to(torch.float64) * ratio).to(torch.int64), min=1)
    k = torch.where(lengths > 0, k, torch.zeros_like(k))
    key = old_logp.detach().to(torch.float64)
    # For "lowest" rows sort ascending by logp; for "highest" rows ascending by -logp. Invalid
    # positions get +inf and so rank after every valid token. A stable sort keeps equal keys in
    # position order, which is the earliest-first tie-break.
    key = torch.where(lowest[:, None], key, -key)
    key = torch.where(valid, key, torch.full_like(key, float("inf")))
    order = torch.sort(key, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(key.shape[1], device=key.device).expand_as(order).contiguous())
    return (rank < k[:, None]) & valid


def shape_advantages(
    advantages: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    step: int,
    ratio: float = 0.2,
    rho: float = 2.0,
    alpha: float = 0.005,
    *,
    rho_neg: float | None = None,
    alpha_neg: float | None = None,
) -> Tensor:
    """Token-level shaped advantages Ahat [B, T] (section 3).

    Args:
        advantages: [B] group-relative sequence advantages A_i (``grpo.group_advantages``).
        old_logp:   [B, T] log-probs of the sampled tokens under the rollout policy (p = exp).
        mask:       [B, T] response mask (1 on the response's L valid tokens).
        step:       training step s (>= 0) of the decay.
        ratio:      k fraction per response (default 0.2): k = max(1, floor(L * ratio)).
        rho, alpha: initial scale and its decay per step for positive advantages (and for negative
                    ones unless ``rho_neg`` / ``alpha_neg`` are given).

    Returns:
        [B, T] float32 (float64 for float64 advantages): A_i on every valid token, multiplied by
        max(rho - alpha*s, 1) on the selected ones; 0 on masked-out positions. A_i == 0 rows stay 0.
    """
    if advantages.dim() != 1:
        raise ValueError(f"shape_advantages: advantages must be per-sequence [B], got {tuple(advantages.shape)}")
    if old_logp.dim() != 2 or old_logp.shape[0] != advantages.shape[0] or mask.shape != old_logp.shape:
        raise ValueError(f"shape_advantages: old_logp and mask must be [B={advantages.shape[0]}, T], got "
                         f"{tuple(old_logp.shape)} and {tuple(mask.shape)}")
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"shape_advantages: ratio must be in [0, 1], got {ratio}")
    if step < 0:
        raise ValueError(f"shape_advantages: step must be >= 0, got {step}")
    rho_neg = rho if rho_neg is None else rho_neg
    alpha_neg = alpha if alpha_neg is None else alpha_neg
    dtype = torch.float64 if advantages.dtype == torch.float64 else torch.float32
    a = advantages.detach().to(dtype)
    sel = selected_tokens(old_logp, mask, ratio, lowest=a > 0)
    scale_pos = shaping_factor(step, rho, alpha)
    scale_neg = shaping_factor(step, rho_neg, alpha_neg)
    scale = torch.ones(old_logp.shape, dtype=dtype, device=old_logp.device)
    scale = torch.where(sel & (a > 0)[:, None], torch.full_like(scale, scale_pos), scale)
    scale = torch.where(sel & (a < 0)[:, None], torch.full_like(scale, scale_neg), scale)
    out = a[:, None] * scale
    return torch.where(mask != 0, out, torch.zeros_like(out))
