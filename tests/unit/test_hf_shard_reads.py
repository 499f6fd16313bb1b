"""HF loading reads, per rank, only the slices its shard needs (issue 2: 'each rank reading only what it needs').

The reader is instrumented to count the elements each rank materialises from the safetensors file.
Across the TP=2 ranks every sharded tensor must be read exactly once in total (no rank reads a
whole matrix), and only the small replicated norms are read by both.
"""

import pytest
import torch
from safetensors.torch import load_file

from popo_mega.model.builder import Architecture
from popo_mega.model.hf import SafetensorsReader, ShardLayout, hf_tensor_for
from tests.tiny_models import qwen2_config, save_tiny


def _megatron_names(layers: int) -> list[str]:
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for j in range(layers):
        p = f"decoder.layers.{j}."
        names += [p + s for s in ("input_layernorm.weight", "self_attention.linear_qkv.weight",
                                  "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
                                  "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
    return names


class CountingReader(SafetensorsReader):
    def __init__(self, path):
        super().__init__(path)
        self.read = {}

    def slice(self, name):
        inner = super().slice(name)
        reader = self

        class Counting:
            def get_shape(self):
                return inner.get_shape()

            def __getitem__(self, idx):
                t = inner[idx]
                reader.read[name] = reader.read.get(name, 0) + t.numel()
                return t

        return Counting()


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_reads_only_its_slices(tmp_path, tp):
    cfg = qwen2_config(num_attention_heads=8, num_key_value_heads=4, intermediate_size=128)
    save_tiny(cfg, tmp_path / "m")
    full = load_file(str(tmp_path / "m" / "model.safetensors"))
    arch = Architecture.from_hf(cfg.to_dict())
    per_rank = []
    for rank in range(tp):
        reader = CountingReader(str(tmp_path / "m"))
        layout = ShardLayout(arch, tp, rank, 1, 0)
        for name in _megatron_names(arch.num_layers):
            hf_tensor_for(name, reader, layout)
        per_rank.append(reader.read)
        reader.close()
    for name, tensor in full.items():
        counts = [r.get(name, 0) for r in per_rank]
        if "norm" in name:  # replicated: every rank needs the whole (tiny) vector
            assert counts == [tensor.numel()] * tp, name
        else:
            assert sum(counts) == tensor.numel(), (name, counts)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):  # rows of the padded vocabulary
                bound = layout.padded_vocab // tp * tensor.shape[1]
            else:
                bound = tensor.numel() // tp
            assert max(counts) <= bound < tensor.numel(), (name, counts)  # never the whole tensor


def test_vocab_shards_are_padded_and_trimmed(tmp_path):
    cfg = qwen2_config(vocab_size=251)
    save_tiny(cfg, tmp_path / "m")
    emb = load_file(str(tmp_path / "m" / "model.safetensors"))["model.embed_tokens.weight"]
    arch = Architecture.from_hf(cfg.to_dict())
    with SafetensorsReader(str(tmp_path / "m")) as reader:
        shards = [hf_tensor_for("embedding.word_embeddings.weight", reader, ShardLayout(arch, 2, r, 1, 0))
                  for r in range(2)]
    assert [tuple(s.shape) for s in shards] == [(128, 64), (128, 64)]  # 251 -> 256 = 2 x 128
    assert torch.equal(torch.cat(shards)[:251], emb)
    assert torch.count_nonzero(torch.cat(shards)[251:]) == 0
