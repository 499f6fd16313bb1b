"""The weight-update ranks of one rollout server: ``tp_size`` ranks, as a TP-N SGLang server joins.

SGLang 0.5.23: every TP worker of a server handles ``/init_weights_update_group`` and joins the
group as ``rank = rank_offset + tp_rank`` (``WeightUpdater.init_weights_update_group``), and every
one of them receives every broadcast of ``/update_weights_from_distributed``
(``receive_weights_from_distributed``). The embedded server simulates that with one
``WeightUpdateGroup`` per TP rank, each receiving in its own thread, so a trainer that sizes the
group for one rank per server (world ``1 + num_servers``) fails here exactly as on a TP>1 SGLang.
Rank 0's tensors are loaded into the model; every other rank's copy must equal them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from popo_mega.rollout.weight_group import WeightUpdateGroup


class TpRankGroup:
    """``tp_size`` ranks ``rank_offset .. rank_offset + tp_size - 1`` of a weight-update group.

    Construction blocks until the whole group has formed (every rank joins concurrently) or
    ``timeout_s`` passes. ``receipts[r]``: tensors received so far by TP rank r.
    """

    def __init__(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                 group_name: str, backend: str, tp_size: int, timeout_s: float = 120.0):
        if tp_size < 1:
            raise ValueError(f"TpRankGroup: tp_size must be >= 1, got {tp_size}")
        if rank_offset < 1 or rank_offset + tp_size > world_size:
            raise ValueError(f"TpRankGroup: ranks {rank_offset}..{rank_offset + tp_size - 1} (rank_offset + tp_rank "
                             f"for tp_size {tp_size}) do not fit world_size {world_size} with the trainer at rank 0")
        self.tp_size = tp_size
        self.receipts = [0] * tp_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=tp_size, thread_name_prefix=f"{group_name}-tp")
        futures = [self._pool.submit(WeightUpdateGroup, master_address=master_address, master_port=master_port,
                                     rank=rank_offset + r, world_size=world_size, group_name=group_name,
                                     backend=backend, timeout_s=timeout_s) for r in range(tp_size)]
        groups, errors = [], []
        for f in futures:
            try:
                groups.append(f.result())
            except Exception as exc:  # noqa: BLE001 - every rank's error is reported
                errors.append(exc)
        if errors:
            for g in groups:
                g.abort()
            self._pool.shutdown(wait=False)
            raise errors[0]
        self.ranks = groups
        self.device = groups[0].device

    def _receive(self, tp_rank: int, specs: list[tuple[torch.dtype, list[int]]], flattened: bool) -> list[torch.Tensor]:
        group = self.ranks[tp_rank]
        if flattened:
            sizes = [int(torch.Size(s).numel()) * d.itemsize for d, s in specs]
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=group.device)
            group.broadcast(flat)
            out, offset = [], 0
            for (d, s), size in zip(specs, sizes):
                out.append(flat[offset:offset + size].view(d).reshape(s))
                offset += size
        else:
            out = [torch.empty(s, dtype=d, device=group.device) for d, s in specs]
            works = [group.broadcast_async(t) for t in out]
            for w in works:
                w.wait()
        with self._lock:
            self.receipts[tp_rank] += len(specs)
        return out

    def receive(self, specs: list[tuple[torch.dtype, list[int]]], flattened: bool) -> list[torch.Tensor]:
        """Every rank receives the broadcast(s) of one update; returns TP rank 0's tensors.

        specs: (dtype, shape) per tensor. A rank that received different bytes than rank 0 is an
        error (the broadcast is one source: it cannot happen unless the group is miswired).
        """
        futures = [self._pool.submit(self._receive, r, specs, flattened) for r in range(self.tp_size)]
        results = [f.result() for f in futures]
        for r, tensors in enumerate(results[1:], start=1):
            for i, (a, b) in enumerate(zip(results[0], tensors)):
                if not torch.equal(a, b):
                    raise RuntimeError(f"TP rank {r} received tensor {i} different from TP rank 0's")
        return results[0]

    def close(self) -> None:
        """Drop every rank without waiting for a pending receive (it fails by the group timeout)."""
        for g in self.ranks:
            g.abort()
        self._pool.shutdown(wait=False)
