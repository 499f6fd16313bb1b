"""Kernel 3a: masked mean pooling of packed hidden states per response (csrc/*/masked_mean_pool_*).

f(i) of Eq. P3 in docs/algorithms.md: out[b] = sum_{t in segment b} m_t h_t / sum m_t, a row of
zeros (and no gradient) for a segment without masked tokens. The reference twin is
:func:`popo_mega.algorithms.similarity.masked_mean_pool`; the kernel accumulates in fp32 like it.
Only ``hidden`` gets a gradient.
"""

from __future__ import annotations

import torch

from popo_mega.algorithms.packing import check_cu_seqlens
from popo_mega.algorithms.similarity import masked_mean_pool as masked_mean_pool_ref
from popo_mega.ops import _extension

__all__ = ["masked_mean_pool", "masked_mean_pool_ref"]


@_extension.on_load
def _register():
    @torch.library.register_fake("popo_mega::masked_mean_pool")
    def _(hidden, cu_seqlens, mask):
        return hidden.new_empty((cu_seqlens.shape[0] - 1, hidden.shape[1]))

    @torch.library.register_fake("popo_mega::masked_mean_pool_grad")
    def _(grad_out, cu_seqlens, mask):
        return grad_out.new_empty((mask.shape[0], grad_out.shape[1]))

    def setup_context(ctx, inputs, output):
        hidden, cu_seqlens, mask = inputs
        ctx.save_for_backward(cu_seqlens, mask)

    def backward(ctx, grad_out):
        cu_seqlens, mask = ctx.saved_tensors
        return torch.ops.popo_mega.masked_mean_pool_grad(grad_out.contiguous(), cu_seqlens, mask), None, None

    torch.library.register_autograd("popo_mega::masked_mean_pool", backward, setup_context=setup_context)


def masked_mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor, impl: str = "auto"):
    """hidden [T, H], cu_seqlens [B+1] int64, mask [T] float or bool -> [B, H] in hidden's dtype."""
    if not _extension.use_extension(impl, "masked_mean_pool", hidden):
        return masked_mean_pool_ref(hidden, cu_seqlens, mask)
    if hidden.dim() != 2:
        raise ValueError(f"masked_mean_pool: hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:1]:
        raise ValueError(f"masked_mean_pool: mask must be [T]={hidden.shape[0]}, got shape {tuple(mask.shape)}")
    cu = check_cu_seqlens(cu_seqlens, hidden.shape[0], "masked_mean_pool").to(hidden.device).contiguous()
    return torch.ops.popo_mega.masked_mean_pool(hidden.contiguous(), cu, _extension.kernel_mask(mask))
