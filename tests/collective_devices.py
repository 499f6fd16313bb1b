"""Check, on gloo, that every tensor handed to a would-be-NCCL collective is on the runtime's device.

    with collective_devices_checked(expected=rt.device, device_of=pretend_device) as calls:
        trainer.train_step(samples)
    assert calls["all_reduce"] > 0

On a GPU run the default group and megatron's TP / PP / DP groups are NCCL groups, and NCCL takes
CUDA tensors only: a CPU tensor fails at the call ("No backend type associated with device type
cpu"). The CPU tests run the same code on gloo, which takes anything, so this wrapper stands in for
NCCL's refusal: while active, every tensor collective of ``torch.distributed`` (and every
module-level alias of one that megatron or popo_mega holds, e.g. megatron's
``dist_reduce_scatter_func``) raises :class:`CollectiveDeviceError` when a tensor it is given is not
on ``expected`` according to ``device_of`` -- with tests/pretend_cuda.py that is the device the
tensor would be on in the GPU run. Megatron's own ``*_GLOO`` groups and groups listed in
``gloo_groups`` (e.g. the weight-sync group when it is gloo) are real gloo groups on a GPU too
and are not checked. Object collectives (``broadcast_object_list`` ...) move their payload to the
right device themselves and are not wrapped. The yielded dict counts the checked calls per name.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch
import torch.distributed as dist

__all__ = ["collective_devices_checked", "CollectiveDeviceError", "COLLECTIVES"]

# name -> positions / keywords of the tensor (or list-of-tensors) arguments
COLLECTIVES = {
    "all_reduce": ("tensor",), "broadcast": ("tensor",), "reduce": ("tensor",),
    "all_gather": ("tensor_list", "tensor"), "all_gather_into_tensor": ("output_tensor", "input_tensor"),
    "_all_gather_base": ("output_tensor", "input_tensor"),
    "reduce_scatter": ("output", "input_list"), "reduce_scatter_tensor": ("output", "input"),
    "_reduce_scatter_base": ("output", "input"),
    "all_to_all": ("output_tensor_list", "input_tensor_list"),
    "all_to_all_single": ("output", "input"),
    "gather": ("tensor", "gather_list"), "scatter": ("tensor", "scatter_list"),
    "send": ("tensor",), "recv": ("tensor",), "isend": ("tensor",), "irecv": ("tensor",),
}


OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")


class CollectiveDeviceError(AssertionError):
    """A tensor reached a (pretend) NCCL collective on the wrong device."""


def _megatron_gloo_groups() -> list:
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return []
    return [v for k, v in vars(ps).items() if k.endswith("_GLOO") and v is not None]


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


@contextlib.contextmanager
def collective_devices_checked(expected: torch.device, device_of=lambda t: t.device, gloo_groups=()):
    """Wrap the tensor collectives (see the module docstring); yields a Counter of checked calls."""
    import inspect

    expected = torch.device(expected)
    gloo = [*_megatron_gloo_groups(), *gloo_groups]
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    originals["batch_isend_irecv"] = dist.batch_isend_irecv

    inside_object_collective = [0]   # they pick their own device (CPU on gloo, CUDA on NCCL)
    inside_collective = [0]

    def is_nccl_kind(group) -> bool:
        return not any(group is g for g in gloo)

    def check(name, tensors, group):
        if not is_nccl_kind(group) or inside_object_collective[0]:
            return
        calls[name] += 1
        for t in tensors:
            dev = device_of(t)
            if dev.type != expected.type:
                raise CollectiveDeviceError(
                    f"torch.distributed.{name}: a {dev.type} tensor {tuple(t.shape)} {t.dtype} on "
                    f"{'the default group' if group is None else 'a TP/PP/DP group'}, which is NCCL on a GPU "
                    f"and takes {expected.type} tensors only")

    def wrap(name, original):
        sig = inspect.signature(original)
        keys = COLLECTIVES[name]

        def wrapper(*args, **kwargs):
            if inside_collective[0]:   # re-entered (torch-function dispatch of the same call): checked once
                return original(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            tensors = [t for k in keys for t in _tensors(bound.arguments.get(k))]
            check(name, tensors, bound.arguments.get("group"))
            inside_collective[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                inside_collective[0] -= 1

        wrapper.__wrapped__ = original
        return wrapper

    def batch_isend_irecv(p2p_op_list):
        for op in p2p_op_list:
            check("batch_isend_irecv", [op.tensor], op.group)
        return originals["batch_isend_irecv"](p2p_op_list)

    def unchecked(original):
        def wrapper(*args, **kwargs):
            inside_object_collective[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                inside_object_collective[0] -= 1

        wrapper.__wrapped__ = original
        return wrapper

    wrappers = {name: wrap(name, fn) for name, fn in originals.items() if name != "batch_isend_irecv"}
    wrappers["batch_isend_irecv"] = batch_isend_irecv
    for name in OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)
            wrappers[name] = unchecked(originals[name])
    patched = []   # (module, attribute, original): torch.distributed's names and every alias held elsewhere
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(("torch.distributed", "megatron", "popo_mega", "tests")):
            continue
        for attr, value in list(vars(mod).items()):
            for name, fn in originals.items():
                if value is fn:
                    patched.append((mod, attr, value))
                    setattr(mod, attr, wrappers[name])
                    break
    try:
        yield calls
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
