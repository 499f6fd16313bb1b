"""Siamese similarity term of POPO (Eq. P3 in docs/algorithms.md), reference implementation.

    f(i)  = masked mean over the response tokens of sequence i of the final-norm hidden state
    L_sim = - ( sum_{i in S+} w_i * cos(h_phi(f_theta(i)), sg(f_xi(i) + eps)) ) / sum_{i in S+} w_i

``masked_mean_pool`` computes f from packed hidden states; ``cosine_penalty`` computes L_sim
given the predictor output and the (detached, noised) target features. The normaliser is the
GLOBAL sum of weights, passed in, so micro-batches and DP ranks add up to the full-batch loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from popo_mega.algorithms.packing import segment_ids

__all__ = ["masked_mean_pool", "cosine_penalty", "COSINE_EPS"]

#: A vector whose L2 norm is below this is treated as the zero vector by ``cosine_penalty``.
COSINE_EPS = 1e-8


def masked_mean_pool(hidden: Tensor, cu_seqlens: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of packed hidden states per sequence (f in Eq. P3).

    Args:
        hidden:     [T, H] packed hidden states of B sequences laid end to end (with grad or not).
        cu_seqlens: [B+1] int64 segment offsets: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1].
        mask:       [T] float or bool, 1 on response tokens (the ones pooled), 0 elsewhere.
                    A float mask acts as a per-token weight (the mean is then a weighted mean).

    Returns:
        [B, H] in hidden's dtype: for each sequence, sum_t m_t h_t / sum_t m_t, accumulated in fp32
        (fp64 for fp64 input).
        A sequence with no masked token (sum of mask 0) gives a row of zeros, never NaN, and no
        gradient flows to its hidden states.
    """
    if hidden.dim() != 2:
        raise ValueError(f"masked_mean_pool: hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:1]:
        raise ValueError(f"masked_mean_pool: mask must be [T]={hidden.shape[0]}, got shape {tuple(mask.shape)}")
    seg = segment_ids(cu_seqlens, hidden.shape[0], "masked_mean_pool").to(hidden.device)
    num_seqs = cu_seqlens.numel() - 1
    acc = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(acc)
    weighted = hidden.to(acc) * m[:, None]
    sums = torch.zeros(num_seqs, hidden.shape[1], dtype=acc, device=hidden.device).index_add(0, seg, weighted)
    counts = torch.zeros(num_seqs, dtype=acc, device=hidden.device).index_add(0, seg, m)
    pooled = sums / counts.clamp_min(1e-30)[:, None]
    pooled = torch.where((counts > 0)[:, None], pooled, torch.zeros_like(pooled))
    return pooled.to(hidden.dtype)


def _safe_norm(x: Tensor) -> Tensor:
    # sqrt of a clamped square norm: finite value and finite (zero) gradient at the zero vector.
    return torch.sqrt((x * x).sum(dim=-1).clamp_min(COSINE_EPS ** 2))


def cosine_penalty(pred: Tensor, target: Tensor, weights: Tensor, normaliser) -> Tensor:
    """Weighted negative cosine similarity L_sim (Eq. P3).

    Args:
        pred:       [B, H] predictor output h_phi(f_theta), with grad.
        target:     [B, H] target features; the caller detaches them and adds the N(0, sigma^2)
                    noise. Detached again here, so no gradient can reach the EMA model.
        weights:    [B] sequence weights w_i (0 for non-positives); treated as constants.
        normaliser: float or 0-dim tensor, the GLOBAL sum of weights over the whole batch
                    (all micro-batches, all DP ranks). Must be >= 0; if it is 0 there is no
                    positive anywhere, every weight is 0 and the result is 0.

    Returns:
        0-dim float32 tensor (float64 for float64 pred): -(sum_b w_b cos(pred_b, target_b)) / normaliser.

    Cosine, epsilon handling: cos(p, t) = <p, t> / (||p|| * ||t||) computed in fp32 (or fp64). If either
    vector has L2 norm below COSINE_EPS (1e-8), e.g. an all-zero pooled feature of a sequence
    without response tokens, that pair's cosine is defined as exactly 0 and it contributes no
    gradient (no NaN, no 1/eps blow-up). Otherwise the value is the exact cosine in [-1, 1].
    """
    if pred.dim() != 2 or target.shape != pred.shape:
        raise ValueError(f"cosine_penalty: pred and target must both be [B, H], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if weights.shape != pred.shape[:1]:
        raise ValueError(f"cosine_penalty: weights must be [B]={pred.shape[0]}, got {tuple(weights.shape)}")
    if not isinstance(normaliser, Tensor) and normaliser < 0:
        raise ValueError(f"cosine_penalty: normaliser (global sum of weights) must be >= 0, got {normaliser}")
    acc = torch.promote_types(pred.dtype, torch.float32)
    p = pred.to(acc)
    t = target.detach().to(acc)
    w = weights.detach().to(acc)
    pn, tn = _safe_norm(p), _safe_norm(t)
    valid = (pn > COSINE_EPS) & (tn > COSINE_EPS)
    cos = (p * t).sum(dim=-1) / (pn * tn)
    cos = torch.where(valid, cos, torch.zeros_like(cos))
    numerator = (w * cos).sum()
    if isinstance(normaliser, Tensor):
        denom = normaliser.detach().to(acc).clamp_min(1e-30)
    else:
        denom = max(float(normaliser), 1e-30)
    return -numerator / denom
