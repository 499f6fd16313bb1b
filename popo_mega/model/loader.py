"""Build this rank's Megatron model from an HF directory for an initialised runtime."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from popo_mega.config import ModelConfig, read_hf_config
from popo_mega.model.builder import Architecture, build_gpt_model
from popo_mega.model.hf import ShardLayout, gather_tp_shards, load_hf_weights
from popo_mega.runtime import Runtime


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: Architecture
    layout: ShardLayout


def build_from_hf(model_cfg: ModelConfig, runtime: Runtime, sequence_parallel: bool = False) -> LoadedModel:
    """The GPT shard for ``runtime``'s (tp_rank, pp_rank, ep_rank), with HF weights when ``model_cfg.load_weights``."""
    hf = read_hf_config(model_cfg.hf_path)
    arch = Architecture.from_hf(hf, source=f"{model_cfg.hf_path}/config.json")
    layout = ShardLayout(arch, runtime.tp, runtime.tp_rank, runtime.pp, runtime.pp_rank,
                         model_cfg.make_vocab_size_divisible_by, ep=runtime.ep, ep_rank=runtime.ep_rank)
    model = build_gpt_model(arch, model_cfg, runtime.tp, runtime.pp, runtime.pp_rank, sequence_parallel, ep=runtime.ep)
    if model_cfg.load_weights:
        load_hf_weights(model, arch, model_cfg.hf_path, layout)
    return LoadedModel(model, arch, layout)


def gather_vocab(logits_shard: torch.Tensor, vocab_size: int, tp_group=None) -> torch.Tensor:
    """Full-vocabulary logits [..., V] from vocab-parallel shards [..., V_padded/tp] (for checks, not training)."""
    tp = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    return torch.cat(gather_tp_shards(logits_shard, tp_group, tp), dim=-1)[..., :vocab_size]
