"""Checkpoint tensor names -> the tensors of a loaded transformers model, for servers that write
synced weights into one (the embedded rollout server, popo_mega/rollout/server.py).

Checkpoints and popo_mega's export (``iter_hf_tensors``) name Qwen3-MoE experts one by one, as the
released checkpoints do (``model.layers.i.mlp.experts.x.{gate,up,down}_proj.weight``), but
transformers >= 5 holds them fused in memory: ``mlp.experts.gate_up_proj`` [E, 2*I, H] (gate rows
first, then up) and ``mlp.experts.down_proj`` [E, H, I] (checked against ``save_pretrained``'s output
in tests/unit/test_families_served.py). Matching the checkpoint names against ``named_parameters()``
therefore refuses every expert tensor. :func:`checkpoint_tensors` gives, for each checkpoint name,
the tensor or the VIEW into a fused tensor that it fills, so ``view.copy_(new)`` writes in place.
"""

from __future__ import annotations

import re

import torch

_FUSED = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def checkpoint_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a model's ``named_parameters()`` or ``state_dict()``) under checkpoint names.

    Unfused tensors keep their names; each fused expert tensor becomes one view per expert and
    projection. Shapes: gate/up views [I, H], down views [H, I].
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = _FUSED.match(name)
        if m is None or tensor.dim() != 3:
            out[name] = tensor
            continue
        prefix = m["prefix"]
        for x in range(tensor.shape[0]):
            if m["kind"] == "down_proj":
                out[f"{prefix}.{x}.down_proj.weight"] = tensor[x]
            else:
                half = tensor.shape[1] // 2
                out[f"{prefix}.{x}.gate_proj.weight"] = tensor[x, :half]
                out[f"{prefix}.{x}.up_proj.weight"] = tensor[x, half:]
    return out
