"""Pretend CUDA on the CPU wheel: catch every CPU tensor that would meet a CUDA one, with real values.

    from popo_mega.runtime import cpu_compat
    cpu_compat.apply(pretend_cuda=True)      # in a fresh (spawned) process, before megatron runs
    with PretendCuda():
        x = torch.zeros(3, device="cuda")    # a CPU tensor that reports device cuda:0
        y = torch.zeros(3)                    # a CPU tensor (tagged as such)
        x + y                                 # raises PretendDeviceMismatchError, as CUDA would

Why not ``FakeTensorMode``: fake tensors have no values, and one policy step is full of
data-dependent steps (``.item()`` on the normalisers and the NaN check, megatron's grad-norm and
found-inf, ``tolist()`` of the rollout ids, gloo collectives that need real storage). Here every
tensor is a real CPU tensor and every op computes its real value; the mode only keeps track of
which device each tensor WOULD be on and refuses the mixes CUDA refuses.

Rules (a ``TorchFunctionMode``, so they see every ``torch.*`` / ``Tensor.*`` / ``F.*`` call):
* device: a tensor created with ``device="cuda"`` / ``cuda:0`` / an integer ordinal / by ``.cuda()``
  or ``.to(cuda)`` is pretend-CUDA; a tensor created on the CPU (``torch.zeros(3)``,
  ``torch.tensor([...])``, ``.cpu()``, ``.to("cpu")``) is tagged CPU; any other result takes the
  device of its inputs. Tensors the mode never saw being made (autograd's gradients, views made
  in C++) count as CUDA: the model's parameters are CUDA, so their gradients are too.
* ``Tensor.device`` / ``is_cuda`` / ``get_device()`` / ``type()`` report the pretend device, so
  code that does ``torch.arange(n, device=x.device)`` follows ``x`` as it would on a GPU.
* an op whose inputs are on both devices raises :class:`PretendDeviceMismatchError`, except that
  0-dim CPU tensors mix freely (CUDA kernels take them as scalars, as FakeTensor allows too) and the
  ops that are cross-device by definition (``copy_``, ``to``, ``set_``, ``__setitem__``,
  ``__getitem__`` with CPU indices, ``data =``, ``grad =``, ``_has_compatible_shallow_copy_type``)
  are let through. (So a CUDA index into a CPU tensor, which CUDA refuses, is not caught.)
* ``Tensor.numpy()`` of a pretend-CUDA tensor raises, as on a GPU.

What this does NOT model (it is not a GPU): kernels (the real CPU kernels run; fused CUDA kernels
of popo_mega._C are not selected since the build has none for "cuda" and the reference twins run),
streams and events, NCCL itself (the gloo group carries the data; tests/collective_devices.py
checks what would reach NCCL), memory, and tensors created inside C++ from a CPU tensor without a
Python call (they count as CUDA: a miss, never a false alarm).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["PretendCuda", "PretendDeviceMismatchError", "pretend_device", "CUDA"]

CUDA = torch.device("cuda", 0)
_TAG = "_popo_pretend_cpu"          # attribute set on tensors the mode knows to be on the CPU


class PretendDeviceMismatchError(RuntimeError):
    """A CPU tensor met a pretend-CUDA tensor in an op that CUDA would refuse."""


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _is_device_like(x) -> bool:
    return isinstance(x, (str, torch.device)) or (isinstance(x, int) and not isinstance(x, bool))


def pretend_device(t: torch.Tensor) -> torch.device:
    """The device ``t`` would be on in the GPU run (its real device when that is not the CPU)."""
    real = torch.Tensor.device.__get__(t)
    if real.type != "cpu":
        return real
    return real if getattr(t, _TAG, False) else CUDA


def _tag(t, cpu: bool) -> None:
    if isinstance(t, torch.Tensor):
        if cpu:
            setattr(t, _TAG, True)
        elif getattr(t, _TAG, False):
            setattr(t, _TAG, False)


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


_GETTERS = {torch.Tensor.device.__get__: "device", torch.Tensor.is_cuda.__get__: "is_cuda",
            torch.Tensor.is_cpu.__get__: "is_cpu"}
_DATA_SET = torch.Tensor.data.__set__
_GRAD_SET = torch.Tensor.grad.__set__
_CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.__getitem__, _DATA_SET, _GRAD_SET,
                 torch.Tensor.set_, torch._has_compatible_shallow_copy_type}


class PretendCuda(TorchFunctionMode):
    """The mode (see the module docstring). ``checks`` counts the ops that were device-checked."""

    def __init__(self):
        super().__init__()
        self.checks = 0
        self._parameter_new = None

    # Parameters are made by ``Tensor._make_subclass`` (no torch function): carry the tag over.
    def __enter__(self):
        original = torch.nn.Parameter.__new__
        self._parameter_new = original

        def parameter_new(cls, data=None, requires_grad=True):
            p = original(cls, data, requires_grad)
            if data is not None and getattr(data, _TAG, False):
                setattr(p, _TAG, True)
            return p

        torch.nn.Parameter.__new__ = parameter_new
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__new__ = self._parameter_new
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _GETTERS:
            dev = pretend_device(args[0])
            return {"device": dev, "is_cuda": dev.type == "cuda", "is_cpu": dev.type == "cpu"}[_GETTERS[func]]
        if func is torch.Tensor.get_device:
            dev = pretend_device(args[0])
            return dev.index if dev.type == "cuda" else -1
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if pretend_device(args[0]).type == "cuda" else name
        if func is torch.Tensor.numpy and pretend_device(args[0]).type == "cuda":
            raise PretendDeviceMismatchError("can't convert a cuda tensor to numpy (Tensor.numpy of a "
                                             "pretend-CUDA tensor): call .cpu() first")
        if func in (torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(args[0], CUDA if func is torch.Tensor.cuda else torch.device("cpu"))
        if func is torch.Tensor.to:
            return self._to(args, kwargs)

        target = kwargs.get("device")
        if target is not None:
            kwargs["device"] = "cpu" if _is_cuda_device(target) else target
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = [pretend_device(t) for t in tensors]
        if func not in _CROSS_DEVICE:
            self._check(func, tensors, devices)
        out = func(*args, **kwargs)
        if func in (_DATA_SET, _GRAD_SET):
            if len(args) > 1 and isinstance(args[1], torch.Tensor):
                _tag(args[0], pretend_device(args[1]).type == "cpu")
            return out
        if target is not None:
            on_cpu = torch.device(target).type == "cpu" if not isinstance(target, int) else False
        elif devices:
            nonscalar = [d for t, d in zip(tensors, devices) if not (d.type == "cpu" and t.dim() == 0)]
            on_cpu = not any(d.type == "cuda" for d in (nonscalar or devices))
            if func is torch.Tensor.__getitem__:   # indices do not move the result
                on_cpu = devices[0].type == "cpu"
        else:
            on_cpu = True
        inputs = {id(t) for t in tensors}
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor) and id(o) not in inputs:   # in-place results keep their tag
                _tag(o, on_cpu)
        return out

    def _check(self, func, tensors, devices) -> None:
        self.checks += 1
        seen = {d.type for t, d in zip(tensors, devices) if not (d.type == "cpu" and t.dim() == 0)}
        if "cuda" in seen and "cpu" in seen:
            shapes = ", ".join(f"{d.type}{tuple(t.shape)}" for t, d in zip(tensors, devices))
            raise PretendDeviceMismatchError(
                f"{_name(func)}: expected all tensors to be on the same device, found cuda and cpu ({shapes})")

    def _move(self, t: torch.Tensor, dev: torch.device) -> torch.Tensor:
        if pretend_device(t) == dev or (dev.type == "cuda" and pretend_device(t).type == "cuda"):
            return t
        out = t.clone()   # a copy on the other device, as .cuda() / .cpu() make
        _tag(out, dev.type == "cpu")
        return out

    def _to(self, args, kwargs) -> torch.Tensor:
        t, rest = args[0], list(args[1:])
        dev = kwargs.pop("device", None)
        if rest and _is_device_like(rest[0]):
            dev = rest.pop(0)
        elif rest and isinstance(rest[0], torch.Tensor):   # .to(other): other's device and dtype
            other = rest.pop(0)
            dev, rest = pretend_device(other), [other.dtype, *rest]
        out = torch.Tensor.to(t, *rest, **kwargs)
        if dev is None:   # a dtype change: same device
            if out is not t:
                _tag(out, pretend_device(t).type == "cpu")
            return out
        dev = torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        if out is t:
            return self._move(t, dev)
        _tag(out, dev.type == "cpu")
        return out


@contextlib.contextmanager
def expect_device_mismatch():
    """Assert that the block raises a pretend device mismatch (for the tests that show a defect)."""
    try:
        yield
    except PretendDeviceMismatchError:
        return
    raise AssertionError("expected a CPU tensor to meet a CUDA tensor, but nothing mixed devices")
