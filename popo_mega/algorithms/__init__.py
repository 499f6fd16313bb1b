"""The objectives as pure tensor functions (maths: docs/algorithms.md, equations P1-P7).

    popo        positive_weights (P1), popo_normalisers, popo_loss (P2-P5)
    grpo        group_advantages, k3_kl, aggregate, policy_loss (GRPO / DAPO baseline)
    a3po        shape_advantages (A3PO token-level advantage shaping)
    surrogate   clipped_surrogate (P2 extension, GRPO, A3PO) — reference twin of the fused kernel
    similarity  masked_mean_pool, cosine_penalty (P3) — reference twins of the fused kernels
    ema         EMA: fp32 momentum target with constant / cosine schedules (P6)
    predictor   Predictor: the MLP h_phi of P3
    monitoring  rollout_sums, target_kl_sums (P7, logged only)
    packing     cu_seqlens helpers for packed [T] token tensors
"""
