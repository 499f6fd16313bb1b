"""HF safetensors checkpoints <-> Megatron GPT models at any TP/PP layout.

Name mapping (HF Qwen2/Llama -> megatron local spec; TE spec names in brackets):

    model.embed_tokens.weight                 embedding.word_embeddings.weight      rows split by TP, vocab padded
    lm_head.weight (embed_tokens if tied)     output_layer.weight                   rows split by TP, vocab padded
    model.norm.weight                         decoder.final_layernorm.weight
    model.layers.i.input_layernorm.weight     decoder.layers.j.input_layernorm.weight
                                              [decoder.layers.j.self_attention.linear_qkv.layer_norm_weight]
    model.layers.i.post_attention_layernorm   decoder.layers.j.pre_mlp_layernorm.weight
                                              [decoder.layers.j.mlp.linear_fc1.layer_norm_weight]
    q/k/v_proj.weight (+ .bias)               self_attention.linear_qkv.weight (+ .bias)  GROUPED: per KV group
                                              [q heads of the group..., k, v]; TP rank r holds groups r*G/tp..
    o_proj.weight                             self_attention.linear_proj.weight     columns split by TP
    gate_proj, up_proj                        mlp.linear_fc1.weight                 rank r holds [gate_r; up_r]
    down_proj.weight                          mlp.linear_fc2.weight                 columns split by TP

where i = j + pp_rank * (num_layers / pp) is the global layer of stage-local layer j.

Loading reads, on each rank, only the slices its shard needs (``safe_open(...).get_slice``);
exporting gathers TP shards over the TP group and writes one safetensors file per pipeline stage.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import ExitStack
from typing import Iterator

import torch
import torch.distributed as dist

from popo_mega.model.builder import Architecture, padded_vocab_size

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json", "added_tokens.json",
                   "chat_template.jinja")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class HFCheckpointError(ValueError):
    pass


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
    """Which rows/columns of each HF tensor this (tp_rank, pp_rank) shard holds."""

    def __init__(self, arch: Architecture, tp: int, tp_rank: int, pp: int, pp_rank: int, vocab_divisible_by: int = 128):
        self.arch, self.tp, self.tp_rank, self.pp, self.pp_rank = arch, tp, tp_rank, pp, pp_rank
        self.layers_per_stage = arch.num_layers // pp
        self.layer_offset = pp_rank * self.layers_per_stage
        self.padded_vocab = padded_vocab_size(arch.vocab_size, vocab_divisible_by, tp)
        self.groups_per_rank = arch.num_kv_heads // tp
        self.q_per_group = arch.num_heads // arch.num_kv_heads
        self.ffn_per_rank = arch.ffn_hidden_size // tp

    def vocab_rows(self) -> tuple[int, int]:
        per = self.padded_vocab // self.tp
        return self.tp_rank * per, (self.tp_rank + 1) * per


def _mcore_suffix_to_hf(suffix: str, i: int) -> str | None:
    """HF name for a per-layer megatron parameter that maps one-to-one (norms); None otherwise."""
    table = {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    }
    return f"model.layers.{i}.{table[suffix]}" if suffix in table else None


def _vocab_shard(reader: SafetensorsReader, name: str, layout: ShardLayout) -> torch.Tensor:
    lo, hi = layout.vocab_rows()
    real = layout.arch.vocab_size
    rows = reader.slice(name)[lo:min(hi, real)] if lo < real else None
    width = reader.shape(name)[1]
    dtype = rows.dtype if rows is not None else torch.float32
    out = torch.zeros(hi - lo, width, dtype=dtype)
    if rows is not None:
        out[: rows.shape[0]] = rows
    return out


def hf_tensor_for(mcore_name: str, reader: SafetensorsReader, layout: ShardLayout) -> torch.Tensor:
    """This shard's value of megatron parameter ``mcore_name``, read from the HF checkpoint."""
    arch = layout.arch
    if mcore_name == "embedding.word_embeddings.weight":
        return _vocab_shard(reader, "model.embed_tokens.weight", layout)
    if mcore_name == "output_layer.weight":
        src = "model.embed_tokens.weight" if arch.tie_embeddings or "lm_head.weight" not in reader else "lm_head.weight"
        return _vocab_shard(reader, src, layout)
    if mcore_name == "decoder.final_layernorm.weight":
        return reader.slice("model.norm.weight")[:]
    m = _LAYER.match(mcore_name)
    if not m:
        raise HFCheckpointError(f"no HF source for megatron parameter '{mcore_name}'")
    i = layout.layer_offset + int(m.group(1))
    suffix = m.group(2)
    p = f"model.layers.{i}."
    direct = _mcore_suffix_to_hf(suffix, i)
    if direct is not None:
        return reader.slice(direct)[:]
    r, hd = layout.tp_rank, arch.head_dim
    if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = suffix.rsplit(".", 1)[1]
        g0, g1 = r * layout.groups_per_rank, (r + 1) * layout.groups_per_rank
        qpg = layout.q_per_group
        q = reader.slice(f"{p}self_attn.q_proj.{kind}")[g0 * qpg * hd:g1 * qpg * hd]
        k = reader.slice(f"{p}self_attn.k_proj.{kind}")[g0 * hd:g1 * hd]
        v = reader.slice(f"{p}self_attn.v_proj.{kind}")[g0 * hd:g1 * hd]
        tail = q.shape[1:]
        n = layout.groups_per_rank
        return torch.cat([q.reshape(n, qpg * hd, *tail), k.reshape(n, hd, *tail), v.reshape(n, hd, *tail)],
                         dim=1).reshape(n * (qpg + 2) * hd, *tail)
    if suffix == "self_attention.linear_proj.weight":
        cols = arch.num_heads * hd // layout.tp
        return reader.slice(f"{p}self_attn.o_proj.weight")[:, r * cols:(r + 1) * cols]
    if suffix == "mlp.linear_fc1.weight":
        f = layout.ffn_per_rank
        return torch.cat([reader.slice(f"{p}mlp.gate_proj.weight")[r * f:(r + 1) * f],
                          reader.slice(f"{p}mlp.up_proj.weight")[r * f:(r + 1) * f]], dim=0)
    if suffix == "mlp.linear_fc2.weight":
        f = layout.ffn_per_rank
        return reader.slice(f"{p}mlp.down_proj.weight")[:, r * f:(r + 1) * f]
    raise HFCheckpointError(f"no HF source for megatron parameter '{mcore_name}'")


def _model_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name, without TE's ``_extra_state`` entries."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


@torch.no_grad()
def load_hf_weights(model, arch: Architecture, hf_dir: str, layout: ShardLayout) -> int:
    """Copy an HF checkpoint into this rank's Megatron shard in place; returns the number of tensors.

    A tensor whose shape does not match is an error naming both names and both shapes.
    """
    with SafetensorsReader(hf_dir) as reader:
        n = 0
        for name, param in _model_tensors(model).items():
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
                    include_tied_output: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this pipeline stage's parameters, TP shards gathered.

    Collective over the TP group: every TP rank of the stage must call it and consume it in step.
    With tied embeddings, ``lm_head.weight`` is not produced (HF ties it) unless asked for.
    """
    tp, hd = layout.tp, arch.head_dim
    real_vocab = arch.vocab_size
    for name, param in _model_tensors(model).items():
        if name.endswith("rotary_pos_emb.inv_freq"):
            continue
        t = param.detach()
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full = torch.cat(gather_tp_shards(t, tp_group, tp), dim=0)[:real_vocab]
            if name == "embedding.word_embeddings.weight":
                yield "model.embed_tokens.weight", full
            elif not arch.tie_embeddings or include_tied_output:
                yield "lm_head.weight", full
            continue
        if name == "decoder.final_layernorm.weight":
            yield "model.norm.weight", t
            continue
        m = _LAYER.match(name)
        if not m:
            raise HFCheckpointError(f"no HF name for megatron parameter '{name}'")
        i = layout.layer_offset + int(m.group(1))
        suffix, p = m.group(2), f"model.layers.{i}."
        direct = _mcore_suffix_to_hf(suffix, i)
        if direct is not None:
            yield direct, t
        elif suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = suffix.rsplit(".", 1)[1]
            full = torch.cat(gather_tp_shards(t, tp_group, tp), dim=0)
            qpg, ng, tail = layout.q_per_group, arch.num_kv_heads, t.shape[1:]
            grouped = full.reshape(ng, (qpg + 2) * hd, *tail)
            q, k, v = grouped.split([qpg * hd, hd, hd], dim=1)
            yield f"{p}self_attn.q_proj.{kind}", q.reshape(ng * qpg * hd, *tail)
            yield f"{p}self_attn.k_proj.{kind}", k.reshape(ng * hd, *tail)
            yield f"{p}self_attn.v_proj.{kind}", v.reshape(ng * hd, *tail)
        elif suffix == "self_attention.linear_proj.weight":
            yield f"{p}self_attn.o_proj.weight", torch.cat(gather_tp_shards(t, tp_group, tp), dim=1)
        elif suffix == "mlp.linear_fc1.weight":
            parts = gather_tp_shards(t, tp_group, tp)
            f = layout.ffn_per_rank
            yield f"{p}mlp.gate_proj.weight", torch.cat([s[:f] for s in parts], dim=0)
            yield f"{p}mlp.up_proj.weight", torch.cat([s[f:] for s in parts], dim=0)
        elif suffix == "mlp.linear_fc2.weight":
            yield f"{p}mlp.down_proj.weight", torch.cat(gather_tp_shards(t, tp_group, tp), dim=1)
        else:
            raise HFCheckpointError(f"no HF name for megatron parameter '{name}'")


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
