"""GRPO (DeepSeekMath, arXiv 2402.03300), the baseline: section 2 of docs/algorithms.md.

    A_i   = (r_i - mean_j r_j) / (std_j r_j + 1e-6)      std: unbiased (torch.std default)
            (r_i - mean_j r_j)                           std_normalize=False (Dr. GRPO)
    rho_t = exp(logp_t - old_logp_t)
    L     = - agg( min(rho_t A_t, clip(rho_t, 1-eps_low, 1+eps_high) A_t) ) + beta_kl agg(k3_t)
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

Aggregations, each with its GLOBAL normaliser passed in:
    token_mean:           sum over all response tokens / N_tok (global response-token count, DAPO)
    seq_mean_token_mean:  (1/B_glob) sum_i (sum_t m_t l_t / sum_t m_t)  (original GRPO); a
                          sequence is never split across micro-batches, so its own token count is
                          local and only the sequence count B_glob is global.
"""

from __future__ import annotations

import torch
from torch import Tensor

from popo_mega.algorithms.packing import check_cu_seqlens, per_sequence_sum

__all__ = ["group_advantages", "k3_kl", "aggregate", "policy_loss", "AGGREGATIONS", "ADV_EPS"]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
ADV_EPS = 1e-6


def group_advantages(rewards: Tensor, group_size: int, std_normalize: bool = True) -> Tensor:
    """Group-relative advantages A_i (section 2).

    Args:
        rewards:       [B] rewards, rollouts of one prompt contiguous (rows g*G:(g+1)*G).
        group_size:    G; B must be a multiple of G; G >= 2 when std_normalize (the unbiased std
                       of one sample is undefined).
        std_normalize: divide by (unbiased std + 1e-6); False gives Dr. GRPO's r - mean.

    Returns:
        [B] float32 (float64 for float64 rewards), detached. A group whose rewards are all equal
        gets exactly 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be [B], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"group_advantages: group_size must be a positive int dividing B={rewards.shape[0]}, "
                         f"got {group_size!r}")
    if std_normalize and group_size < 2:
        raise ValueError("group_advantages: std_normalize needs group_size >= 2 (unbiased std of one sample)")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(dtype).reshape(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (r.std(dim=1, keepdim=True) + ADV_EPS)
    return centred.reshape(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """[T] k3 estimator of KL(pi_theta || pi_ref) per token: exp(d) - d - 1, d = ref - logp (>= 0).
    Gradient flows through logp; ref_logp is detached."""
    d = ref_logp.detach().to(logp.dtype) - logp
    return torch.exp(d) - d - 1.0


def aggregate(per_token: Tensor, mask: Tensor, agg: str, normaliser, cu_seqlens: Tensor | None = None) -> Tensor:
    """Reduce a [T] per-token quantity (already multiplied by the mask or not: it is masked here).

    token_mean: sum_t m_t x_t / normaliser (global response-token count).
    seq_mean_token_mean: sum_i (sum_t m_t x_t / sum_t m_t) / normaliser (global sequence count);
        needs cu_seqlens [B+1]; a sequence with no response token contributes 0.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"aggregate: agg must be one of {AGGREGATIONS}, got {agg!r}")
    denom = _denominator(normaliser)
    m = mask.to(per_token.dtype)
    x = torch.where(mask != 0, per_token * m, torch.zeros_like(per_token))
    if agg == "token_mean":
        return x.sum() / denom
    if cu_seqlens is None:
        raise ValueError("aggregate: agg='seq_mean_token_mean' needs cu_seqlens [B+1]")
    cu = check_cu_seqlens(cu_seqlens, per_token.shape[0], "aggregate")
    seq_sum = per_sequence_sum(x, cu, "aggregate")
    seq_len = per_sequence_sum(m.detach(), cu, "aggregate")
    seq_mean = torch.where(seq_len > 0, seq_sum / seq_len.clamp_min(torch.finfo(seq_len.dtype).tiny),
                           torch.zeros_like(seq_sum))
    return seq_mean.sum() / denom


def _denominator(normaliser) -> float | Tensor:
    if normaliser is None:
        raise ValueError("aggregate: a global normaliser is required")
    if isinstance(normaliser, Tensor):
        v = normaliser.detach().reshape(())
        return torch.where(v > 0, v, torch.ones_like(v))
    if normaliser < 0:
        raise ValueError(f"aggregate: normaliser must be >= 0, got {normaliser}")
    return float(normaliser) if normaliser > 0 else 1.0


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    normaliser,
    agg: str = "token_mean",
    cu_seqlens: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta_kl: float = 0.0,
    ref_logp: Tensor | None = None,
    impl: str = "reference",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / DAPO clipped policy loss with optional k3 KL (section 2), one packed micro-batch.

    Args:
        logp:       [T] current-policy log-probs, with grad.
        old_logp:   [T] log-probs of the policy that sampled (constants).
        advantages: [T] per-token advantage: A_i broadcast to its tokens
                    (``packing.broadcast_to_tokens``), or A3PO's shaped Ahat_t.
        mask:       [T] response mask.
        normaliser: GLOBAL response-token count (token_mean) or GLOBAL sequence count
                    (seq_mean_token_mean); float or 0-dim tensor.
        agg:        "token_mean" (default, DAPO) or "seq_mean_token_mean" (original GRPO).
        cu_seqlens: [B+1] offsets; required for seq_mean_token_mean.
        eps_low, eps_high: clip range (defaults 0.2 / 0.2; DAPO/A3PO use 0.2 / 0.28).
        beta_kl:    weight of the k3 KL term (default 0).
        ref_logp:   [T] reference-policy log-probs; required when beta_kl != 0.
        impl:       "reference" (``surrogate.clipped_surrogate``), or "extension" / "auto" for the
                    fused kernel through ``popo_mega.ops`` (the trainer passes ``train.kernels``).

    Returns:
        loss: 0-dim loss with grad.
        stats: "pg" and "kl" (0-dim, aggregated, detached) and the detached sums of
            ``clipped_surrogate`` ("clip_low_count", "clip_high_count", "rho_sum", "token_count").
    """
    from popo_mega import ops  # impl dispatch; "reference" runs surrogate.clipped_surrogate (ops imports it)

    per_tok, stats = ops.clipped_surrogate(logp, old_logp, advantages, mask, eps_low, eps_high, impl=impl)
    pg = aggregate(per_tok, mask, agg, normaliser, cu_seqlens)
    loss = pg
    kl = torch.zeros((), dtype=pg.dtype, device=pg.device)
    if beta_kl != 0.0:
        if ref_logp is None or ref_logp.shape != logp.shape:
            raise ValueError("policy_loss: beta_kl != 0 needs ref_logp [T]")
        valid = mask != 0
        k3 = torch.where(valid, k3_kl(logp, torch.where(valid, ref_logp.to(logp.dtype), logp.detach())),
                         torch.zeros_like(logp))
        kl = aggregate(k3, mask, agg, normaliser, cu_seqlens)
        loss = pg + beta_kl * kl
    return loss, {"pg": pg.detach(), "kl": kl.detach(), **stats}
