"""Trainer side of the weight sync: HF-named tensors -> buckets -> rollout servers, then checks.

Protocol (SGLang 0.5.23's, so the same code drives SGLang servers and the embedded server):

1. ``connect()``: POST ``/init_weights_update_group`` to every server while this process joins
   the same group as rank 0 (``WeightUpdateGroup``: its own TCPStore, so the trainer's default
   torch.distributed world is untouched; gloo on CPU, NCCL on GPU). Server i joins with its
   ``tp_sizes[i]`` ranks, ``rank = rank_offset + tp_rank`` (SGLang's ``WeightUpdater.
   init_weights_update_group``), so the world is ``1 + sum(tp_sizes)`` and server i's
   ``rank_offset`` is ``1 + sum(tp_sizes[:i])``. ``server_tp_sizes`` reads each server's TP size
   from ``/server_info``; ``trainer_address`` picks the address the servers' ranks dial.
2. ``send(named_tensors, version)``: POST ``/begin_weight_update`` to every server (SGLang 0.5.23
   answers ``/update_weights_from_distributed`` with 400 outside a begin/end window, *without
   joining the broadcast*: ``SchedulerWeightUpdaterManager.update_weights_from_distributed``);
   then per bucket (default 512 MB, one dtype per bucket), POST ``/update_weights_from_distributed``
   {names, dtypes, shapes, load_format} to every server and broadcast the bucket from rank 0 —
   one flat uint8 tensor (``load_format="flattened_bucket"``, SGLang's ``FlattenedTensorBucket``
   layout) or one broadcast per tensor (``load_format=None``). ``"auto"`` picks per-tensor on
   gloo and flattened on NCCL: on CPU, concatenating a 496 MB bucket cost 1.2-1.5 s, more than
   the broadcast itself (benchmarks/results/rollout_cpu.json). After the last bucket, POST
   ``/end_weight_update``, then ``/update_weight_version``: a sync that fails half-way never
   announces the new version.
   Never a hang: the broadcast is started asynchronously and polled next to the HTTP answers
   (slime's order: the requests first, then the broadcast, then the answers). A server that
   answers an error has not joined the broadcast (on gloo the root's send waits for every
   receiver), so the group is aborted at once and the error names the server; a server that
   neither answers nor joins within ``timeout_s`` ends the same way.
2b. Servers on this host that share the trainer's GPUs (placement colocated): ``TensorWeightSync``
   POSTs each bucket to ``/update_weights_from_tensor`` as handles into this process's memory
   (``tensor_ipc``; CUDA IPC, or shared memory on CPU), inside the same begin/end windows (SGLang
   0.5.23 rejects it outside one too). ``send_all`` drives several transports over one stream of
   buckets, so a run with colocated servers on several nodes syncs node 0's by tensor and the
   others by the group, each bucket read once.
3. Fallback: ``sync_from_disk`` writes a safetensors file and POSTs ``/update_weights_from_disk``.
4. Checks after a sync (cheap, catch a stale or garbled sync): ``verify_weight_version`` (every
   server reports the new version), ``verify_probes`` (the first values of a few 1-D tensors,
   via ``/get_weights_by_name``, equal the trainer's; SGLang implements that endpoint only for
   a few architectures — Llama, Granite, Exaone4, OPT; for Qwen2 it answers 400 — so a server
   that answers 400 is reported in the result as unable to be probed, never as a failed sync),
   ``verify_prompt_logprobs`` (the log-probs of a fixed prompt, via ``/generate``'s
   ``input_token_logprobs``, equal the trainer's).

Every HTTP call and every collective has a timeout; a failure names the server and the step.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator
from urllib.parse import urlparse

import requests
import torch

from popo_mega.rollout import sglang_api as api
from popo_mega.rollout.server_calls import ServerCalls
from popo_mega.rollout.weight_group import WeightUpdateGroup

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024


class WeightSyncError(RuntimeError):
    """A weight sync or its verification failed; the message names the server and the step."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling SGLang's ``getattr(torch, name)`` reads)."""
    return str(dtype).removeprefix("torch.")


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive (name, tensor) pairs into buckets of at most ``bucket_bytes`` bytes.

    A bucket holds one dtype (flattened buckets need every tensor at an offset aligned to its
    itemsize); a tensor larger than ``bucket_bytes`` gets a bucket of its own. Order is kept.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"iter_buckets: bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"iter_buckets: {name!r} is a {type(tensor).__name__}, not a tensor")
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > bucket_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The bucket's bytes in order as one uint8 tensor: [sum(numel * itemsize)] (SGLang's layout)."""
    return torch.cat([t.detach().to(device).contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _post(session: requests.Session, url: str, path: str, body: dict, *, timeout_s: float,
          api_key: str | None) -> requests.Response:
    headers = _headers(api_key)
    try:
        r = session.post(f"{url}{path}", json=body, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise WeightSyncError(f"{url}{path}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        raise WeightSyncError(f"{url}{path}: HTTP {r.status_code}: {r.text[:500]}")
    return r


def _on_all(urls: list[str], fn: Callable[[str], object], what: str, timeout_s: float) -> list:
    """``fn(url)`` for every url at once (``ServerCalls``); one WeightSyncError listing every failure."""
    return ServerCalls(urls, fn).wait(timeout_s, what, WeightSyncError)


def await_collective(is_done: Callable[[], bool], calls: ServerCalls, *, deadline: float, what: str,
                     abort: Callable[[], None]) -> None:
    """Wait until ``is_done()`` (the broadcast completed) and every server answered; never hang.

    A server that answers an error before the broadcast completed did not join it (SGLang rejects
    an update outside a begin/end window, or for an unknown group, before receiving): ``abort()``
    is called and WeightSyncError names the server. At ``deadline`` (time.monotonic()) the same,
    naming the servers that have not answered. ``is_done`` may raise (the collective failed).
    """
    sleep = 1e-4
    while True:
        errors = calls.errors()
        if errors:
            try:
                done = is_done()
            except Exception:  # noqa: BLE001 - the server's error is the one to report
                done = False
            if not done:
                abort()
                raise WeightSyncError(f"{what}: " + "; ".join(f"{u}: {e}" for u, e in errors.items()) +
                                      " -- the server did not join the broadcast; the weight-update group was aborted")
            raise WeightSyncError(f"{what}: " + "; ".join(f"{u}: {e}" for u, e in errors.items()))
        if is_done() and not calls.pending():
            return
        if time.monotonic() > deadline:
            waiting = calls.pending()
            abort()
            raise WeightSyncError(f"{what}: no end within the timeout: "
                                  + (f"no answer from {waiting}" if waiting else "the broadcast did not complete")
                                  + "; the weight-update group was aborted")
        calls.finished.wait(timeout=sleep)
        sleep = min(sleep * 2, 0.01)


def _works_done(works: list) -> Callable[[], bool]:
    def done() -> bool:
        if all(w.is_completed() for w in works):
            for w in works:
                w.wait()  # raises if the collective failed
            return True
        return False
    return done


def server_tp_sizes(urls: list[str], *, timeout_s: float = 30.0, api_key: str | None = None) -> list[int]:
    """Each server's TP size from ``GET /server_info`` (``tp_size``; SGLang returns its resolved
    ServerArgs there): the number of ranks it joins the weight-update group with."""
    headers = _headers(api_key)

    def get(u):
        r = requests.get(f"{u}/server_info", headers=headers, timeout=timeout_s)
        if r.status_code != 200:
            raise WeightSyncError(f"{u}/server_info: HTTP {r.status_code}: {r.text[:200]}")
        tp = r.json().get("tp_size")
        if not isinstance(tp, int) or tp < 1:
            raise WeightSyncError(f"{u}/server_info: tp_size must be a positive integer, got {tp!r}")
        return tp

    return _on_all(urls, get, "server_info (tp_size)", timeout_s + 5)


def _resolve(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise WeightSyncError(f"cannot resolve host {host!r}: {exc}") from None


def trainer_address(urls: list[str]) -> str:
    """The address of this host that the servers' ranks can dial for the weight-update group's store.

    127.0.0.1 when every server is on this host (a loopback address); else the source address of
    the interface that routes to the first remote server (a UDP ``connect`` sends nothing), else
    the address ``socket.getfqdn()`` resolves to. A loopback answer with remote servers is an error:
    set ``rollout.master_address``.
    """
    resolve = _resolve
    remote = []
    for url in urls:
        parsed = urlparse(url)
        if not parsed.hostname:
            raise WeightSyncError(f"server URL {url!r} has no host")
        ip = resolve(parsed.hostname)
        if not ipaddress.ip_address(ip).is_loopback:
            remote.append((ip, parsed.port or 80))
    if not remote:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(remote[0])
            addr = s.getsockname()[0]
    except OSError:
        addr = resolve(socket.getfqdn())
    if ipaddress.ip_address(addr).is_loopback:
        raise WeightSyncError(f"no non-loopback address of this host reaches {remote[0][0]} (hostname resolves to "
                              f"{addr}): set rollout.master_address to an address the servers can reach")
    return addr


@dataclass
class SyncReport:
    """What one sync moved. ``probes``: name -> the first values of a few small tensors, for checks."""

    version: str
    method: str
    tensors: int = 0
    buckets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    probes: dict[str, list] = field(default_factory=dict)


class _ProbeKeeper:
    """Keeps the head of the first ``count`` 1-D tensors of a sync and of the last one.

    The head is what ``/get_weights_by_name`` with ``truncate_size = values`` returns for a 1-D
    tensor (``tensor.tolist()[:k]``). Only 1-D tensors are probed: they are replicated or split
    from their start across a server's TP ranks (norms, biases), where SGLang reads TP rank 0's
    shard; a row-parallel matrix's first row would be cut. The last tensor catches a sync that
    stopped half-way; the first ones a stale sync.

    Only the probed values reach the host: the first ``count`` heads are copied when seen; for
    the last one, each candidate's head is cloned on its own device (``values`` elements, no host
    sync) and only the final one is copied in ``result()``.
    """

    def __init__(self, count: int = 2, values: int = 16):
        self.count, self.values = count, values
        self.probes: dict[str, list] = {}
        self.last: tuple[str, torch.Tensor] | None = None

    def see(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dim() != 1:
            return
        head = tensor.detach()[:self.values]
        if len(self.probes) < self.count:
            self.probes[name] = head.float().cpu().tolist()
        else:
            self.last = (name, head.clone())

    def result(self) -> dict[str, list]:
        out = dict(self.probes)
        if self.last is not None:
            out[self.last[0]] = self.last[1].float().cpu().tolist()
        return out


def _flat(values) -> list[float]:
    return [float(x) for v in values for x in (v if isinstance(v, list) else [v])]


class DistributedWeightSync:
    """Sends HF-named tensors to rollout servers over ``/update_weights_from_distributed``.

    urls:            the servers
    tp_sizes:        ranks each server joins the group with (its TP size); None: read from each
                     server's ``/server_info`` at ``connect()``
    master_address:  the address of this host the servers dial (None: ``trainer_address(urls)``)
    backend:         "gloo" (CPU tensors) or "nccl" (CUDA tensors) — the same code path
    load_format:     "flattened_bucket" (one broadcast per bucket), None (one per tensor), or
                     "auto" (None on gloo, "flattened_bucket" on NCCL)
    timeout_s:       bound on every HTTP call and on every collective (the group's timeout too)
    """

    def __init__(self, urls: list[str], *, master_address: str | None = None, master_port: int | None = None,
                 group_name: str = "popo_weight_sync", backend: str = "gloo", tp_sizes: list[int] | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, load_format: str | None = "auto",
                 timeout_s: float = 300.0, api_key: str | None = None):
        if not urls:
            raise ValueError("DistributedWeightSync: no server URLs")
        if load_format not in ("flattened_bucket", None, "auto"):
            raise ValueError(f"DistributedWeightSync: load_format must be 'flattened_bucket', None or 'auto', "
                             f"got {load_format!r}")
        if load_format == "auto":
            load_format = "flattened_bucket" if backend == "nccl" else None
        self.urls, self.backend, self.group_name = list(urls), backend, group_name
        self.tp_sizes = list(tp_sizes) if tp_sizes else None
        if self.tp_sizes is not None and (len(self.tp_sizes) != len(self.urls) or min(self.tp_sizes) < 1):
            raise ValueError(f"DistributedWeightSync: tp_sizes {self.tp_sizes} for {len(self.urls)} servers "
                             "(one positive size per server)")
        self.master_address = master_address
        self.master_port = master_port
        self.bucket_bytes, self.load_format = bucket_bytes, load_format
        self.timeout_s, self.api_key = timeout_s, api_key
        self.group: WeightUpdateGroup | None = None
        self._formed = False  # the servers joined a group (to destroy on close, aborted or not)
        self.version: str | None = None
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _post(self, url: str, path: str, body: dict, timeout_s: float | None = None) -> requests.Response:
        return _post(self._session(), url, path, body, timeout_s=timeout_s or self.timeout_s, api_key=self.api_key)

    def connect(self) -> None:
        """Form the group: every server joins over HTTP (``tp_sizes[i]`` ranks each) while this
        process joins as rank 0. A server that rejects the request ends it at once, naming it."""
        if self.tp_sizes is None:
            self.tp_sizes = server_tp_sizes(self.urls, timeout_s=min(self.timeout_s, 30.0), api_key=self.api_key)
        if self.master_address is None:
            self.master_address = trainer_address(self.urls)
        elif ipaddress.ip_address(_resolve(self.master_address)).is_loopback:
            routed = trainer_address(self.urls)  # a loopback address cannot be dialled from another host
            if routed != "127.0.0.1":
                warnings.warn(f"weight sync: master_address {self.master_address} is loopback but servers are remote; "
                              f"using {routed} (set rollout.master_address to choose)", stacklevel=2)
                self.master_address = routed
        if self.master_port is None:
            from popo_mega.runtime import free_port
            self.master_port = free_port(self.master_address)
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.urls))]
        body = {u: api.init_weights_update_group_request(
                    master_address=self.master_address, master_port=self.master_port, rank_offset=o,
                    world_size=world, group_name=self.group_name, backend=self.backend)
                for u, o in zip(self.urls, offsets)}
        box: dict = {}

        def form():
            try:
                box["group"] = WeightUpdateGroup(master_address=self.master_address, master_port=self.master_port,
                                                 rank=0, world_size=world, group_name=self.group_name,
                                                 backend=self.backend, timeout_s=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - reported below
                box["error"] = exc

        former = threading.Thread(target=form, name="weight-group-rank0", daemon=True)
        former.start()
        calls = ServerCalls(self.urls, lambda u: self._post(u, "/init_weights_update_group", body[u]))

        def formed() -> bool:
            if "error" in box:
                raise WeightSyncError(f"weight-update group {self.group_name} at {self.master_address}:"
                                      f"{self.master_port} did not form: {box['error']}")
            return "group" in box

        def give_up():  # rank 0 is left waiting in a daemon thread until its store timeout
            box.setdefault("abandoned", True)

        where = f"init_weights_update_group (world {world}, rank offsets {dict(zip(self.urls, offsets))})"
        await_collective(formed, calls, deadline=time.monotonic() + self.timeout_s + 5, what=where, abort=give_up)
        self.group = box["group"]
        self._formed = True

    def _begin(self) -> list[str]:
        """POST /begin_weight_update everywhere; returns the servers that opened a window.

        A window left open by an earlier sync that died (an attached server outlives its trainer)
        is closed and opened again. A server without the endpoint (404: an SGLang before the
        windows) updates without one.
        """
        opened: list[str] = []

        def begin(url):
            for attempt in range(2):
                r = self._session().post(f"{url}/begin_weight_update", json=api.begin_weight_update_request(),
                                         headers=_headers(self.api_key), timeout=self.timeout_s)
                if r.status_code == 200:
                    opened.append(url)
                    return
                if r.status_code == 404:
                    return
                if attempt == 0 and r.status_code == 400 and "already open" in r.text:
                    self._post(url, "/end_weight_update", api.end_weight_update_request())
                    continue
                raise WeightSyncError(f"{url}/begin_weight_update: HTTP {r.status_code}: {r.text[:300]}")

        try:
            _on_all(self.urls, begin, "begin_weight_update", self.timeout_s + 5)
        except WeightSyncError:   # _on_all reports every failure (HTTP errors included) as one
            self._end(opened, best_effort=True)
            raise
        return opened

    def _end(self, urls: list[str], *, best_effort: bool) -> None:
        """POST /end_weight_update to ``urls`` (after a failure: short timeout, errors ignored)."""
        if not urls:
            return
        timeout = min(self.timeout_s, 10.0) if best_effort else self.timeout_s
        try:
            _on_all(urls, lambda u: self._post(u, "/end_weight_update", api.end_weight_update_request(), timeout),
                    "end_weight_update", timeout + 5)
        except WeightSyncError:
            if not best_effort:
                raise

    def _send_bucket(self, index: int, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """POST the bucket's metadata to every server, broadcast it, wait for both (bounded)."""
        group = self.group
        body = api.update_weights_from_distributed_request(
            [n for n, _ in bucket], [dtype_name(t.dtype) for _, t in bucket], [list(t.shape) for _, t in bucket],
            group_name=self.group_name, load_format=self.load_format)
        if self.load_format == "flattened_bucket":
            sources = [flatten_bucket(bucket, group.device)]
        else:
            sources = [t.detach().to(group.device).contiguous() for _, t in bucket]
        calls = ServerCalls(self.urls, lambda u: self._post(u, "/update_weights_from_distributed", body))
        works = [group.broadcast_async(t) for t in sources]
        await_collective(_works_done(works), calls, deadline=time.monotonic() + self.timeout_s,
                         what=f"update_weights_from_distributed, bucket {index} ({bucket[0][0]}...)",
                         abort=self._abort)

    def _abort(self) -> None:
        """Give up the group (a rank never joined a pending broadcast): nothing waits for it."""
        if self.group is not None:
            self.group.abort()
            self.group = None

    method = "distributed"

    def _ready(self) -> None:
        """Form the group if it is not formed; a group aborted by a failed sync must be closed first."""
        if self.group is None:
            if self._formed:
                raise WeightSyncError(f"weight-update group {self.group_name} was aborted by a failed sync: "
                                      "close() and connect again")
            self.connect()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncReport:
        """Open the servers' update windows, stream all tensors bucket by bucket, close the windows,
        then set ``version`` on every server. Any failure raises WeightSyncError naming the server."""
        return send_all([self], named_tensors, version)

    def close(self) -> None:
        """Ask the servers to drop the group, then drop ours (best effort, bounded). After an abort
        the servers still hold their side: a group name cannot be initialised twice."""
        if not self._formed:
            return
        self._formed = False
        for url in self.urls:
            try:
                self._post(url, "/destroy_weights_update_group",
                           api.destroy_weights_update_group_request(self.group_name), timeout_s=10.0)
            except WeightSyncError:
                pass
        if self.group is not None:
            self.group.close()
            self.group = None


class TensorWeightSync(DistributedWeightSync):
    """Sends HF-named tensors to servers on this host over ``/update_weights_from_tensor``.

    For colocated servers: a server on a trainer rank's GPU cannot join an NCCL group with that
    rank ("Duplicate GPU detected"), but it can map the trainer's memory. Each bucket is serialised
    once per TP rank of each server (``tensor_ipc``: CUDA IPC handles, or shared memory for CPU
    tensors) and POSTed; the bucket's tensors are held until every server answered, since the
    handles point into this process's memory. SGLang 0.5.23 answers ``/update_weights_from_tensor``
    with 400 outside a ``/begin_weight_update`` .. ``/end_weight_update`` window
    (``SchedulerWeightUpdaterManager.update_weights_from_tensor``: ``self._session is None``), so the
    windows, the buckets, the version bump after the last bucket and the bounded, server-naming
    failures are :class:`DistributedWeightSync`'s; only the transport differs (no group to form).
    """

    method = "tensor"

    def __init__(self, urls: list[str], *, tp_sizes: list[int] | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 300.0, api_key: str | None = None,
                 **_unused):
        super().__init__(urls, tp_sizes=tp_sizes, bucket_bytes=bucket_bytes, load_format=None,
                         timeout_s=timeout_s, api_key=api_key)

    def connect(self) -> None:
        """Read each server's TP size (one payload per TP rank); there is no group to form."""
        if self.tp_sizes is None:
            self.tp_sizes = server_tp_sizes(self.urls, timeout_s=min(self.timeout_s, 30.0), api_key=self.api_key)

    def _ready(self) -> None:
        if self.tp_sizes is None:
            self.connect()

    def _send_bucket(self, index: int, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Serialise the bucket once (one payload per TP rank of every server, over one copy of a CPU
        bucket), hand each server its ranks' payloads, POST, wait for every answer."""
        from popo_mega.rollout.tensor_ipc import serialize_named_tensors

        payloads, held = serialize_named_tensors(bucket, copies=sum(self.tp_sizes))
        bodies, start = {}, 0
        for url, tp in zip(self.urls, self.tp_sizes):
            bodies[url] = api.update_weights_from_tensor_request(payloads[start:start + tp])
            start += tp
        try:
            _on_all(self.urls, lambda u: self._post(u, "/update_weights_from_tensor", bodies[u]),
                    f"update_weights_from_tensor, bucket {index} ({bucket[0][0]}...)", self.timeout_s + 5)
        finally:
            del held  # the servers answered (or gave up): their handles into these tensors are closed

    def close(self) -> None:
        """Nothing to tear down: no group was formed."""


def send_all(syncs: list[DistributedWeightSync], named_tensors: Iterable[tuple[str, torch.Tensor]],
             version: str) -> SyncReport:
    """Stream ``named_tensors`` once to every sync's servers (each sync its own transport).

    Open every server's update window, send each bucket through every sync, close the windows,
    then set ``version`` everywhere: a sync that fails half-way never announces the new version,
    and every window it opened is closed. ``report.method`` joins the syncs' methods ("tensor+distributed").
    """
    if not syncs:
        raise ValueError("send_all: no syncs")
    for sync in syncs:
        sync._ready()
    report = SyncReport(version=str(version), method="+".join(s.method for s in syncs))
    probes = _ProbeKeeper()
    t0 = time.perf_counter()
    opened: list[tuple[DistributedWeightSync, list[str]]] = []
    try:
        for sync in syncs:
            opened.append((sync, sync._begin()))
        bucket_bytes = min(s.bucket_bytes for s in syncs)
        for index, bucket in enumerate(iter_buckets(named_tensors, bucket_bytes)):
            for name, tensor in bucket:
                probes.see(name, tensor)
            for sync in syncs:
                sync._send_bucket(index, bucket)
            report.buckets += 1
            report.tensors += len(bucket)
            report.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
    except BaseException:
        for sync, urls in opened:
            sync._end(urls, best_effort=True)
        raise
    for sync, urls in opened:
        sync._end(urls, best_effort=False)
    if report.tensors == 0:
        raise WeightSyncError("send: no tensors to sync")
    urls = [u for s in syncs for u in s.urls]
    set_weight_version(urls, report.version, timeout_s=max(s.timeout_s for s in syncs), api_key=syncs[0].api_key)
    for sync in syncs:
        sync.version = report.version
    report.seconds = time.perf_counter() - t0
    report.probes = probes.result()
    return report


def set_weight_version(urls: list[str], version: str, *, timeout_s: float = 60.0, api_key: str | None = None) -> None:
    """POST ``/update_weight_version`` on every server."""
    session = requests.Session()
    _on_all(urls, lambda u: _post(session, u, "/update_weight_version", api.update_weight_version_request(version),
                                  timeout_s=timeout_s, api_key=api_key), "update_weight_version", timeout_s + 5)


def sync_from_disk(urls: list[str], named_tensors: Iterable[tuple[str, torch.Tensor]], version: str,
                   directory: str, *, timeout_s: float = 600.0, api_key: str | None = None) -> SyncReport:
    """Fallback: write ``directory/model.safetensors`` and POST ``/update_weights_from_disk``.

    ``directory`` must be readable by every server (shared file system); for a real SGLang server
    it must also hold the model's config.json (SGLang loads a full HF directory).
    """
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    t0 = time.perf_counter()
    probes = _ProbeKeeper()
    tensors = {}
    for name, tensor in named_tensors:
        probes.see(name, tensor)
        tensors[name] = tensor.detach().cpu().contiguous()
    if not tensors:
        raise WeightSyncError("sync_from_disk: no tensors to sync")
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    session = requests.Session()
    _on_all(urls, lambda u: _post(session, u, "/update_weights_from_disk",
                                  api.update_weights_from_disk_request(directory, version),
                                  timeout_s=timeout_s, api_key=api_key), "update_weights_from_disk", timeout_s + 5)
    return SyncReport(version=str(version), method="disk", tensors=len(tensors), buckets=1,
                      bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                      seconds=time.perf_counter() - t0, probes=probes.result())


# ---- checks after a sync ----

def verify_weight_version(urls: list[str], version: str, *, timeout_s: float = 30.0, api_key: str | None = None) -> None:
    """Every server's ``/model_info`` reports ``version``; else WeightSyncError naming the stale ones."""
    headers = _headers(api_key)

    def get(u):
        r = requests.get(f"{u}/model_info", headers=headers, timeout=timeout_s)
        r.raise_for_status()
        return r.json().get("weight_version")

    seen = _on_all(urls, get, "model_info", timeout_s + 5)
    stale = {u: v for u, v in zip(urls, seen) if v != str(version)}
    if stale:
        raise WeightSyncError(f"stale weight version (expected {version!r}): {stale}")


def verify_probes(urls: list[str], probes: dict[str, list], *, atol: float = 0.0,
                  timeout_s: float = 30.0, api_key: str | None = None) -> dict[str, str]:
    """The head of each probed tensor (``_ProbeKeeper``), read back with ``/get_weights_by_name``, matches.

    ``atol`` 0 compares exactly (right for fp32 and for bf16 read back as fp32). A server that
    answers the read with HTTP 400 cannot be probed: SGLang 0.5.23 answers ``{"error": {"message":
    "Get parameter by name failed"}}`` for every model class without ``get_weights_by_name``
    (``WeightExporter.get_weights_by_name`` catches the AttributeError; Qwen2, Qwen3, ... have
    none). Returns those servers, url -> the answer, for the caller to report; different values
    raise WeightSyncError naming the server and the tensor.
    """
    session = requests.Session()
    unreadable: dict[str, str] = {}
    for name, expected in probes.items():
        want = _flat(expected)
        for url in urls:
            if url in unreadable:
                continue
            try:
                r = session.post(f"{url}/get_weights_by_name", json=api.get_weights_by_name_request(name, len(expected)),
                                 headers=_headers(api_key), timeout=timeout_s)
            except requests.RequestException as exc:
                raise WeightSyncError(f"{url}/get_weights_by_name({name}): {type(exc).__name__}: {exc}") from None
            if r.status_code == 400:
                try:
                    unreadable[url] = str(r.json()["error"]["message"])[:300]
                except (ValueError, KeyError, TypeError):
                    unreadable[url] = r.text[:300]
                continue
            if r.status_code != 200:
                raise WeightSyncError(f"{url}/get_weights_by_name({name}): HTTP {r.status_code}: {r.text[:300]}")
            got = _flat(r.json())
            diff = max((abs(a - b) for a, b in zip(got, want)), default=float("inf"))
            if len(got) != len(want) or diff > atol:
                raise WeightSyncError(f"{url}: tensor {name} differs from the trainer's after the sync "
                                      f"(max |diff| {diff:.3g} > {atol}): stale or garbled weights")
    return unreadable


def prompt_logprobs(url: str, prompt_ids: list[int], *, timeout_s: float = 60.0, api_key: str | None = None) -> list[float]:
    """log p(prompt[t] | prompt[:t]) for t = 1..P-1 from a server (``/generate`` input_token_logprobs)."""
    headers = _headers(api_key)
    r = requests.post(f"{url}/generate", json=api.prompt_logprob_request(prompt_ids), headers=headers, timeout=timeout_s)
    if r.status_code != 200:
        raise WeightSyncError(f"{url}/generate (prompt log-probs): HTTP {r.status_code}: {r.text[:300]}")
    entries = r.json()["meta_info"]["input_token_logprobs"]
    return [float(e[0]) for e in entries[1:]]


def verify_prompt_logprobs(urls: list[str], prompt_ids: list[int], expected: torch.Tensor | list[float], *,
                           atol: float, timeout_s: float = 60.0, api_key: str | None = None) -> float:
    """Every server's log-probs of a fixed prompt match the trainer's ``expected`` [P-1]; returns the max |diff|."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    worst = 0.0
    for url in urls:
        got = torch.tensor(prompt_logprobs(url, prompt_ids, timeout_s=timeout_s, api_key=api_key), dtype=torch.float64)
        if got.shape != expected.shape:
            raise WeightSyncError(f"{url}: {got.numel()} prompt log-probs, expected {expected.numel()}")
        diff = float((got - expected).abs().max())
        if diff > atol:
            raise WeightSyncError(f"{url}: prompt log-probs differ from the trainer's by {diff:.3g} > {atol} "
                                  "after the sync: stale or garbled weights")
        worst = max(worst, diff)
    return worst
