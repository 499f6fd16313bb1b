"""The served EMA: the weights the rollout servers get, as their own tensors (Eq. P6: POPO samples from
the EMA target), and the collective that streams a model's HF-named tensors to the engine.

    served = ServedModel(trainer.model, trainer.ema)   # one copy of this rank's shard, model dtype
    trainer.ema.update(model); served.refresh()        # after every EMA update (PolicyTrainer.update_ema)
    failure = send_weights(served, arch, layout, engine, version)   # collective, like a checkpoint save

Why its own copy. The EMA master is fp32 (ema.py: its increments fall below bf16 resolution), the
servers take the model's dtype. Before, a sync swapped the EMA into the live policy's parameters for
its duration (``EMA.swapped_into``), so nothing else could use the policy while weights streamed out:
a sync could not overlap a policy step, which asynchronous rollouts need (issue 12). Here the EMA is
cast once per update into a separate set of tensors that nothing trains.

Memory: one more copy of this rank's model shard in the serving dtype (parameters only, its TP/PP
shards: 2 bytes per parameter per rank in bf16; Qwen2.5-7B at TP=4 x PP=1: ~3.8 GB per rank), on the
parameters' device. The swap it replaces cloned the parameters for the duration of each sync, the
same size, but transiently.

Layouts. The copy is keyed exactly as the model's ``state_dict`` (``ServedModel.state_dict`` answers
as the model would), so ``model.hf.iter_hf_tensors`` gathers its TP shards and ``funnel_pipeline_stages``
brings later stages' tensors to the sender as for the model. Shared parameters stay shared: a
parameter that appears under two state-dict names has one served tensor. With tied embeddings on one
stage the output layer has no weight of its own (the HF export leaves ``lm_head`` out); on the last
of several stages its weight is a parameter of that stage and is averaged and served like any other.
Buffers (rotary frequencies, ...) are not averaged: the served entries are the model's own buffers,
as they were under the swap.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["ServedModel", "hf_tensors_for_engine", "send_weights"]


class ServedModel:
    """The EMA (``algorithms.ema.EMA``) of ``model`` materialised in each parameter's dtype and device.

    ``state_dict(keep_vars=True)``: name -> tensor under the model's state-dict names, the served
    copies for parameters, the model's own tensors for the rest; what ``iter_hf_tensors`` reads.
    ``refresh()``: copy (cast) the EMA master into the served tensors.
    """

    def __init__(self, model: nn.Module, ema):
        self._ema = ema
        param_names = {id(p): name for name, p in model.named_parameters()}
        self._copies: dict[str, Tensor] = {}   # EMA name -> served tensor
        self._entries: dict[str, Tensor] = {}  # state-dict name -> served tensor, or the model's buffer
        for key, t in model.state_dict(keep_vars=True).items():
            name = param_names.get(id(t))
            if name is None:
                self._entries[key] = t
                continue
            if name not in self._copies:
                self._copies[name] = torch.empty_like(t.detach())
            self._entries[key] = self._copies[name]
        shadow = dict(ema.named_tensors())
        missing = sorted(set(self._copies) - set(shadow))
        if missing:
            raise ValueError(f"ServedModel: the EMA holds no average of {missing[:5]}")
        self._sources = [shadow[name] for name in self._copies]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """served <- EMA master, cast to each parameter's dtype (the cast ``EMA.swapped_into`` made)."""
        torch._foreach_copy_(list(self._copies.values()), self._sources)

    def state_dict(self, keep_vars: bool = True) -> dict[str, Tensor]:
        """The served tensors under the model's state-dict names (live storage: do not modify)."""
        return dict(self._entries)

    def nbytes(self) -> int:
        """Bytes of the served copies on this rank (one shard of the model in its dtype)."""
        return sum(t.numel() * t.element_size() for t in self._copies.values())


def hf_tensors_for_engine(module, arch, layout) -> Iterator[tuple[str, Tensor]]:
    """``module``'s (HF name, full tensor) pairs on global rank 0, nothing elsewhere: TP shards gathered
    by ``iter_hf_tensors``, later pipeline stages funnelled to PP rank 0. Collective over TP and PP:
    every rank must iterate its result to the end. ``module``: the live policy or a ``ServedModel``."""
    from megatron.core import parallel_state as ps

    from popo_mega.model.hf import iter_hf_tensors
    from popo_mega.rollout.pipeline_funnel import funnel_pipeline_stages

    tensors = iter_hf_tensors(module, arch, layout, ps.get_tensor_model_parallel_group())
    return funnel_pipeline_stages(tensors, pp_group=ps.get_pipeline_model_parallel_group(),
                                  tp_rank=ps.get_tensor_model_parallel_rank())


def send_weights(module, arch, layout, engine, version: str) -> str | None:
    """Stream ``module``'s weights into ``engine`` (an HttpEngine on global rank 0, None elsewhere) as
    ``version``. Collective over all ranks.

    Returns None, or on rank 0 the error of a failed send (a server died): rank 0 then drains the rest
    of its iterator, so that the other ranks' gathers still complete, and the caller decides
    (``ResilientEngine.sync``: relaunch and sync again, or stop).
    """
    from popo_mega.rollout.http_engine import RolloutServerError
    from popo_mega.rollout.weight_sync import WeightSyncError

    failure = None
    with torch.no_grad():
        tensors = hf_tensors_for_engine(module, arch, layout)
        if engine is not None:
            try:
                engine.sync_weights(tensors, version=version)
            except (RolloutServerError, WeightSyncError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
        for _ in tensors:  # every other rank; rank 0 after a failure
            pass
    return failure
