"""Kernel 3b: weighted cosine penalty L_sim of Eq. P3 (csrc/*/cosine_penalty_*).

-(sum_b w_b cos(pred_b, target_b)) / normaliser with fp32 arithmetic; a pair with a norm below
1e-8 has cosine 0 and no gradient. The reference twin is
:func:`popo_mega.algorithms.similarity.cosine_penalty`. Only ``pred`` gets a gradient (the
target features and the weights are constants).
"""

from __future__ import annotations

import torch

from popo_mega.algorithms.similarity import cosine_penalty as cosine_penalty_ref
from popo_mega.ops import _extension

__all__ = ["cosine_penalty", "cosine_penalty_ref"]


@_extension.on_load
def _register():
    @torch.library.register_fake("popo_mega::cosine_penalty")
    def _(pred, target, weights, normaliser):
        return pred.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("popo_mega::cosine_penalty_grad")
    def _(grad_loss, pred, target, weights, normaliser):
        return torch.empty_like(pred)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_loss):
        pred, target, weights, normaliser = ctx.saved_tensors
        grad = torch.ops.popo_mega.cosine_penalty_grad(grad_loss.float(), pred, target, weights, normaliser)
        return grad, None, None, None

    torch.library.register_autograd("popo_mega::cosine_penalty", backward, setup_context=setup_context)


def cosine_penalty(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, normaliser, impl: str = "auto"):
    """pred, target [B, H]; weights [B]; normaliser float or 0-dim tensor -> 0-dim fp32 loss."""
    if not _extension.use_extension(impl, "cosine_penalty", pred, target):
        return cosine_penalty_ref(pred, target, weights, normaliser)
    if pred.dim() != 2 or target.shape != pred.shape:
        raise ValueError(f"cosine_penalty: pred and target must both be [B, H], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if weights.shape != pred.shape[:1]:
        raise ValueError(f"cosine_penalty: weights must be [B]={pred.shape[0]}, got {tuple(weights.shape)}")
    if not isinstance(normaliser, torch.Tensor) and normaliser < 0:
        raise ValueError(f"cosine_penalty: normaliser (global sum of weights) must be >= 0, got {normaliser}")
    norm = torch.as_tensor(normaliser, dtype=torch.float32, device=pred.device).detach().reshape(())
    return torch.ops.popo_mega.cosine_penalty(pred.contiguous(), target.detach().contiguous(),
                                              weights.detach().float().contiguous(), norm)
