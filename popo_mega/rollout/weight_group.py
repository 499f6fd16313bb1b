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
import threading

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
        self._pending: list = []  # broadcasts started and maybe not completed (waited out by abort)
        timeout = datetime.timedelta(seconds=timeout_s)
        listener = _listen(master_address, int(master_port)) if rank == 0 else None
        try:
            self._store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                                        timeout=timeout, wait_for_workers=False,
                                        master_listen_fd=None if listener is None else listener.fileno())
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        if listener is not None:
            listener.detach()  # the store's server owns the descriptor now (it closes it with the store)
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

    def broadcast_async(self, tensor: torch.Tensor):
        """Start broadcasting ``tensor`` in place from rank 0; returns the ``Work`` (``is_completed()``,
        ``wait()``). The caller can poll it and ``abort()`` the group instead of blocking: on gloo a
        root's send waits until every peer has posted its receive, so a peer that never joins (a
        server that rejected the update) would block a plain ``wait()`` for the whole group timeout."""
        if self._pg is None:
            raise RuntimeError(f"WeightUpdateGroup {self.group_name}: closed or aborted")
        if tensor.device.type != self.device.type:
            raise ValueError(f"WeightUpdateGroup({self.backend}): tensor on {tensor.device}, expected {self.device.type}")
        if not tensor.is_contiguous():
            raise ValueError("WeightUpdateGroup.broadcast: tensor must be contiguous")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        work = self._pg.broadcast([tensor], opts)
        self._pending = [w for w in self._pending if not w.is_completed()] + [work]
        return work

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast ``tensor`` in place from rank 0 (contiguous, on this group's device); blocks."""
        self.broadcast_async(tensor).wait()

    def abort(self) -> None:
        """Give the group up at once, with collectives possibly pending (a peer never joined).

        Nothing here may block, nor hold the GIL: gloo's ``ProcessGroup.abort()`` can wait for the
        whole group timeout while a send is in progress *holding the GIL* (measured: the process
        stalled 60 s of a 60 s timeout, in 2 of 6 tries), and ``shutdown()`` after it (or the
        backend's destructor) waits until pending work has failed by that timeout. So a daemon
        thread keeps the backend alive, waits out the pending work (``Work.wait`` releases the GIL;
        the work fails by the group timeout), aborts it on NCCL (whose watchdog needs it), then
        shuts it down. The group is unusable from the moment this returns.
        """
        pg, self._pg = getattr(self, "_pg", None), None
        pending, self._pending = self._pending, []
        self._store = None
        if pg is not None:
            threading.Thread(target=_wait_then_shutdown, args=(pg, pending, self.backend == "nccl"),
                             name=f"abort-{self.group_name}", daemon=True).start()

    def close(self) -> None:
        """Drop the backend and the store (the peer ranks do the same on their side)."""
        pg, self._pg = getattr(self, "_pg", None), None
        _shutdown(pg)
        self._store = None


def _listen(address: str, port: int):
    """A socket listening on ``address:port`` only, for rank 0's store (``master_listen_fd``):
    torch's TCPStore server binds the wildcard address whatever host it is given (seen: ``::`` for
    127.0.0.1), which put an unauthenticated store on every interface of the trainer (issue 15)."""
    import socket

    family, kind, proto, _, where = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"WeightUpdateGroup: cannot listen on {address}:{port} for the group's store: {exc}") from None
    return sock


def _wait_then_shutdown(pg, pending: list, abort_first: bool) -> None:
    if abort_first:
        try:
            pg.abort()
        except Exception:  # noqa: BLE001 - best effort: the group is given up either way
            pass
    for work in pending:
        try:
            work.wait()
        except Exception:  # noqa: BLE001 - expected: the peer never joined
            pass
    _shutdown(pg)


def _shutdown(pg) -> None:
    if pg is not None and hasattr(pg, "shutdown"):
        try:
            pg.shutdown()
        except Exception:  # noqa: BLE001 - best effort on teardown
            pass
