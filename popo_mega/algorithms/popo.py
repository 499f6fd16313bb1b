"""POPO — Positive-Only Policy Optimization (arXiv 2605.06650), reference implementation.

Equations P1-P5 of docs/algorithms.md:

    P1  w_i = softmax_{j in S+(x)}(lbar_j / T_w) on positives, 0 elsewhere       positive_weights
    P2  L_pg  = -(1/N+) sum_{i in S+} sum_t w_i m_t logp_t            (is_correction="none")
        L_pg  = -(1/N+) sum_{i in S+} sum_t m_t min(rho w_i, clip(rho) w_i)   (="token", extension)
    P3  L_sim = -(sum_{i in S+} w_i cos(h(f_theta), sg(f_xi + eps))) / sum_{i in S+} w_i
    P4  L_ent = -(1/N_ent) sum_t m_t H_t      over all response tokens, or positives only
    P5  L     = L_pg + alpha L_sim + beta L_ent

Every normaliser (N+, sum of weights, N_ent) is a GLOBAL quantity passed in by the caller:
the loss of one micro-batch on one rank is its partial sum divided by the global normaliser, so
summing the losses (and the gradients) over micro-batches and DP ranks gives exactly the
full-batch loss and gradient. ``popo_normalisers`` computes the local contributions to those
normalisers; the caller sums them over micro-batches and all-reduces them over DP ranks.
Note for trainers: with these normalisers the DP gradients must be SUMMED; a DDP wrapper that
averages over the dp ranks needs the loss multiplied by the dp world size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from popo_mega.algorithms.packing import broadcast_to_tokens, check_cu_seqlens

__all__ = ["positive_weights", "popo_normalisers", "popo_loss", "add_target_noise",
           "WEIGHT_MODES", "IS_CORRECTIONS", "ENTROPY_ON"]

WEIGHT_MODES = ("softmax", "uniform")
IS_CORRECTIONS = ("none", "token")
ENTROPY_ON = ("all", "positive")


def positive_weights(
    seq_logp: Tensor,
    positive: Tensor,
    group_size: int,
    mode: str = "softmax",
    temperature: float = 1.0,
    length: Tensor | None = None,
) -> Tensor:
    """Bounded importance weights over each prompt's positive set (Eq. P1). No gradient.

    Args:
        seq_logp:    [B] length-normalised sequence log-prob lbar_i under the rollout-time policy
                     (sum_t m_t logp_t / sum_t m_t). Only read on positives.
        positive:    [B] bool, r_i > tau_r. Rollouts of one prompt are contiguous: rows
                     g*group_size:(g+1)*group_size belong to prompt g.
        group_size:  G, rollouts per prompt; B must be a multiple of G.
        mode:        "softmax" (w = softmax over S+ of lbar / temperature) or "uniform" (1/|S+|).
        temperature: T_w > 0 of the softmax (ignored by "uniform").
        length:      optional [B] response lengths |y_i| (> 0 on positives). When given, the
                     weights are divided by the length and renormalised over S+ (the optional
                     ``length_normalize`` of P1).

    Returns:
        [B] float32 (float64 if seq_logp is float64), detached: w_i in [0, 1], 0 on non-positives,
        summing to 1 over the positives of every prompt that has at least one; all zeros for a
        prompt with no positive.
    """
    if seq_logp.dim() != 1:
        raise ValueError(f"positive_weights: seq_logp must be [B], got shape {tuple(seq_logp.shape)}")
    if positive.shape != seq_logp.shape:
        raise ValueError(f"positive_weights: positive must be [B]={seq_logp.shape[0]}, got {tuple(positive.shape)}")
    if positive.dtype != torch.bool:
        raise ValueError(f"positive_weights: positive must be a bool tensor, got {positive.dtype}")
    if not isinstance(group_size, int) or group_size < 1 or seq_logp.shape[0] % group_size != 0:
        raise ValueError(f"positive_weights: group_size must be a positive int dividing B={seq_logp.shape[0]}, "
                         f"got {group_size!r}")
    if mode not in WEIGHT_MODES:
        raise ValueError(f"positive_weights: mode must be one of {WEIGHT_MODES}, got {mode!r}")
    if mode == "softmax" and not temperature > 0:
        raise ValueError(f"positive_weights: temperature must be > 0, got {temperature}")

    dtype = torch.float64 if seq_logp.dtype == torch.float64 else torch.float32
    pos = positive.reshape(-1, group_size)
    has_pos = pos.any(dim=1, keepdim=True)
    with torch.no_grad():
        if mode == "softmax":
            logits = seq_logp.detach().to(dtype).reshape(-1, group_size) / temperature
            logits = torch.where(pos, logits, torch.full_like(logits, float("-inf")))
            # A row with no positive would be all -inf (softmax NaN): give it finite logits, zeroed below.
            logits = torch.where(has_pos, logits, torch.zeros_like(logits))
            w = torch.softmax(logits, dim=1)
        else:
            w = pos.to(dtype) / pos.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)
        w = torch.where(pos & has_pos, w, torch.zeros_like(w))
        if length is not None:
            if length.shape != seq_logp.shape:
                raise ValueError(f"positive_weights: length must be [B]={seq_logp.shape[0]}, got {tuple(length.shape)}")
            lens = length.detach().to(dtype).reshape(-1, group_size)
            if bool(((lens <= 0) & pos).any()):
                raise ValueError("positive_weights: length must be > 0 for every positive rollout")
            w = torch.where(pos, w / torch.where(pos, lens, torch.ones_like(lens)), torch.zeros_like(w))
            w = w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return w.reshape(-1)


def popo_normalisers(mask: Tensor, cu_seqlens: Tensor, weights: Tensor, positive: Tensor,
                     entropy_on: str = "positive") -> dict[str, Tensor]:
    """LOCAL contributions to the global normalisers of ``popo_loss`` (sum them over
    micro-batches, all-reduce SUM over DP ranks, then pass them to ``popo_loss``).

    Args: mask [T], cu_seqlens [B+1], weights [B], positive [B] bool, as for ``popo_loss``.

    Returns float32 0-dim tensors:
        "num_positive_tokens": N+, the number of response tokens of positive rollouts (P2);
        "weight_sum":          sum of w_i over positives (P3);
        "entropy_token_count": response tokens of all rollouts ("all") or of positives (P4).
    """
    _check_entropy_on(entropy_on)
    cu = check_cu_seqlens(cu_seqlens, mask.shape[0], "popo_normalisers")
    pos_tok = broadcast_to_tokens(positive, cu, mask.shape[0], "popo_normalisers")
    m = mask.to(torch.float32)
    n_pos = (m * pos_tok.to(torch.float32)).sum()
    return {
        "num_positive_tokens": n_pos,
        "weight_sum": torch.where(positive, weights.to(torch.float32), torch.zeros_like(weights, dtype=torch.float32)).sum(),
        "entropy_token_count": m.sum() if entropy_on == "all" else n_pos,
    }


def add_target_noise(target: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """sg(f_xi) + eps, eps ~ N(0, sigma^2) elementwise (Eq. P3, training only). target: [B, H]."""
    if sigma < 0:
        raise ValueError(f"add_target_noise: sigma must be >= 0, got {sigma}")
    target = target.detach()
    if sigma == 0:
        return target
    noise = torch.randn(target.shape, generator=generator, dtype=torch.float32, device=target.device)
    return (target.to(torch.float32) + sigma * noise).to(target.dtype)


def _check_entropy_on(entropy_on: str) -> None:
    if entropy_on not in ENTROPY_ON:
        raise ValueError(f"popo: entropy_on must be one of {ENTROPY_ON}, got {entropy_on!r}")


def popo_loss(
    logp: Tensor,
    mask: Tensor,
    cu_seqlens: Tensor,
    weights: Tensor,
    positive: Tensor,
    *,
    num_positive_tokens,
    old_logp: Tensor | None = None,
    is_correction: str = "none",
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    pred: Tensor | None = None,
    target: Tensor | None = None,
    weight_sum=None,
    alpha: float = 0.1,
    entropy: Tensor | None = None,
    entropy_token_count=None,
    entropy_on: str = "positive",
    beta: float = 0.01,
    impl: str = "reference",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total POPO loss L = L_pg + alpha L_sim + beta L_ent (Eq. P5) of one packed micro-batch.

    Shapes: T packed tokens of B rollouts (``cu_seqlens`` [B+1]); H the feature width.

    Args:
        logp:       [T] log pi_theta(y_t | x, y_<t) of the online policy, with grad.
        mask:       [T] float/bool response mask m_t (0 on prompt and padding tokens).
        cu_seqlens: [B+1] int64 offsets of the rollouts in the packed axis.
        weights:    [B] w_i from ``positive_weights`` (P1); constants.
        positive:   [B] bool, the positive set S+. Tokens of non-positives never enter L_pg or
                    L_sim, whatever their weight; with entropy_on="positive" they do not enter
                    at all (a batch may then omit negatives entirely).
        num_positive_tokens: GLOBAL N+ (P2), float or 0-dim tensor.
        old_logp:   [T] log mu(y_t) of the sampling policy; required for is_correction="token".
        is_correction: "none" (exactly the weighted NLL of P2) or "token" (clipped surrogate with
                    A_i = w_i, the P2 extension, via ``surrogate.clipped_surrogate``).
        eps_low, eps_high: clip range of the "token" correction (defaults 0.2 / 0.28).
        pred:       [B, H] predictor output h_phi(f_theta) (P3), or None to skip L_sim.
        target:     [B, H] noised EMA features sg(f_xi + eps); required with ``pred``.
        weight_sum: GLOBAL sum of w_i over positives (P3 normaliser); required with ``pred``.
        alpha:      weight of L_sim (default 0.1).
        entropy:    [T] per-token policy entropy H_t with grad (P4), or None to skip L_ent.
        entropy_token_count: GLOBAL count of the tokens L_ent averages over; required with ``entropy``.
        entropy_on: "all" (every response token in the batch) or "positive" (positives only).
        beta:       weight of L_ent (default 0.01).
        impl:       who computes the clipped surrogate and the cosine penalty: "reference" (the
                    pure functions of this package) or, through ``popo_mega.ops``, "extension"
                    (the fused csrc/ kernels) or "auto" (the kernels where built, else reference);
                    the trainer passes ``train.kernels``.

    Returns:
        total: 0-dim float32 (float64 for float64 logp) loss with grad (this micro-batch's share of the full-batch loss).
        parts: "pg", "sim", "ent" (0-dim, with grad, already normalised; sim/ent are 0 when
            skipped), and detached SUMS for logging (P7) that add across micro-batches/ranks:
            "positive_token_count", "clip_low_count", "clip_high_count", "rho_sum",
            "weighted_cos_sum" (sum_i w_i cos_i), "entropy_sum" (sum of m H over the entropy set).
    """
    from popo_mega import ops  # impl dispatch; "reference" runs surrogate.py / similarity.py (ops imports them)

    _check_entropy_on(entropy_on)
    if is_correction not in IS_CORRECTIONS:
        raise ValueError(f"popo_loss: is_correction must be one of {IS_CORRECTIONS}, got {is_correction!r}")
    if logp.dim() != 1 or mask.shape != logp.shape:
        raise ValueError(f"popo_loss: logp and mask must both be [T], got {tuple(logp.shape)} and {tuple(mask.shape)}")
    num_tokens = logp.shape[0]
    cu = check_cu_seqlens(cu_seqlens, num_tokens, "popo_loss")
    num_seqs = cu.numel() - 1
    if weights.shape != (num_seqs,) or positive.shape != (num_seqs,):
        raise ValueError(f"popo_loss: weights and positive must be [B]={num_seqs}, "
                         f"got {tuple(weights.shape)} and {tuple(positive.shape)}")
    if positive.dtype != torch.bool:
        raise ValueError(f"popo_loss: positive must be a bool tensor, got {positive.dtype}")

    acc = torch.promote_types(logp.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    valid = mask != 0
    pos_tok = broadcast_to_tokens(positive, cu, num_tokens, "popo_loss")
    pos_valid = valid & pos_tok
    w_seq = torch.where(positive, weights.detach().to(acc), torch.zeros_like(weights, dtype=acc))
    w_tok = broadcast_to_tokens(w_seq, cu, num_tokens, "popo_loss")
    m_pos = torch.where(pos_valid, mask.to(acc), torch.zeros_like(w_tok))
    logpf = logp.to(acc)
    zero = logpf.new_zeros(())  # the value of a skipped term

    # P2: policy term.
    if is_correction == "none":
        per_tok = torch.where(pos_valid, -w_tok * logpf * m_pos, torch.zeros_like(logpf))
        stats = {"clip_low_count": zero.detach(), "clip_high_count": zero.detach(),
                 "rho_sum": m_pos.sum().detach()}  # rho == 1 by definition
    else:
        if old_logp is None or old_logp.shape != logp.shape:
            raise ValueError("popo_loss: is_correction='token' needs old_logp [T] (log-probs of the sampling policy)")
        # m_pos is 0 off the positive set; clipped_surrogate zeroes the log-ratio there.
        per_tok, sur_stats = ops.clipped_surrogate(logpf, old_logp.to(acc), w_tok, m_pos, eps_low, eps_high,
                                                   impl=impl)
        per_tok = torch.where(pos_valid, per_tok, torch.zeros_like(per_tok))
        stats = {k: sur_stats[k] for k in ("clip_low_count", "clip_high_count", "rho_sum")}
    pg = per_tok.sum() / _as_denominator(num_positive_tokens, "num_positive_tokens", logpf)

    # P3: similarity term.
    if pred is not None:
        if target is None or weight_sum is None:
            raise ValueError("popo_loss: pred needs target [B, H] and weight_sum (global sum of weights)")
        if pred.shape[0] != num_seqs:
            raise ValueError(f"popo_loss: pred must be [B={num_seqs}, H], got {tuple(pred.shape)}")
        sim = ops.cosine_penalty(pred, target, w_seq, weight_sum, impl=impl)
        with torch.no_grad():
            weighted_cos_sum = -sim.detach() * _as_denominator(weight_sum, "weight_sum", logpf)
    else:
        sim = zero
        weighted_cos_sum = zero.detach()

    # P4: entropy term.
    if entropy is not None:
        if entropy.shape != logp.shape:
            raise ValueError(f"popo_loss: entropy must be [T]={num_tokens}, got {tuple(entropy.shape)}")
        if entropy_token_count is None:
            raise ValueError("popo_loss: entropy needs entropy_token_count (global count of averaged tokens)")
        ent_set = valid if entropy_on == "all" else pos_valid
        m_ent = torch.where(ent_set, mask.to(acc), torch.zeros_like(logpf))
        ent_sum = torch.where(ent_set, entropy.to(acc) * m_ent, torch.zeros_like(logpf)).sum()
        ent = -ent_sum / _as_denominator(entropy_token_count, "entropy_token_count", logpf)
        entropy_sum = ent_sum.detach()
    else:
        ent = zero
        entropy_sum = zero.detach()

    total = pg + alpha * sim + beta * ent
    parts = {"pg": pg, "sim": sim, "ent": ent,
             "positive_token_count": m_pos.sum().detach(),
             "weighted_cos_sum": weighted_cos_sum, "entropy_sum": entropy_sum, **stats}
    return total, parts


def _as_denominator(value, name: str, like: Tensor) -> Tensor:
    """A global normaliser as a 0-dim tensor of like's dtype; 0 (nothing to average) becomes 1 since the
    matching numerator is then 0 as well."""
    if value is None:
        raise ValueError(f"popo_loss: {name} is required")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"popo_loss: {name} must be a scalar, got shape {tuple(value.shape)}")
        v = value.detach().to(device=like.device, dtype=like.dtype).reshape(())
        return torch.where(v > 0, v, torch.ones_like(v))
    if value < 0:
        raise ValueError(f"popo_loss: {name} must be >= 0, got {value}")
    return torch.tensor(float(value) if value > 0 else 1.0, dtype=like.dtype, device=like.device)
