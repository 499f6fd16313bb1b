"""The one place where megatron-core 0.16.1 is taught to run on CPU (gloo). Never applied on GPU.

megatron-core assumes CUDA in a handful of places. Each item below was shown necessary on these
machines (see ../shared/design/environment.md, "megatron-core on CPU"); the numbers match that list.
Item 1 (``DotProductAttention`` allocates on CUDA) is not a patch: our local layer spec uses
:class:`popo_mega.model.attention.SDPAttention`, which is also the non-TE path on GPU.

  2. ``torch.cuda.current_device()`` is used as a device (rotary buffers, p2p, buffers): it returns
     the CPU device.
  3. ``Tensor.cuda()`` (distributed-optimizer checkpointing, ``tensor_parallel/data.py``): returns the
     tensor on CPU.
  4. The "CUDA" RNG tracker (``model_parallel_cuda_manual_seed``, ``CudaRNGStatesTracker``): its state
     get/set and ``manual_seed`` are routed to the CPU generator. The tracker's fork() then logs
     "CPU RNG state changed within GPU RNG context" on every fork, which is expected here: that
     logger is raised to ERROR.
  5. Tensor factories called with ``device="cuda"`` (schedules' token count, optimizer ``found_inf``,
     grad scaler, clip_grads, checkpointing): the device is rewritten to CPU.
  6. ``torch.cuda.synchronize()`` (p2p batch sync, checkpoint save): a no-op.
  7. ``clip_grads`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``: ``Tensor.type()`` with no
     argument reports CPU tensors under their CUDA type name.
  8. Trap: ``torch.utils._device._device_constructors()`` is cached on first use and must be built
     from the ORIGINAL factories; otherwise ``with torch.device("meta")`` (used by transformers to
     initialise models) silently stops applying to factories and HF rotary buffers come out wrong.
     It is therefore called before any factory is wrapped.
  9. CUDA streams (MoE's all-to-all token dispatcher makes a ``torch.cuda.Stream()`` for its
     device-to-host copies of the split sizes, and records an event on it): ``torch.cuda.Stream``,
     ``current_stream`` and ``stream(...)`` become no-op stand-ins; CPU work is already in order.
 10. The same dispatcher moves its all-to-all split sizes to the host as numpy arrays only when they
     are CUDA tensors (``moe_utils.maybe_move_tensor_to_cpu``); on CPU they stay tensors, which
     ``torch.distributed.all_to_all_single`` refuses ("incompatible function arguments"): split sizes
     given as tensors are passed on as lists of ints.

Usage: ``popo_mega.runtime.initialize`` calls :func:`apply` when the device is CPU. :func:`apply`
is idempotent; :func:`is_applied` tells whether it ran; nothing here is ever undone in-process.

Test-only switch: ``apply(pretend_cuda=True)`` is for the pretend-CUDA dry run (tests/pretend_cuda.py),
where tensors made for ``cuda`` are CPU tensors that a torch-function mode tracks as CUDA. There
items 3, 5 and 7 are left out (the mode itself turns ``.cuda()`` and ``device="cuda"`` into CPU
tensors it tags as CUDA, and reports their ``type()`` as CUDA types; rewriting the device first would
hide them as CPU tensors) and item 2 returns the ordinal 0, as ``torch.cuda.current_device()`` does
on a GPU. Items 4, 6 and 8 are the same.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.utils._device

_APPLIED = False
_PRETEND_CUDA = False

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor",
    "empty_like", "zeros_like", "ones_like", "full_like", "eye", "linspace", "empty_strided",
)


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # megatron passes integer CUDA ordinals
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_factory(original):
    @functools.wraps(original)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original(*args, **kwargs)

    factory.__popo_original__ = original
    return factory


class _CPUEvent:
    """Item 9: an already-completed event."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def record(self, stream=None) -> None:
        pass


class _CPUStream:
    """Item 9: a stand-in for ``torch.cuda.Stream``; ops on CPU run in issue order, nothing to wait for."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _CPUEvent:
        return _CPUEvent()

    def synchronize(self) -> None:
        pass


def is_applied() -> bool:
    return _APPLIED


def is_pretend_cuda() -> bool:
    """Whether the test-only pretend-CUDA variant was applied (see the module docstring)."""
    return _PRETEND_CUDA


def apply(pretend_cuda: bool = False) -> None:
    """Patch torch (and megatron-core's RNG helpers) so that megatron-core 0.16.1 runs on CPU.

    ``pretend_cuda`` (tests only): the variant for tests/pretend_cuda.py. A later plain ``apply()``
    (as ``initialize(device="cpu")`` makes) keeps whichever variant came first; asking for the
    pretend variant after the plain one is an error (the factories are already rewritten)."""
    global _APPLIED, _PRETEND_CUDA
    if _APPLIED:
        if pretend_cuda and not _PRETEND_CUDA:
            raise RuntimeError("cpu_compat.apply(pretend_cuda=True) after the plain apply(): call it first, "
                               "in a fresh process")
        return
    if torch.cuda.is_available():
        raise RuntimeError("popo_mega.runtime.cpu_compat.apply() is for CPU-only runs; CUDA is available here")

    # 8. Build the device-constructor cache from the original factories before wrapping any.
    torch.utils._device._device_constructors()

    cpu = torch.device("cpu")
    # 2.
    torch.cuda.current_device = (lambda: 0) if pretend_cuda else (lambda: cpu)
    # 3.
    if not pretend_cuda:
        torch.Tensor.cuda = lambda self, device=None, non_blocking=False, memory_format=torch.preserve_format: self
    # 4.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all, so that one stays as it is.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
    # 5.
    if not pretend_cuda:
        for name in _FACTORIES:
            setattr(torch, name, _cpu_factory(getattr(torch, name)))
    # 6.
    torch.cuda.synchronize = lambda device=None: None
    # 9.
    import contextlib

    torch.cuda.Stream = _CPUStream
    torch.cuda.current_stream = lambda device=None: _CPUStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # 10.
    import torch.distributed as dist

    all_to_all_single = dist.all_to_all_single

    @functools.wraps(all_to_all_single)
    def all_to_all_single_cpu(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        as_list = lambda sizes: sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes  # noqa: E731
        return all_to_all_single(output, input, as_list(output_split_sizes), as_list(input_split_sizes),
                                 *args, **kwargs)

    dist.all_to_all_single = all_to_all_single_cpu
    # 7.
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original_type(self, dtype, non_blocking, **kwargs)

    if not pretend_cuda:
        torch.Tensor.type = tensor_type
    _APPLIED = True
    _PRETEND_CUDA = pretend_cuda
