"""Loading the compiled ``popo_mega._C`` extension and choosing between it and the reference twins.

``impl`` is the config switch ``kernels: auto | extension | reference``:
  reference  always the pure-PyTorch twin;
  extension  the compiled kernel, or an error saying why it cannot run (not built, a device or
             dtype it has no kernel for); when the prebuilt library is missing this first tries a
             JIT build with ``torch.utils.cpp_extension.load`` (minutes on 2 cores);
  auto       the compiled kernel when it is built and supports the inputs, else the reference twin;
             a missing build gives ONE warning per process that names the build command.
Kernels exist for float32 and bfloat16 inputs on CPU, and on CUDA in CUDA builds.
"""

from __future__ import annotations

import glob
import os
import warnings

import torch

BUILD_COMMAND = "pip install --no-build-isolation -e .   (or: python setup.py build_ext --inplace)"
IMPLS = ("auto", "extension", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_state = {"tried": False, "ok": False, "error": None, "warned": False, "jit_tried": False}
_registrations = []   # functions that register fake impls / autograd once the library is loaded


def on_load(fn):
    """Decorator: run ``fn()`` once the extension is loaded (at once if it already is)."""
    _registrations.append(fn)
    if _state["ok"]:
        fn()
    return fn


def _finish_load():
    _state["ok"] = True
    for fn in _registrations:
        fn()


def load() -> bool:
    """Import the prebuilt ``popo_mega._C`` once; True when its ops are registered."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            import popo_mega._C  # noqa: F401  (registers torch.ops.popo_mega.*)
            _finish_load()
        except ImportError as exc:
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["ok"]


def load_jit(verbose: bool = False) -> bool:
    """Build and load the extension with ``torch.utils.cpp_extension.load`` (CPU sources, plus
    the CUDA ones when torch has CUDA). Used by ``impl="extension"`` when nothing is prebuilt."""
    if _state["ok"] or _state["jit_tried"]:
        return _state["ok"]
    _state["jit_tried"] = True
    from torch.utils import cpp_extension
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc")
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp")))
    if not sources:
        _state["error"] += "; JIT build impossible: csrc/ sources not found next to the package"
        return False
    # no -std flag: torch adds the standard its headers need (C++20), as in setup.py
    kwargs = dict(extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"], extra_ldflags=["-fopenmp"])
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        sources += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")) + glob.glob(os.path.join(root, "cuda", "*.cpp")))
        kwargs["extra_cflags"].append("-DPOPO_WITH_CUDA")
        kwargs["extra_cuda_cflags"] = ["-O3", "--use_fast_math"]
    try:
        cpp_extension.load("popo_mega_C_jit", sources, is_python_module=False, verbose=verbose, **kwargs)
        _finish_load()
    except Exception as exc:  # a failed compile: keep the message for the error below
        _state["error"] += f"; JIT build failed: {exc}"
    return _state["ok"]


def has_kernel(op: str, device: torch.device) -> bool:
    key = "CUDA" if device.type == "cuda" else "CPU" if device.type == "cpu" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"popo_mega::{op}", key)


def use_extension(impl: str, op: str, *tensors: torch.Tensor) -> bool:
    """Decide whether ``op`` runs the compiled kernel for these inputs (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"kernels/impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if not load() and impl == "extension":
        load_jit()
    if not _state["ok"]:
        if impl == "extension":
            raise RuntimeError(f"popo_mega: the compiled extension popo_mega._C is not available "
                               f"({_state['error']}); build it with: {BUILD_COMMAND}")
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(f"popo_mega: compiled kernels not built ({_state['error']}); using the pure-PyTorch "
                          f"reference implementations. Build them with: {BUILD_COMMAND}", RuntimeWarning,
                          stacklevel=3)
        return False
    device = tensors[0].device
    reason = None
    if not has_kernel(op, device):
        reason = f"no {device.type} kernel in this build"
    elif any(t.is_floating_point() and t.dtype not in KERNEL_DTYPES for t in tensors):
        reason = f"dtypes {[t.dtype for t in tensors]} (kernels take float32 / bfloat16)"
    if reason is not None:
        if impl == "extension":
            raise RuntimeError(f"popo_mega::{op}: the compiled kernel cannot run these inputs: {reason}")
        return False
    return True


def kernel_mask(mask: torch.Tensor) -> torch.Tensor:
    """Masks reach the kernels as bool or float32 (other dtypes are converted), contiguous."""
    if mask.dtype not in (torch.bool, torch.float32):
        mask = mask.float()
    return mask.detach().contiguous()
