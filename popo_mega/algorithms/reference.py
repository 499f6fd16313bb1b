"""The frozen reference policy of GRPO's KL term (section 3 of docs/algorithms.md): the initial
policy pi_ref = pi_theta_0, kept beside the trained model, never updated, no grad.

    ref = FrozenReference(model)            # copies theta_0 (this rank's shards), before any step
    with ref.swapped_into(model):           # forward pass with theta_0 (under torch.no_grad())
        ref_logits = model(batch)

It is the EMA target of ema.py at tau = 1 (xi_k = xi_0 = theta_0 for every k), with two
differences that both follow from "never updated":

* dtype. The EMA is fp32 because its increments (1 - tau)(theta - xi) fall below bf16 resolution;
  the reference has no increments, and theta_0 is exactly representable in the parameter's own
  dtype (it IS the loaded bf16 weights). So each tensor is kept in its parameter's dtype: half the
  memory of an fp32 copy for a bf16 model (Qwen2.5-7B, 7.6e9 parameters: ~15 GB over the whole
  model, divided by TP x PP per rank, against ~30 GB in fp32), and logits bit-identical to the
  initial policy's.
* swap. Reference and parameters share dtype and shape, so ``swapped_into`` EXCHANGES their
  contents tensor by tensor (one transient copy of the largest tensor), instead of the EMA's
  clone of every parameter to restore afterwards (one more full model copy during the pass).

Sharding: keyed by ``module.named_parameters()``: for a Megatron model those are this rank's
TP/PP shards, so the reference is sharded exactly like the model.

Checkpoints hold no reference: it is re-derived from ``model.hf_path`` when the trainer is built
(a resumed trainer is constructed from the HF weights before the checkpoint is loaded into it;
see PolicyTrainer and docs/algorithms.md section 3).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from popo_mega.algorithms.ema import match_parameters

__all__ = ["FrozenReference"]


class FrozenReference:
    """A frozen copy of a module's parameters (each in its own dtype, on its own device)."""

    def __init__(self, module: nn.Module):
        self._ref: dict[str, Tensor] = {name: p.detach().clone() for name, p in module.named_parameters()}
        if not self._ref:
            raise ValueError("reference: the module has no parameters")

    def _matched(self, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        params = match_parameters(self._ref, module, "reference", "reference")
        pairs = []
        for name, r in self._ref.items():
            p = params[name]
            if p.shape != r.shape or p.dtype != r.dtype or p.device != r.device:
                raise ValueError(f"reference: parameter {name!r} is {tuple(p.shape)} {p.dtype} on {p.device}, "
                                 f"the reference holds {tuple(r.shape)} {r.dtype} on {r.device}")
            pairs.append((p, r))
        return pairs

    @staticmethod
    @torch.no_grad()
    def _exchange(pairs: list[tuple[Tensor, Tensor]]) -> None:
        for p, r in pairs:
            tmp = p.detach().clone()
            p.data.copy_(r)
            r.copy_(tmp)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module):
        """Context manager: ``module`` holds the reference weights inside the block, its own weights
        again afterwards (also on an exception). Use under torch.no_grad()."""
        pairs = self._matched(module)
        self._exchange(pairs)
        try:
            yield module
        finally:
            self._exchange(pairs)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(parameter name, reference tensor) pairs; the live storage: do not modify them."""
        yield from self._ref.items()

    def nbytes(self) -> int:
        """Bytes held by this rank's reference."""
        return sum(t.numel() * t.element_size() for t in self._ref.values())
