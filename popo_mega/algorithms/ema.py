"""The EMA ("target", "siamese") copy of the policy, held in fp32: Eq. P6 of docs/algorithms.md.

    xi <- tau_k * xi + (1 - tau_k) * theta        after every optimizer step, xi_0 = theta_0
    constant: tau_k = tau_0
    cosine:   tau_k = 1 - (1 - tau_0) * (cos(pi k / K) + 1) / 2      (BYOL; tau_0 at k=0, 1 at k>=K)

Why fp32: the increment (1 - tau)(theta - xi) is far below bf16 resolution when tau >= 0.99, so a
bf16 EMA stalls; see tests/unit/test_ema.py. The master copy here is fp32 and is cast to the
model's dtype only to run a forward pass (``swapped_into``: the target pass) or into the served copy
the rollout engine gets (``train/served_model.py``, refreshed after each update; a weight sync never
swaps the EMA into the live policy).

Sharding: the EMA is keyed by ``module.named_parameters()`` names and holds a tensor of the same
shape and device as each parameter. For a Megatron model those parameters ARE the local TP/PP
shards, so this EMA is sharded exactly like the model; the trainer wraps ``named_tensors()``
with the model's sharding metadata for dist_checkpointing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["EMA", "momentum", "SCHEDULES", "match_parameters"]

SCHEDULES = ("constant", "cosine")


def momentum(step: int, tau: float, schedule: str = "constant", total_steps: int | None = None) -> float:
    """tau_k of Eq. P6 for update number ``step`` = k (0 for the first update).

    cosine: 1 - (1 - tau) * (cos(pi * min(k, K) / K) + 1) / 2 with K = total_steps; equals tau at
    k = 0 and 1 at k >= K.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"ema: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return tau
    if total_steps is None or total_steps < 1:
        raise ValueError(f"ema: the cosine schedule needs total_steps >= 1, got {total_steps!r}")
    k = min(max(step, 0), total_steps)
    return 1.0 - (1.0 - tau) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def _buckets(numels: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive index ranges [lo, hi) whose element counts sum to <= limit (one tensor at least)."""
    lo, total = 0, 0
    for i, n in enumerate(numels):
        if i > lo and total + n > limit:
            yield lo, i
            lo, total = i, 0
        total += n
    if lo < len(numels):
        yield lo, len(numels)


def match_parameters(held: dict[str, Tensor], module: nn.Module, prefix: str, noun: str) -> dict[str, Tensor]:
    """``module``'s parameters in the order of ``held`` (a per-name copy such as the EMA's shadow or
    the frozen reference); an error naming the missing / unexpected names when the sets differ."""
    params = dict(module.named_parameters())
    missing = sorted(set(held) - set(params))
    extra = sorted(set(params) - set(held))
    if missing or extra:
        raise ValueError(f"{prefix}: module parameters do not match the {noun}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    return {n: params[n] for n in held}


class EMA:
    """fp32 exponential moving average of a module's parameters (Eq. P6).

    Usage:
        ema = EMA(model, tau=0.995)              # xi_0 = theta_0 (fp32 copies)
        ...optimizer.step(); ema.update(model)   # after every optimizer step
        with ema.swapped_into(model):            # forward pass with the EMA weights
            feats = model(batch)
        ema.copy_to(other_model)                 # e.g. a separate target model
    """

    _BUCKET_NUMEL = 1 << 26  # elements upcast at once by update() (256 MiB in fp32)

    def __init__(self, module: nn.Module, tau: float = 0.995, schedule: str = "constant",
                 total_steps: int | None = None, dtype: torch.dtype = torch.float32):
        """Args:
            module:      the online model (its parameters, i.e. its local shards, are averaged).
            tau:         tau_0 in (0, 1] (0.995; 0.999 for 7B-class models).
            schedule:    "constant" or "cosine".
            total_steps: K of the cosine schedule.
            dtype:       storage dtype of xi; fp32 is the point of this class. Other dtypes exist
                         only so that tests can show why (a bf16 EMA stalls).
        """
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"ema: tau must be in (0, 1], got {tau}")
        momentum(0, tau, schedule, total_steps)  # validates schedule / total_steps
        self.tau = float(tau)
        self.schedule = schedule
        self.total_steps = total_steps
        self.dtype = dtype
        self.step = 0
        self._shadow: dict[str, Tensor] = {
            name: p.detach().to(dtype=dtype, copy=True) for name, p in module.named_parameters()}
        if not self._shadow:
            raise ValueError("ema: the module has no parameters")

    # ----------------------------------------------------------------------------- maths
    def current_momentum(self) -> float:
        """tau_k that the next ``update`` will use."""
        return momentum(self.step, self.tau, self.schedule, self.total_steps)

    def _matched(self, module: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        params = match_parameters(self._shadow, module, "ema", "EMA")
        for n, p in params.items():
            if p.shape != self._shadow[n].shape:
                raise ValueError(f"ema: parameter {n!r} has shape {tuple(p.shape)}, "
                                 f"EMA has {tuple(self._shadow[n].shape)}")
        return list(self._shadow.values()), list(params.values())

    @torch.no_grad()
    def update(self, module: nn.Module) -> float:
        """xi <- tau_k xi + (1 - tau_k) theta for every parameter; returns the tau_k used."""
        tau = self.current_momentum()
        shadow, params = self._matched(module)
        # lerp: xi + (1 - tau) (theta - xi), one fused pass per tensor list. Parameters held in a
        # lower dtype are upcast in buckets so the transient fp32 copy stays bounded.
        for lo, hi in _buckets([p.numel() for p in params], self._BUCKET_NUMEL):
            theta = [p.detach().to(self.dtype) for p in params[lo:hi]]
            torch._foreach_lerp_(shadow[lo:hi], theta, 1.0 - tau)
        self.step += 1
        return tau

    # ----------------------------------------------------------------------------- weights
    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights (cast to each parameter's dtype) into ``module``'s parameters."""
        shadow, params = self._matched(module)
        torch._foreach_copy_([p.data for p in params], shadow)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module):
        """Context manager: ``module`` holds the EMA weights (cast to its dtypes) inside the block,
        its own weights again afterwards (also on an exception). Use under torch.no_grad().
        Memory: keeps one copy of the module's parameters (in their own dtype) to restore them;
        where that is too much, keep a separate target module and use ``copy_to`` instead."""
        shadow, params = self._matched(module)
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.data for p in params], shadow)
        try:
            yield module
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in params], saved)

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(parameter name, fp32 EMA tensor) pairs, in the module's parameter order. The tensors
        are the live storage: do not modify them."""
        yield from self._shadow.items()

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"step": self.step, "tau": self.tau, "schedule": self.schedule,
                "total_steps": self.total_steps, "shadow": dict(self._shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``; names and shapes must match this EMA's module."""
        for key in ("step", "tau", "schedule", "total_steps", "shadow"):
            if key not in state:
                raise KeyError(f"ema.load_state_dict: missing key {key!r}")
        shadow = state["shadow"]
        missing = sorted(set(self._shadow) - set(shadow))
        extra = sorted(set(shadow) - set(self._shadow))
        if missing or extra:
            raise KeyError(f"ema.load_state_dict: parameter names differ: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, t in shadow.items():
            if t.shape != self._shadow[name].shape:
                raise ValueError(f"ema.load_state_dict: {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(self._shadow[name].shape)}")
        momentum(int(state["step"]), float(state["tau"]), state["schedule"], state["total_steps"])
        for name, t in shadow.items():
            self._shadow[name].copy_(t)
        self.step = int(state["step"])
        self.tau = float(state["tau"])
        self.schedule = state["schedule"]
        self.total_steps = state["total_steps"]
