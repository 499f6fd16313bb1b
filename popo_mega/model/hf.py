"""HF safetensors checkpoints <-> Megatron GPT models at any TP/PP/EP layout.

Names and shardings come from the family's weight table (popo_mega.model.weight_table, one table
per family in popo_mega.model.families); for the dense families it reads:

    model.embed_tokens.weight                 embedding.word_embeddings.weight      rows split by TP, vocab padded
    lm_head.weight (embed_tokens if tied)     output_layer.weight                   rows split by TP, vocab padded
    model.norm.weight                         decoder.final_layernorm.weight
    model.layers.i.input_layernorm.weight     decoder.layers.j.input_layernorm.weight
                                              [decoder.layers.j.self_attention.linear_qkv.layer_norm_weight]
    model.layers.i.post_attention_layernorm   decoder.layers.j.pre_mlp_layernorm.weight
                                              [decoder.layers.j.mlp.linear_fc1.layer_norm_weight]
    q/k/v_proj.weight (+ .bias)               self_attention.linear_qkv.weight (+ .bias)  GROUPED: per KV group
                                              [q heads of the group..., k, v]; TP rank r holds groups r*G/tp..
    q_norm / k_norm (Qwen3)                   self_attention.q_layernorm / k_layernorm
    o_proj.weight                             self_attention.linear_proj.weight     columns split by TP
    gate_proj, up_proj                        mlp.linear_fc1.weight                 rank r holds [gate_r; up_r]
    down_proj.weight                          mlp.linear_fc2.weight                 columns split by TP
    mlp.gate.weight (Qwen3-MoE)               mlp.router.weight
    mlp.experts.x.{gate,up,down}_proj         mlp.experts.local_experts.e.linear_fc{1,2}   x = e + ep_rank * E/ep

where i = j + pp_rank * (num_layers / pp) is the global layer of stage-local layer j.

Loading reads, on each rank, only the slices its shard needs (``safe_open(...).get_slice``);
exporting gathers TP shards over the TP group (and experts over the EP group) and writes one
safetensors file per pipeline stage.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from typing import Iterator

import torch
import torch.distributed as dist

from popo_mega.model import weight_table as wt
from popo_mega.model.builder import Architecture, padded_vocab_size
from popo_mega.model.weight_table import HFCheckpointError  # noqa: F401  (re-exported)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "added_tokens.json",
                   "chat_template.jinja")



# --------------------------------------------------------------------------------------------
# Reading HF checkpoints, slice by slice
# --------------------------------------------------------------------------------------------

class SafetensorsReader:
    """Lazy reader over a single-file or sharded (``model.safetensors.index.json``) checkpoint."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise HFCheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._open = lambda fn: self._handles.setdefault(
            fn, self._stack.enter_context(safe_open(os.path.join(hf_dir, fn), framework="pt", device="cpu")))
        if weight_map is None:
            self.weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            self.weight_map = weight_map
            for fn in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(hf_dir, fn)):
                    raise HFCheckpointError(f"{index}: shard '{fn}' listed in weight_map is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def slice(self, name: str):
        """A lazy slice object: ``reader.slice(n)[a:b]`` reads only those rows from disk."""
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.hf_dir}: tensor '{name}' is not in the checkpoint")
        return self._open(self.weight_map[name]).get_slice(name)

    def shape(self, name: str) -> list[int]:
        return list(self.slice(name).get_shape())

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------
# The layout of one rank's shard
# --------------------------------------------------------------------------------------------

class ShardLayout:
    """Which rows/columns of each HF tensor this (tp_rank, pp_rank, ep_rank) shard holds.

    Expert parallelism splits each layer's experts into ``ep`` blocks of whole experts; EP rank r
    holds experts r*E/ep .. (r+1)*E/ep - 1 (megatron's ``local_expert_indices``)."""

    def __init__(self, arch: Architecture, tp: int, tp_rank: int, pp: int, pp_rank: int, vocab_divisible_by: int = 128,
                 ep: int = 1, ep_rank: int = 0):
        self.arch, self.tp, self.tp_rank, self.pp, self.pp_rank = arch, tp, tp_rank, pp, pp_rank
        self.ep, self.ep_rank = ep, ep_rank
        self.layers_per_stage = arch.num_layers // pp
        self.layer_offset = pp_rank * self.layers_per_stage
        self.padded_vocab = padded_vocab_size(arch.vocab_size, vocab_divisible_by, tp)
        self.groups_per_rank = arch.num_kv_heads // tp
        self.q_per_group = arch.num_heads // arch.num_kv_heads
        self.ffn_per_rank = arch.ffn_hidden_size // tp
        self.experts_per_rank = arch.num_experts // ep if arch.is_moe else 0

    def vocab_rows(self) -> tuple[int, int]:
        per = self.padded_vocab // self.tp
        return self.tp_rank * per, (self.tp_rank + 1) * per


def hf_tensor_for(mcore_name: str, reader: SafetensorsReader, layout: ShardLayout) -> torch.Tensor:
    """This shard's value of megatron parameter ``mcore_name``, read from the HF checkpoint."""
    try:
        rule, match = wt.find_rule(layout.arch.family.weights, mcore_name)
    except HFCheckpointError:
        raise HFCheckpointError(f"no HF source for megatron parameter '{mcore_name}'") from None
    return wt.read_shard(rule, rule.hf_names(match, layout), reader, layout)


def _model_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by name, without TE's ``_extra_state`` entries, one at a time:
    a ``ServedModel``'s state dict casts each tensor as it is read, so a sync holds one at a time."""
    sd = model.state_dict(keep_vars=True)
    return ((k, sd[k]) for k in sd if not k.endswith("_extra_state"))


@torch.no_grad()
def load_hf_weights(model, arch: Architecture, hf_dir: str, layout: ShardLayout) -> int:
    """Copy an HF checkpoint into this rank's Megatron shard in place; returns the number of tensors.

    A tensor whose shape does not match is an error naming both names and both shapes.
    """
    with SafetensorsReader(hf_dir) as reader:
        n = 0
        for name, param in _model_tensors(model):
            if name.endswith("rotary_pos_emb.inv_freq"):
                continue
            value = hf_tensor_for(name, reader, layout)
            if tuple(value.shape) != tuple(param.shape):
                raise HFCheckpointError(f"{hf_dir}: shape mismatch for megatron '{name}': checkpoint gives "
                                        f"{tuple(value.shape)}, model (tp={layout.tp}) expects {tuple(param.shape)}")
            param.data.copy_(value.to(param.dtype))
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------

def gather_tp_shards(t: torch.Tensor, group, tp: int) -> list[torch.Tensor]:
    """Every TP rank's shard of ``t``, in rank order (``[t]`` at TP 1); the caller concatenates."""
    if tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def iter_hf_tensors(model, arch: Architecture, layout: ShardLayout, tp_group=None,
                    include_tied_output: bool = False, ep_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this pipeline stage's parameters, TP shards gathered.

    Collective over the TP group: every TP rank of the stage must call it and consume it in step.
    With expert parallelism (``layout.ep > 1``) it is collective over the EP group too: each expert
    parameter is gathered from every EP rank, so every rank yields all the stage's experts
    (``ep_group`` defaults to megatron's expert-model-parallel group).
    With tied embeddings, ``lm_head.weight`` is not produced (HF ties it) unless asked for.
    """
    if layout.ep > 1 and ep_group is None:
        from megatron.core import parallel_state

        ep_group = parallel_state.get_expert_model_parallel_group()
    for name, param in _model_tensors(model):
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue
        rule, match = wt.find_rule(arch.family.weights, name)
        t = param.detach()
        parts = [t] if rule.shard == "replicated" else gather_tp_shards(t, tp_group, layout.tp)
        if rule.per_expert and layout.ep > 1:   # this local expert on every EP rank: [ep][tp] shards
            by_rank = list(zip(*(gather_tp_shards(p, ep_group, layout.ep) for p in parts)))
            i, local = layout.layer_offset + int(match.group("j")), int(match.group("e"))
            for r, rank_parts in enumerate(by_rank):
                names = [n.format(i=i, x=r * layout.experts_per_rank + local) for n in rule.hf]
                yield from wt.export_tensors(rule, names, list(rank_parts), layout)
            continue
        yield from wt.export_tensors(rule, rule.hf_names(match, layout), parts, layout, include_tied_output)


def copy_hf_metadata(src_dir: str, out_dir: str, dtype: torch.dtype | None = None) -> None:
    """config.json (with ``torch_dtype`` set when given) and the tokenizer files of ``src_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(out_dir, name))


def save_hf_checkpoint(model, arch: Architecture, layout: ShardLayout, out_dir: str, metadata_dir: str,
                       tp_group=None, pp_group=None, dp_rank: int = 0) -> None:
    """Write this model (any TP/PP layout) as an HF directory that ``from_pretrained`` loads.

    Each pipeline stage's TP rank 0 of data-parallel replica 0 writes
    ``model-0000{s}-of-0000{pp}.safetensors``; global rank 0 writes the index, config.json and the
    tokenizer files copied from ``metadata_dir``. Collective: all ranks call it, each with its
    ``dp_rank`` (replicas other than 0 gather but do not write).
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {n: t.contiguous().clone() for n, t in iter_hf_tensors(model, arch, layout, tp_group)}
    shard = f"model-{layout.pp_rank + 1:05d}-of-{layout.pp:05d}.safetensors"
    if layout.tp_rank == 0 and dp_rank == 0:
        save_file(tensors, os.path.join(out_dir, shard), metadata={"format": "pt"})
    names = {n: shard for n in tensors}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    dtype = next(iter(tensors.values())).dtype
    if layout.pp > 1:
        gathered: list = [None] * layout.pp
        dist.all_gather_object(gathered, (names, total), group=pp_group)
        names = {k: v for d, _ in gathered for k, v in d.items()}
        total = sum(size for _, size in gathered)
    rank0 = dist.get_rank() == 0 if dist.is_initialized() else True
    if rank0:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(names.items()))}, f, indent=2)
        copy_hf_metadata(metadata_dir, out_dir, dtype)
    if dist.is_initialized():
        dist.barrier()
