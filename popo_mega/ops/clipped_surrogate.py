"""Kernel 2: clipped importance-weighted policy loss, fused (csrc/*/clipped_surrogate_*).

One pass computes rho = exp(logp - old_logp), the per-token loss
-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)*mask and the statistics (clip counts, sum of
rho, token count); the backward pass gives d loss / d logp. Eq. P2 (extension) and section 2 of
docs/algorithms.md. The reference twin is :func:`popo_mega.algorithms.surrogate.clipped_surrogate`
(same signature and semantics; the kernel does its arithmetic in fp32 for bf16 inputs).
old_logp, advantages and mask are constants: only logp gets a gradient.
"""

from __future__ import annotations

import torch

from popo_mega.algorithms.surrogate import _check_same_shape
from popo_mega.algorithms.surrogate import clipped_surrogate as clipped_surrogate_ref
from popo_mega.ops import _extension

__all__ = ["clipped_surrogate", "clipped_surrogate_ref", "STAT_NAMES"]

STAT_NAMES = ("clip_low_count", "clip_high_count", "rho_sum", "token_count")


@_extension.on_load
def _register():
    @torch.library.register_fake("popo_mega::clipped_surrogate")
    def _(logp, old_logp, advantages, mask, eps_low, eps_high):
        return torch.empty_like(logp), logp.new_empty((4,), dtype=torch.float32)

    @torch.library.register_fake("popo_mega::clipped_surrogate_grad")
    def _(grad_loss, logp, old_logp, advantages, mask, eps_low, eps_high):
        return torch.empty_like(logp)

    def setup_context(ctx, inputs, output):
        logp, old_logp, advantages, mask, eps_low, eps_high = inputs
        ctx.save_for_backward(logp, old_logp, advantages, mask)
        ctx.eps = (eps_low, eps_high)

    def backward(ctx, grad_loss, grad_stats):
        logp, old_logp, advantages, mask = ctx.saved_tensors
        grad = torch.ops.popo_mega.clipped_surrogate_grad(grad_loss.contiguous(), logp, old_logp, advantages,
                                                          mask, *ctx.eps)
        return grad, None, None, None, None, None

    torch.library.register_autograd("popo_mega::clipped_surrogate", backward, setup_context=setup_context)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      eps_low: float, eps_high: float, impl: str = "auto"):
    """Per-token clipped surrogate and detached statistic sums (see ``clipped_surrogate_ref``).

    logp, old_logp, advantages, mask: [N]; returns (loss [N] in logp's dtype, dict of 0-dim fp32
    sums: clip_low_count, clip_high_count, rho_sum, token_count).
    """
    if not _extension.use_extension(impl, "clipped_surrogate", logp):
        return clipped_surrogate_ref(logp, old_logp, advantages, mask, eps_low, eps_high)
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if logp.dim() != 1:
        raise ValueError(f"clipped_surrogate: the fused kernel takes 1-D [N] inputs, got shape {tuple(logp.shape)}")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"clipped_surrogate: eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    loss, stats = torch.ops.popo_mega.clipped_surrogate(
        logp.contiguous(), old_logp.detach().to(logp.dtype).contiguous(),
        advantages.detach().to(logp.dtype).contiguous(), _extension.kernel_mask(mask),
        float(eps_low), float(eps_high))
    stats = stats.detach()
    return loss, {name: stats[i] for i, name in enumerate(STAT_NAMES)}
