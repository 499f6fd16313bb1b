"""The torch.distributed group between one trainer process (rank 0) and the rollout servers' ranks.

It is built from its own TCPStore, outside torch.distributed's default world, so the trainer's
Megatron world (TP/PP/DP groups on gloo or NCCL) is never touched: no ``init_process_group``, no
entry in the default group's rank tables. The same class runs on both sides (the trainer and
the embedded server), gloo on CPU and NCCL on GPU.

Wire layout: a TCPStore at ``master_address:master_port`` hosted by rank 0, then the key prefixes
``<group_name>`` / ``<group_name>/`` / ``<device>/`` that SGLang's ``init_custom_process_group``
ends up with (``PrefixStore(group_name, store)`` passed to torch's ``_new_process_group_helper``),
so a real SGLang server can join a group that this class hosts.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class WeightUpdateGroup:
    """One rank of a broadcast group rooted at rank 0 (the trainer).

    rank 0 hosts the store; ranks 1..world_size-1 are the servers' ranks (``rank_offset + tp_rank``).
    Construction blocks until all ``world_size`` ranks have joined or ``timeout_s`` passes.
    """

    def __init__(self, *, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str = "weight_update_group", backend: str = "gloo", timeout_s: float = 120.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"WeightUpdateGroup: rank {rank} outside [0, {world_size})")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"WeightUpdateGroup: backend must be 'gloo' or 'nccl', got {backend!r}")
        if not group_name:
            raise ValueError("WeightUpdateGroup: group_name must not be empty")
        if backend == "nccl" and not dist.is_nccl_available():
            raise RuntimeError("WeightUpdateGroup: backend 'nccl' is not available in this torch build "
                               "(a CPU build?): use backend 'gloo'")
        self.rank, self.world_size, self.backend, self.group_name = rank, world_size, backend, group_name
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                                    timeout=timeout, wait_for_workers=False)
        device = "cpu" if backend == "gloo" else "cuda"
        store = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/", dist.PrefixStore(group_name, self._store)))
        if backend == "gloo":
            self._pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast ``tensor`` in place from rank 0 (contiguous, on this group's device)."""
        if tensor.device.type != self.device.type:
            raise ValueError(f"WeightUpdateGroup({self.backend}): tensor on {tensor.device}, expected {self.device.type}")
        if not tensor.is_contiguous():
            raise ValueError("WeightUpdateGroup.broadcast: tensor must be contiguous")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        """Drop the backend and the store (the peer ranks do the same on their side)."""
        pg, self._pg = getattr(self, "_pg", None), None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass
        self._store = None
