"""The served EMA: the weights the rollout servers get (Eq. P6: POPO samples from the EMA target),
read from the fp32 EMA master without touching the live policy, and the collective that streams a
model's HF-named tensors to the engine.

    served = ServedModel(trainer.model, trainer.ema)   # a view: holds no tensors of its own
    failure = send_weights(served, arch, layout, engine, version)   # collective, like a checkpoint save

Why a view of its own. The EMA master is fp32 (ema.py: its increments fall below bf16 resolution), the
servers take the model's dtype. Before, a sync swapped the EMA into the live policy's parameters for
its duration (``EMA.swapped_into``), so nothing else could use the policy while weights streamed out:
a sync could not overlap a policy step, which asynchronous rollouts need (issue 12).

Memory: nothing resident. Each parameter's EMA is cast to the parameter's dtype when the sync reads
it (``state_dict`` answers a mapping that casts on access), so the sync's transient is one tensor at
a time, as the gather holds it. A resident copy (what the loop rebuild first had) cost 2 bytes per
parameter on every rank for its whole life, and pushed three shipped dense configs over 80 GB
(docs/plan.md). What the view gives up: it reads the EMA master as it is at that moment, so a sync
must end before the next ``EMA.update`` (the loop's order; an overlapping asynchronous sync would
need a snapshot, or to finish before the EMA update).

Layouts. The view is keyed exactly as the model's ``state_dict`` (``ServedModel.state_dict`` answers
as the model would), so ``model.hf.iter_hf_tensors`` gathers its TP shards and ``funnel_pipeline_stages``
brings later stages' tensors to the sender as for the model. A parameter that appears under two
state-dict names reads the same EMA tensor under both. With tied embeddings on one stage the output
layer has no weight of its own (the HF export leaves ``lm_head`` out); on the last of several stages
its weight is a parameter of that stage and is averaged and served like any other. Buffers (rotary
frequencies, ...) are not averaged: the served entries are the model's own buffers, as they were
under the swap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["ServedModel", "hf_tensors_for_engine", "send_weights"]


class _CastOnRead(Mapping):
    """name -> tensor, where an EMA entry ``(master, dtype)`` is cast when read (a fresh tensor unless
    the dtypes agree, then the master itself: read-only by contract) and any other entry is returned
    as it is."""

    def __init__(self, entries: dict[str, object]):
        self._entries = entries

    def __getitem__(self, key: str) -> Tensor:
        entry = self._entries[key]
        if isinstance(entry, tuple):
            master, dtype = entry
            return master.detach().to(dtype)
        return entry

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class ServedModel:
    """The EMA (``algorithms.ema.EMA``) of ``model`` as served: each parameter's fp32 master cast to the
    parameter's dtype, on the parameter's device (the master's), when it is read.

    ``state_dict(keep_vars=True)``: a read-only mapping under the model's state-dict names, the cast
    EMA for parameters, the model's own tensors for the rest; what ``iter_hf_tensors`` reads.
    """

    def __init__(self, model: nn.Module, ema):
        param_names = {id(p): name for name, p in model.named_parameters()}
        shadow = dict(ema.named_tensors())
        self._entries: dict[str, object] = {}
        missing = []
        for key, t in model.state_dict(keep_vars=True).items():
            name = param_names.get(id(t))
            if name is None:
                self._entries[key] = t
            elif name not in shadow:
                missing.append(name)
            else:
                self._entries[key] = (shadow[name], t.dtype)
        if missing:
            raise ValueError(f"ServedModel: the EMA holds no average of {sorted(missing)[:5]}")

    def state_dict(self, keep_vars: bool = True) -> Mapping[str, Tensor]:
        """The served tensors under the model's state-dict names, cast as each is read."""
        return _CastOnRead(self._entries)

    def nbytes(self) -> int:
        """Bytes this view holds of its own: none (the casts are the reader's, one at a time)."""
        return 0


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
