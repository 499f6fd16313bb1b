"""Device-agnostic core attention for megatron-core's local layer spec, on torch SDPA.

megatron-core 0.16.1's ``DotProductAttention`` allocates on CUDA and does not take packed
sequences, so the local spec (no Transformer Engine) uses this module instead, on CPU and GPU.
It is a drop-in ``core_attention``: same constructor and forward signature.

Shapes (megatron's, per TP rank):
    padded ("sbhd"):  query [s, b, heads, dim], key/value [s, b, groups, dim] -> [s, b, heads*dim]
    packed ("thd"):   query [t, heads, dim],    key/value [t, groups, dim]    -> [t, heads*dim]
                      with ``packed_seq_params.cu_seqlens_q`` [n+1] segment offsets: each token
                      attends causally within its own segment only.
Key/value groups are expanded to the query heads for GQA.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def segment_causal_mask(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """Boolean [total, total] mask, True where query t may attend key u: same segment and u <= t."""
    seg = torch.zeros(total, dtype=torch.long, device=device)
    seg[cu_seqlens[1:-1].to(device=device, dtype=torch.long)] = 1
    seg = seg.cumsum(0)
    idx = torch.arange(total, device=device)
    return (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])


class SDPAttention(MegatronModule):
    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism; use the Transformer Engine spec")
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout = self.dropout if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            t, heads, dim = query.shape
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
            k, v = self._expand_groups(k, heads), self._expand_groups(v, heads)
            mask = segment_causal_mask(cu, t, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale)
            return out.squeeze(0).transpose(0, 1).reshape(t, heads * dim)
        s, b, heads, dim = query.shape
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        k, v = self._expand_groups(k, heads), self._expand_groups(v, heads)
        if mask_type == AttnMaskType.causal and attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale)
        else:
            # megatron's masks are True where attention is NOT allowed; SDPA's boolean mask is the opposite.
            mask = None if attention_mask is None else ~attention_mask.bool()
            if mask_type == AttnMaskType.causal:
                causal = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril()
                mask = causal if mask is None else (mask & causal)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)

    @staticmethod
    def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
        groups = x.shape[1]
        return x if groups == heads else x.repeat_interleave(heads // groups, dim=1)
