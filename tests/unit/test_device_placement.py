"""Device placement on the GPU path, checked on the CPU (issue 10).

* ``MicroBatch.to`` moves every tensor of a packed micro-batch (PackedSeqParams' int32 cu_seqlens
  and the extras included) to the device: checked with tests/pretend_cuda.py, which tracks which
  device each CPU tensor would be on.
* ``PolicyTrainer._local_grads_nonfinite`` waits for the device at most once per step (it used to
  call ``bool()`` on every parameter's gradient: one host sync per parameter).
* ``runtime.initialize`` sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` before the CUDA context exists
  (``set_device``), on GPU only, and never overrides a user's value.
"""

import os
import types
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.pretend_cuda import CUDA, PretendCuda, PretendDeviceMismatchError, pretend_device


def _samples():
    from popo_mega.train.batch import RolloutSample

    return [RolloutSample(torch.tensor([5, 6, 7, 8]), 2, old_logp=torch.tensor([-1.0, -2.0]), weight=0.5,
                          advantage=1.0, positive=True, uid=11),
            RolloutSample(torch.tensor([9, 10, 11]), 1, old_logp=torch.tensor([-0.5, -0.25]), weight=0.0,
                          advantage=-1.0, positive=False, uid=12)]


def test_micro_batch_to_moves_every_tensor():
    from dataclasses import fields

    from popo_mega.train.batch import MicroBatch, pack_micro_batches

    with PretendCuda():   # (tensors made outside the mode would count as CUDA)
        (mb,) = pack_micro_batches(_samples(), 16, pad_multiple=4)   # with a padding segment
        mb.extras["target_logp"] = torch.zeros(mb.num_tokens)
        moved = mb.to(CUDA)
        tensor_fields = [f.name for f in fields(MicroBatch) if isinstance(getattr(mb, f.name), torch.Tensor)]
        assert len(tensor_fields) == 14
        for name in tensor_fields:
            assert pretend_device(getattr(moved, name)).type == "cuda", name
            assert pretend_device(getattr(mb, name)).type == "cpu", name   # the original is left as it was
        psp = moved.packed_seq_params
        for name in ("cu_seqlens_q", "cu_seqlens_kv"):
            cu = getattr(psp, name)
            assert pretend_device(cu).type == "cuda" and cu.dtype == torch.int32, name   # TE's requirement
        assert psp.cu_seqlens_q is psp.cu_seqlens_kv   # one tensor, moved once
        assert (psp.max_seqlen_q, psp.qkv_format) == (mb.packed_seq_params.max_seqlen_q, "thd")
        assert pretend_device(moved.extras["target_logp"]).type == "cuda"
        with pytest.raises(PretendDeviceMismatchError):
            mb.tokens + moved.tokens   # the checker itself: a CPU tensor meets a CUDA one
    # Same values (compared outside the mode: they are CPU tensors underneath).
    for name in tensor_fields:
        assert torch.equal(getattr(moved, name), getattr(mb, name)), name
    assert torch.equal(moved.packed_seq_params.cu_seqlens_q, torch.tensor([0, 4, 7, 8], dtype=torch.int32))
    assert moved.num_tokens == 7 and moved.padded_tokens == 8


class _CountSyncs(TorchFunctionMode):
    """Counts the calls that make the host wait for the device (value reads of a tensor)."""

    SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__index__}

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS or (func is torch.Tensor.to and "cpu" in map(str, args[1:])):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _fake_trainer(grads):
    module = torch.nn.Module()
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.zeros(3))
        p.main_grad = g
        module.register_parameter(f"p{i}", p)
    return types.SimpleNamespace(chunks=[types.SimpleNamespace(module=module)],
                                 rt=types.SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_local_grads_nonfinite_syncs_once(bad):
    from popo_mega.train.step import PolicyTrainer

    grads = [torch.ones(3) for _ in range(6)] + [None]   # a parameter without main_grad is ignored
    if bad is not None:
        grads[5] = torch.tensor([1.0, bad, 2.0])
    trainer = _fake_trainer(grads)
    with _CountSyncs() as counter:
        flag = float(PolicyTrainer._local_grads_nonfinite(trainer))   # the caller's one read
    assert flag == (0.0 if bad is None else 1.0)
    assert counter.syncs == 1, f"{counter.syncs} host syncs for 6 gradients"


def test_local_grads_nonfinite_without_gradients():
    from popo_mega.train.step import PolicyTrainer

    assert float(PolicyTrainer._local_grads_nonfinite(_fake_trainer([]))) == 0.0


def test_target_noise_is_on_the_device_even_for_no_rollout():
    """The P3 noise meets the target features on the device; with no rollout it used to be CPU zeros."""
    from popo_mega.train.step import PolicyTrainer

    trainer = types.SimpleNamespace(algo=types.SimpleNamespace(popo=types.SimpleNamespace(noise_std=0.5)),
                                    cfg=types.SimpleNamespace(train=types.SimpleNamespace(seed=3)), step=2,
                                    rt=types.SimpleNamespace(device=CUDA))
    with PretendCuda():
        for uids in (torch.tensor([4, 9]), torch.zeros(0, dtype=torch.int64)):
            noise = PolicyTrainer._target_noise(trainer, uids, 8)
            assert noise.shape == (uids.numel(), 8) and pretend_device(noise).type == "cuda"


class _Stop(Exception):
    pass


def _initialize_until_set_device(monkeypatch, device):
    """Run runtime.initialize up to torch.cuda.set_device (GPU) or cpu_compat.apply (CPU); returns the
    CUDA_DEVICE_MAX_CONNECTIONS value seen at that moment."""
    from popo_mega import runtime

    seen = {}

    def stop(*args, **kwargs):
        seen["value"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        raise _Stop

    monkeypatch.setattr(runtime, "pick_device", lambda d: torch.device(device))
    monkeypatch.setattr(torch.cuda, "set_device", stop)
    monkeypatch.setattr(runtime.cpu_compat, "apply", stop)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with pytest.raises(_Stop):
        runtime.initialize(device=device)
    return seen["value"]


def test_cuda_device_max_connections_set_before_cuda_initialises(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "placeholder")   # restored after the test
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    assert _initialize_until_set_device(monkeypatch, "cuda") == "1"


def test_cuda_device_max_connections_keeps_the_users_value(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "8")
    assert _initialize_until_set_device(monkeypatch, "cuda") == "8"


def test_cuda_device_max_connections_not_set_on_cpu(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "placeholder")
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    assert _initialize_until_set_device(monkeypatch, "cpu") is None
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ


def test_cuda_device_max_connections_too_late_warns(monkeypatch):
    from popo_mega import runtime

    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "placeholder")
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime._one_cuda_connection()
    assert any("CUDA_DEVICE_MAX_CONNECTIONS" in str(w.message) for w in caught)


def test_collective_check_refuses_cpu_tensors_on_nccl_kind_groups():
    """tests/collective_devices.py itself: a CPU tensor on the default group raises before any
    communication; a CUDA one passes the check (and then meets the real, uninitialised group);
    megatron's module-level alias of reduce_scatter_tensor is wrapped too and restored after."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer as pgb

    from tests.collective_devices import CollectiveDeviceError, collective_devices_checked

    original_alias = pgb.dist_reduce_scatter_func
    with PretendCuda(), collective_devices_checked(CUDA, device_of=pretend_device) as calls:
        with pytest.raises(CollectiveDeviceError, match="all_reduce: a cpu tensor"):
            dist.all_reduce(torch.ones(2))
        with pytest.raises(CollectiveDeviceError, match="cpu"):
            pgb.dist_reduce_scatter_func(torch.ones(1, device="cuda"), torch.ones(2))
        with pytest.raises(Exception) as info:   # passes the check, then no process group exists
            dist.all_reduce(torch.ones(2, device="cuda"))
        assert not isinstance(info.value, CollectiveDeviceError)
    assert pgb.dist_reduce_scatter_func is original_alias
    assert calls["all_reduce"] == 2 and calls[pgb.dist_reduce_scatter_func.__name__] == 1, calls
