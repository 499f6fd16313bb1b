"""Process start-up: torch.distributed, megatron-core's parallel_state, seeds and the device.

This package is the only part of popo_mega that reads the launcher's environment variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as torchrun and SLURM wrappers set them).
Everything else receives a :class:`Runtime` or process groups explicitly.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from popo_mega.runtime import cpu_compat


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep: int = 1        # expert parallelism: splits each MoE layer's experts over ranks of the data-parallel group
    ep_rank: int = 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago. All n sockets are bound at
    once, so the kernel never hands out one port twice (``free_port`` called n times can: one call's
    port is free again when the next asks; 300 calls in a row repeated one in 27 of 30 trials here)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_launcher() -> bool:
    """Whether torchrun (or an equivalent) started this process."""
    return "WORLD_SIZE" in os.environ


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(device)


def _one_cuda_connection() -> None:
    """``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless the user set it, before the CUDA context exists.

    With one hardware work queue the GPU runs kernels in the order they were issued, which is what
    lets megatron-core overlap tensor-parallel communication with the compute queued after it
    (megatron warns when it is not 1; Megatron-LM's launch scripts export it). The driver reads it
    when the context is created: ``torch.cuda.is_available()`` does not create one, the
    ``set_device`` that follows does. If CUDA was initialised earlier it is too late: say so."""
    if "CUDA_DEVICE_MAX_CONNECTIONS" in os.environ:
        return
    if torch.cuda.is_initialized():
        import warnings

        warnings.warn("CUDA was initialised before popo_mega.runtime.initialize: CUDA_DEVICE_MAX_CONNECTIONS=1 "
                      "cannot take effect (export it before starting Python)", RuntimeWarning, stacklevel=3)
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234, device: str = "auto",
               timeout_s: float = 600.0, expert_parallel: int = 1) -> Runtime:
    """Initialise the process group (NCCL on GPU, gloo on CPU), parallel_state (TP, PP, DP), seeds.

    Single-process runs need no launcher: without RANK/WORLD_SIZE a one-process group is made on a
    free loopback port. On CPU the megatron-core compatibility layer (:mod:`.cpu_compat`) is applied
    first. Seeds: python/numpy/torch get ``seed`` everywhere; megatron's model-parallel RNG tracker
    is seeded so that TP ranks differ where megatron wants them to (dropout) and match elsewhere.
    """
    dev = pick_device(device)
    if dev.type == "cpu":
        cpu_compat.apply()
    rank = int(os.environ.get("RANK", "0"))
    world_size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world_size} is not divisible by tensor x pipeline parallel = "
                         f"{tensor_parallel} x {pipeline_parallel}")
    if dev.type == "cuda":
        _one_cuda_connection()
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun (launch/train.sh)")
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            init_method = "env://"
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method=init_method,
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 pipeline_model_parallel_size=pipeline_parallel,
                                                 expert_model_parallel_size=expert_parallel)
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                   tp=tensor_parallel, pp=pipeline_parallel,
                   dp=parallel_state.get_data_parallel_world_size(),
                   tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                   pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                   dp_rank=parallel_state.get_data_parallel_rank(),
                   ep=expert_parallel, ep_rank=parallel_state.get_expert_model_parallel_rank())


def shutdown() -> None:
    """Destroy parallel_state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
