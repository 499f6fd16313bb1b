"""The PPO-style clipped surrogate shared by POPO (Eq. P2, extension), GRPO and A3PO.

This is the pure-PyTorch reference: it favours clarity, and the fused kernels in
``popo_mega.ops`` are tested against it. See docs/algorithms.md, Eq. P2 and section 2.

    rho_t  = exp(logp_t - old_logp_t)
    loss_t = - min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t) * m_t

The loss is returned per token and NOT reduced: the caller divides the sum by its global
normaliser (N+ for POPO, the global token count for token_mean, ...), which is what makes
micro-batching and data parallelism give the full-batch gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clipped_surrogate"]


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"clipped_surrogate: inputs must share one shape, got {shapes}")


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss (Eq. P2 extension; GRPO/DAPO policy term).

    Args:
        logp:       [N] log pi_theta(y_t | ...) of the current policy, with grad.
        old_logp:   [N] log-probs of the sampling policy (mu / old / behaviour); treated as a
                    constant (detached here).
        advantages: [N] per-token advantage A_t: for POPO the sequence weight w_i broadcast to its
                    tokens, for GRPO the signed group advantage A_i, for A3PO the shaped Ahat_t.
                    Treated as a constant (detached here).
        mask:       [N] float or bool; 1 on response tokens that count, 0 elsewhere. A float mask
                    acts as a per-token multiplier on the loss and on every statistic.
        eps_low:    lower clip range, rho is clipped below at 1 - eps_low (>= 0).
        eps_high:   upper clip range, rho is clipped above at 1 + eps_high (>= 0).

    Returns:
        loss: [N] per-token loss ``-min(rho*A, clip(rho)*A) * mask`` in logp's dtype, not reduced.
              Masked-out positions are exactly 0 with zero gradient (the log-ratio is replaced by
              0 there before exp, so padding garbage cannot produce inf/NaN).
        stats: detached SUMS over the N tokens (they add across micro-batches and DP ranks):
            "clip_high_count": sum of mask over tokens with A > 0 and rho > 1 + eps_high, i.e. the
                               clipped branch is the strict minimum and the token gets no gradient;
            "clip_low_count":  sum of mask over tokens with A < 0 and rho < 1 - eps_low (same, on
                               the other side);
                               tokens with A == 0, or rho exactly on a clip boundary, count in neither;
            "rho_sum":         sum of mask * rho (mean ratio = rho_sum / token_count);
            "token_count":     sum of mask.
            All are 0-dim float32 tensors.
    """
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clipped_surrogate: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")

    old_logp = old_logp.detach().to(logp.dtype)
    advantages = advantages.detach().to(logp.dtype)
    valid = mask.bool() if mask.dtype == torch.bool else mask != 0
    maskf = mask.to(logp.dtype)

    log_ratio = torch.where(valid, logp - old_logp, torch.zeros_like(logp))
    rho = torch.exp(log_ratio)
    unclipped = rho * advantages
    clipped = torch.clamp(rho, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped) * maskf

    with torch.no_grad():
        m32 = mask.detach().float()
        rho32 = rho.detach().float()
        adv32 = advantages.float()
        high = (adv32 > 0) & (rho32 > 1.0 + eps_high)
        low = (adv32 < 0) & (rho32 < 1.0 - eps_low)
        stats = {
            "clip_low_count": (low.float() * m32).sum(),
            "clip_high_count": (high.float() * m32).sum(),
            "rho_sum": (rho32 * m32).sum(),
            "token_count": m32.sum(),
        }
    return loss, stats
