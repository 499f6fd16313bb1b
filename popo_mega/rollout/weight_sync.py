"""Trainer side of the weight sync: HF-named tensors -> buckets -> rollout servers, then checks.

Protocol (SGLang's, so the same code drives SGLang servers and the embedded server):

1. ``connect()``: POST ``/init_weights_update_group`` to every server (rank_offset 1, 1 + tp_0, ...)
   while this process joins the same group as rank 0 (``WeightUpdateGroup``: its own TCPStore, so
   the trainer's default torch.distributed world is untouched; gloo on CPU, NCCL on GPU).
2. ``send(named_tensors, version)``: per bucket (default 512 MB, one dtype per bucket), POST
   ``/update_weights_from_distributed`` {names, dtypes, shapes, load_format} to every server and
   broadcast the bucket from rank 0 — one flat uint8 tensor (``load_format="flattened_bucket"``,
   SGLang's ``FlattenedTensorBucket`` layout) or one broadcast per tensor (``load_format=None``).
   ``"auto"`` picks per-tensor on gloo and flattened on NCCL: on CPU, concatenating a 496 MB
   bucket cost 1.2-1.5 s, more than the broadcast itself (benchmarks/results/rollout_cpu.json).
   After the last bucket, POST ``/update_weight_version``: a sync that fails half-way never
   announces the new version.
3. Fallback: ``sync_from_disk`` writes a safetensors file and POSTs ``/update_weights_from_disk``.
4. Checks after a sync (cheap, catch a stale or garbled sync): ``verify_weight_version`` (every
   server reports the new version), ``verify_probes`` (the first values of a few small tensors,
   via ``/get_weights_by_name``, equal the trainer's), ``verify_prompt_logprobs`` (the log-probs
   of a fixed prompt, via ``/generate``'s ``input_token_logprobs``, equal the trainer's).

Every HTTP call and every collective has a timeout; a failure names the server and the step.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import requests
import torch

from popo_mega.rollout import sglang_api as api
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


def _post(session: requests.Session, url: str, path: str, body: dict, *, timeout_s: float,
          api_key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = session.post(f"{url}{path}", json=body, headers=headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise WeightSyncError(f"{url}{path}: {type(exc).__name__}: {exc}") from None
    if r.status_code != 200:
        raise WeightSyncError(f"{url}{path}: HTTP {r.status_code}: {r.text[:500]}")
    return r


def _on_all(urls: list[str], fn: Callable[[str], object], what: str, timeout_s: float) -> list:
    """Run ``fn(url)`` for every url in threads; raise one WeightSyncError listing every failure."""
    results: dict[str, object] = {}
    errors: dict[str, str] = {}

    def run(url):
        try:
            results[url] = fn(url)
        except Exception as exc:  # noqa: BLE001 - collected and reported together
            errors[url] = str(exc)

    threads = [threading.Thread(target=run, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    for u, t in zip(urls, threads):
        if t.is_alive():
            errors.setdefault(u, f"no answer within {timeout_s:.0f}s")
    if errors:
        raise WeightSyncError(f"{what} failed: " + "; ".join(f"{u}: {e}" for u, e in errors.items()))
    return [results[u] for u in urls]


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
    """Keeps the head of the first ``count`` tensors of a sync and of the last one.

    The head is what ``/get_weights_by_name`` with a small ``truncate_size`` returns: the first
    ``values`` entries of a 1-D tensor, the first row of a 2-D one (``tensor.tolist()[:k]``).
    The last tensor catches a sync that stopped half-way; the first ones a stale sync.
    """

    def __init__(self, count: int = 2, values: int = 16):
        self.count, self.values = count, values
        self.probes: dict[str, list] = {}
        self.last: tuple[str, list] | None = None

    def see(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dim() == 0 or tensor.dim() > 2:
            return
        k = self.values if tensor.dim() == 1 else 1
        head = tensor.detach()[:k].float().cpu().tolist()
        if len(self.probes) < self.count:
            self.probes[name] = head
        else:
            self.last = (name, head)

    def result(self) -> dict[str, list]:
        out = dict(self.probes)
        if self.last is not None:
            out[self.last[0]] = self.last[1]
        return out


def _flat(values) -> list[float]:
    return [float(x) for v in values for x in (v if isinstance(v, list) else [v])]


class DistributedWeightSync:
    """Sends HF-named tensors to rollout servers over ``/update_weights_from_distributed``.

    urls:            the servers (each joins with ``tp_sizes[i]`` ranks; 1 for the embedded server)
    backend:         "gloo" (CPU tensors) or "nccl" (CUDA tensors) — the same code path
    load_format:     "flattened_bucket" (one broadcast per bucket), None (one per tensor), or
                     "auto" (None on gloo, "flattened_bucket" on NCCL)
    """

    def __init__(self, urls: list[str], *, master_address: str = "127.0.0.1", master_port: int | None = None,
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
        self.tp_sizes = list(tp_sizes) if tp_sizes else [1] * len(urls)
        if len(self.tp_sizes) != len(self.urls):
            raise ValueError(f"DistributedWeightSync: {len(self.tp_sizes)} tp_sizes for {len(self.urls)} servers")
        self.master_address = master_address
        if master_port is None:
            from popo_mega.runtime import free_port
            master_port = free_port(master_address)
        self.master_port = master_port
        self.bucket_bytes, self.load_format = bucket_bytes, load_format
        self.timeout_s, self.api_key = timeout_s, api_key
        self.group: WeightUpdateGroup | None = None
        self.version: str | None = None
        self._local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def connect(self) -> None:
        """Form the group: every server joins over HTTP while this process joins as rank 0."""
        world = 1 + sum(self.tp_sizes)
        offsets = [1 + sum(self.tp_sizes[:i]) for i in range(len(self.urls))]
        errors: list[str] = []

        def join(url, offset):
            try:
                _post(self._session(), url, "/init_weights_update_group",
                      api.init_weights_update_group_request(
                          master_address=self.master_address, master_port=self.master_port, rank_offset=offset,
                          world_size=world, group_name=self.group_name, backend=self.backend),
                      timeout_s=self.timeout_s, api_key=self.api_key)
            except WeightSyncError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=join, args=(u, o), daemon=True) for u, o in zip(self.urls, offsets)]
        for t in threads:
            t.start()
        try:
            self.group = WeightUpdateGroup(master_address=self.master_address, master_port=self.master_port, rank=0,
                                           world_size=world, group_name=self.group_name, backend=self.backend,
                                           timeout_s=self.timeout_s)
        except Exception as exc:
            for t in threads:
                t.join(timeout=1.0)
            raise WeightSyncError(f"weight-update group {self.group_name} at {self.master_address}:{self.master_port} "
                                  f"did not form: {exc}; server errors: {errors}") from None
        for t in threads:
            t.join(timeout=self.timeout_s)
        if errors:
            raise WeightSyncError("init_weights_update_group failed: " + "; ".join(errors))

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncReport:
        """Stream all tensors bucket by bucket, then set ``version`` on every server."""
        if self.group is None:
            self.connect()
        group = self.group
        report = SyncReport(version=str(version), method="distributed")
        probes = _ProbeKeeper()
        t0 = time.perf_counter()
        for index, bucket in enumerate(iter_buckets(named_tensors, self.bucket_bytes)):
            for name, tensor in bucket:
                probes.see(name, tensor)
            body = api.update_weights_from_distributed_request(
                [n for n, _ in bucket], [dtype_name(t.dtype) for _, t in bucket], [list(t.shape) for _, t in bucket],
                group_name=self.group_name, load_format=self.load_format)
            errors: list[str] = []

            def post(url, body=body, errors=errors):
                try:
                    _post(self._session(), url, "/update_weights_from_distributed", body,
                          timeout_s=self.timeout_s, api_key=self.api_key)
                except WeightSyncError as exc:
                    errors.append(str(exc))

            threads = [threading.Thread(target=post, args=(u,), daemon=True) for u in self.urls]
            for t in threads:
                t.start()
            try:
                if self.load_format == "flattened_bucket":
                    group.broadcast(flatten_bucket(bucket, group.device))
                else:
                    for _, tensor in bucket:
                        group.broadcast(tensor.detach().to(group.device).contiguous())
            except Exception as exc:
                raise WeightSyncError(f"bucket {index} ({bucket[0][0]}...): broadcast failed: {exc}; "
                                      f"server errors: {errors}") from None
            finally:
                for t in threads:
                    t.join(timeout=self.timeout_s)
            if errors:
                raise WeightSyncError(f"bucket {index} ({bucket[0][0]}...): " + "; ".join(errors))
            report.buckets += 1
            report.tensors += len(bucket)
            report.bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        if report.tensors == 0:
            raise WeightSyncError("send: no tensors to sync")
        set_weight_version(self.urls, report.version, timeout_s=self.timeout_s, api_key=self.api_key)
        self.version = report.version
        report.seconds = time.perf_counter() - t0
        report.probes = probes.result()
        return report

    def close(self) -> None:
        """Ask the servers to drop the group, then drop ours (best effort)."""
        if self.group is None:
            return
        for url in self.urls:
            try:
                _post(self._session(), url, "/destroy_weights_update_group",
                      api.destroy_weights_update_group_request(self.group_name),
                      timeout_s=10.0, api_key=self.api_key)
            except WeightSyncError:
                pass
        self.group.close()
        self.group = None


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
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def get(u):
        r = requests.get(f"{u}/model_info", headers=headers, timeout=timeout_s)
        r.raise_for_status()
        return r.json().get("weight_version")

    seen = _on_all(urls, get, "model_info", timeout_s + 5)
    stale = {u: v for u, v in zip(urls, seen) if v != str(version)}
    if stale:
        raise WeightSyncError(f"stale weight version (expected {version!r}): {stale}")


def verify_probes(urls: list[str], probes: dict[str, list], *, atol: float = 0.0,
                  timeout_s: float = 30.0, api_key: str | None = None) -> None:
    """The head of each probed tensor (``_ProbeKeeper``), read back with ``/get_weights_by_name``, matches.

    ``atol`` 0 compares exactly (right for fp32 and for bf16 read back as fp32).
    """
    session = requests.Session()
    for name, expected in probes.items():
        def get(u, name=name, n=len(expected)):
            return _post(session, u, "/get_weights_by_name", api.get_weights_by_name_request(name, n),
                         timeout_s=timeout_s, api_key=api_key).json()

        want = _flat(expected)
        for url, got in zip(urls, _on_all(urls, get, f"get_weights_by_name({name})", timeout_s + 5)):
            got = _flat(got)
            diff = max((abs(a - b) for a, b in zip(got, want)), default=float("inf"))
            if len(got) != len(want) or diff > atol:
                raise WeightSyncError(f"{url}: tensor {name} differs from the trainer's after the sync "
                                      f"(max |diff| {diff:.3g} > {atol}): stale or garbled weights")


def prompt_logprobs(url: str, prompt_ids: list[int], *, timeout_s: float = 60.0, api_key: str | None = None) -> list[float]:
    """log p(prompt[t] | prompt[:t]) for t = 1..P-1 from a server (``/generate`` input_token_logprobs)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
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
