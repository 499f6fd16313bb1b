"""Named tensors handed to a server process on the same host, as ``/update_weights_from_tensor`` carries them.

The wire format is SGLang 0.5.23's (``sglang/srt/utils/common.py``: ``MultiprocessingSerializer``):
``multiprocessing.reduction.ForkingPickler`` dumps the object and the bytes travel base64-encoded in
JSON. ForkingPickler sends a *handle* to the tensor's memory, never its data:

* a CUDA tensor becomes a CUDA IPC handle (torch's ``rebuild_cuda_tensor``); SGLang's
  ``monkey_patch_torch_reductions`` (``utils/patch_torch.py``) also accepts a plain device index,
  which must then name the same GPU in both processes (colocated servers and the trainer see the
  node's GPUs in one order, ``sglang_launcher``);
* a CPU tensor is moved to shared memory. Between *unrelated* processes (a server is not the
  trainer's child) only torch's ``file_system`` sharing strategy works: the default
  ``file_descriptor`` strategy passes the fd through ``multiprocessing.resource_sharer``, whose
  connection is authenticated with the sender's ``authkey`` and is refused by any other process
  ("AuthenticationError: digest sent was rejected", checked on this host). So serialisation
  switches to ``file_system`` for the dump and restores the process's strategy after it.

The sender must keep every serialised tensor alive until the server answered: the handle names the
sender's memory. ``serialize_named_tensors`` returns the tensors it shared for the caller to hold.

The receiver unpickles with an allow-list (as SGLang's ``SafeUnpickler`` does): only containers,
torch dtypes/sizes/devices and torch's tensor and storage rebuild functions; anything else is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import threading
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as torch_mp

_strategy_lock = threading.Lock()


class PayloadError(ValueError):
    """A serialised tensor payload could not be decoded (bad base64, a refused global, wrong structure)."""


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]], copies: int = 1
                            ) -> tuple[list[str], list[torch.Tensor]]:
    """``named`` -> (``copies`` base64 payloads, the tensors they point at).

    One payload per TP rank of the receiving server (SGLang's ``deserialize_own_rank`` reads only
    entry ``tp_rank``; CUDA IPC refcounts each pickled handle once, so each rank gets its own dump).
    CPU tensors are copied into fresh storage first (sharing moves a storage into shared memory in
    place, which must not happen to a trainer's parameter). Keep the returned tensors alive until
    the server answered.
    """
    if copies < 1:
        raise ValueError(f"serialize_named_tensors: copies must be >= 1, got {copies}")
    held: list[tuple[str, torch.Tensor]] = []
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"serialize_named_tensors: {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        held.append((name, t.contiguous().clone() if t.device.type == "cpu" else t.contiguous()))
    payloads = []
    with _strategy_lock:
        before = torch_mp.get_sharing_strategy()
        torch_mp.set_sharing_strategy("file_system")
        try:
            for _ in range(copies):
                buf = io.BytesIO()
                ForkingPickler(buf).dump(held)
                payloads.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        finally:
            torch_mp.set_sharing_strategy(before)
    return payloads, [t for _, t in held]


_ALLOWED = {("builtins", n) for n in ("list", "tuple", "dict", "str", "int", "float", "bool", "bytes")} | {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
} | {("torch.multiprocessing.reductions", n) for n in (
    "rebuild_tensor", "rebuild_cuda_tensor", "rebuild_storage_filename", "rebuild_storage_empty",
    "rebuild_typed_storage", "rebuild_typed_storage_child", "rebuild_meta_tensor")}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise PayloadError(f"refused global {module}.{name} in a tensor payload")


def deserialize_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """One base64 payload -> [(name, tensor)], the tensors still in the sender's (shared) memory."""
    if not isinstance(payload, str):
        raise PayloadError(f"a serialized_named_tensors entry must be a base64 string, got {type(payload).__name__}")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"bad base64 payload: {exc}") from None
    try:
        obj = _AllowListUnpickler(io.BytesIO(raw)).load()
    except PayloadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign payload is the client's error
        raise PayloadError(f"payload does not unpickle: {type(exc).__name__}: {exc}") from None
    if not (isinstance(obj, list) and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str)
                                          and isinstance(e[1], torch.Tensor) for e in obj)):
        raise PayloadError("payload is not a list of (name, tensor) pairs (load_format None)")
    return obj
