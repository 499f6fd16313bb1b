"""Helpers for packed token tensors: B sequences laid end to end in one [T] axis.

A packed batch is described by ``cu_seqlens`` [B+1] (int64 offsets, cu_seqlens[0] = 0,
cu_seqlens[B] = T): sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_cu_seqlens", "segment_ids", "broadcast_to_tokens", "per_sequence_sum"]


def check_cu_seqlens(cu_seqlens: Tensor, num_tokens: int, where: str) -> Tensor:
    """Validate ``cu_seqlens`` [B+1] against T = ``num_tokens``; return it as int64.

    ``where`` names the calling function in the error message.
    """
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"{where}: cu_seqlens must be a 1-D tensor [B+1], got {shape}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"{where}: cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != num_tokens:
        raise ValueError(f"{where}: cu_seqlens must start at 0 and end at T={num_tokens}, "
                         f"got first={int(cu[0])} last={int(cu[-1])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{where}: cu_seqlens must be non-decreasing, got {cu.tolist()}")
    return cu


def segment_ids(cu_seqlens: Tensor, num_tokens: int, where: str = "segment_ids") -> Tensor:
    """[T] int64: the index b of the sequence that owns each token."""
    cu = check_cu_seqlens(cu_seqlens, num_tokens, where)
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)


def broadcast_to_tokens(values: Tensor, cu_seqlens: Tensor, num_tokens: int, where: str = "broadcast_to_tokens") -> Tensor:
    """values [B] (per sequence) -> [T]: each token gets its sequence's value."""
    if values.shape != (cu_seqlens.numel() - 1,):
        raise ValueError(f"{where}: expected a per-sequence tensor of shape [B]={cu_seqlens.numel() - 1}, "
                         f"got {tuple(values.shape)}")
    return values[segment_ids(cu_seqlens, num_tokens, where).to(values.device)]


def per_sequence_sum(values: Tensor, cu_seqlens: Tensor, where: str = "per_sequence_sum") -> Tensor:
    """values [T] -> [B]: sum over each sequence's tokens (differentiable)."""
    seg = segment_ids(cu_seqlens, values.shape[0], where).to(values.device)
    out = torch.zeros(cu_seqlens.numel() - 1, dtype=values.dtype, device=values.device)
    return out.index_add(0, seg, values)
