"""``HttpEngine``: the RolloutEngine over any server speaking SGLang's native HTTP API.

The same client drives real SGLang servers (or one sglang-router URL) and embedded servers:

    engine = HttpEngine(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], failover=True)
    completions = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=512), n=8)
    engine.sync_weights(named_tensors, version="step-12")    # pause -> broadcast -> flush -> continue

Requests: one ``/generate`` per prompt (n samples each), up to ``max_in_flight`` at once, spread
round-robin over the live servers. A request that fails with a connection error, a timeout or an
HTTP 5xx is retried on another server when ``failover`` is on (at most ``max_retries`` times; the
failed server is taken out of rotation); with ``failover`` off, the first such failure raises
``RolloutServerError`` naming the server. HTTP 4xx (a bad request) is never retried.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import requests
import torch

from popo_mega.rollout.engine import Completion, SamplingParams, sample_seed
from popo_mega.rollout.sglang_api import (ProtocolError, completions_from_response, generate_request,
                                          memory_occupation_request, pause_generation_request)
from popo_mega.rollout.server_calls import SessionPool, post_all
from popo_mega.rollout.weight_sync import (DEFAULT_BUCKET_BYTES, DistributedWeightSync, SyncReport,
                                           TensorWeightSync, WeightSyncError, send_all, sync_from_disk,
                                           verify_probes, verify_prompt_logprobs, verify_weight_version)


class RolloutServerError(RuntimeError):
    """A rollout server failed (or all of them did); the message names the server and the cause."""


class _Retryable(Exception):
    pass


class HttpEngine:
    """RolloutEngine over SGLang-API servers.

    urls:               server base URLs ("http://host:port"), or one sglang-router URL
    failover:           retry a failed request on another server (True) or raise at once (False)
    max_retries:        retries per request when ``failover`` is on
    request_timeout_s:  per-HTTP-request read timeout; connect_timeout_s: connection timeout
    sync_method:        for the servers not in ``tensor_urls``: "distributed" (init_weights_update_group
                        + update_weights_from_distributed),
                        "disk" (update_weights_from_disk), or "auto" (distributed, disk if it fails)
    sync_backend:       "gloo" (CPU trainer tensors) or "nccl" (CUDA tensors)
    load_format:        "auto" (per-tensor broadcasts on gloo, flattened buckets on NCCL),
                        "flattened_bucket", or None (see weight_sync)
    disk_dir:           where the disk fallback writes (must be readable by the servers)
    tensor_urls:        servers synced by ``/update_weights_from_tensor`` (colocated servers on this
                        host, see ``placement.sync_methods``); the others by ``sync_method``. Ignored
                        when ``sync_method`` is "disk"
    verify_probes:      after a sync, read back a few small tensors with /get_weights_by_name
                        (servers that cannot answer it, e.g. SGLang serving Qwen2, are reported once
                        and then checked by weight version only)
    tp_sizes:           ranks each server joins the weight-update group with (None: each server's
                        ``/server_info`` tp_size)
    master_address:     this host's address as the servers reach it (None: ``trainer_address``)
    pause_mode:         what ``sync_weights`` does to requests in flight: "retract" (recomputed on the
                        new weights, cache flushed), "in_place" (go on over their old K/V cache, no
                        flush) or "abort" (see ``sync_weights``; the run's ``rollout.pause_mode``)
    servers:            ServerProcess objects this engine launched and stops on ``close()``
    """

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None, max_in_flight: int = 64,
                 connect_timeout_s: float = 10.0, request_timeout_s: float = 600.0, failover: bool = True,
                 max_retries: int = 2, sync_method: str = "auto", sync_backend: str = "gloo",
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, load_format: str | None = "auto",
                 tp_sizes: list[int] | None = None, master_address: str | None = None,
                 disk_dir: str | None = None, sync_timeout_s: float = 300.0, verify_probes: bool = True,
                 pause_mode: str = "retract", servers: list | None = None, tensor_urls: Sequence[str] = ()):
        if not urls:
            raise ValueError("HttpEngine: no server URLs")
        if sync_method not in ("distributed", "disk", "auto"):
            raise ValueError(f"HttpEngine: sync_method must be distributed|disk|auto, got {sync_method!r}")
        if sync_method == "disk" and not disk_dir:
            raise ValueError("HttpEngine: sync_method='disk' needs disk_dir")
        self.urls = [u.rstrip("/") for u in urls]
        self.tensor_urls = {u.rstrip("/") for u in tensor_urls}
        if not self.tensor_urls <= set(self.urls):
            raise ValueError(f"HttpEngine: tensor_urls {sorted(self.tensor_urls - set(self.urls))} are not among urls")
        self.api_key = api_key
        self.timeout = (connect_timeout_s, request_timeout_s)
        self.failover, self.max_retries = failover, max_retries
        self.max_in_flight = max_in_flight
        self.sync_method, self.disk_dir, self.verify_probes_after_sync = sync_method, disk_dir, verify_probes
        self.pause_mode = pause_generation_request(pause_mode)["mode"]  # validated here, not at the first sync
        self.dead: dict[str, str] = {}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._local = threading.local()
        self._control_sessions = SessionPool()  # the control posts' per-server sessions (post_all)
        self._servers = list(servers or [])
        self._version: str | None = None
        self.last_sync: SyncReport | None = None
        if tp_sizes is not None and len(tp_sizes) != len(self.urls):
            raise ValueError(f"HttpEngine: {len(tp_sizes)} tp_sizes for {len(self.urls)} servers")
        self._tp_sizes = dict(zip(self.urls, tp_sizes)) if tp_sizes is not None else None
        self._sync_args = dict(group_name="popo_weight_sync", backend=sync_backend,
                               bucket_bytes=bucket_bytes, load_format=load_format, timeout_s=sync_timeout_s,
                               api_key=api_key, master_address=master_address)
        self._sync: DistributedWeightSync | None = None
        self._tensor_sync: TensorWeightSync | None = None  # kept: its TP sizes come from /server_info once
        self._distributed_failed = False
        self.unprobed: dict[str, str] = {}      # servers whose weights cannot be read back -> why
        self._seed_checked: set[str] = set()    # servers asked whether they honour sampling_seed
        self.seeds_ignored: dict[str, str] = {}  # servers that do not -> why
        self._paused_as = self.pause_mode       # the pause in force during a sync (_from_disk may retract)
        self._warned_disk_retract = False

    # ---- plumbing ----
    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def live_urls(self) -> list[str]:
        with self._lock:
            return [u for u in self.urls if u not in self.dead]

    def _pick(self, avoid: set[str]) -> str:
        live = [u for u in self.live_urls() if u not in avoid] or self.live_urls()
        if not live:
            raise RolloutServerError("no live rollout server left: " +
                                     "; ".join(f"{u}: {why}" for u, why in self.dead.items()))
        return live[next(self._rr) % len(live)]

    def _mark_dead(self, url: str, why: str) -> None:
        with self._lock:
            self.dead[url] = why

    def _healthy(self, url: str, timeout_s: float = 3.0) -> bool:
        try:
            return self._session().get(f"{url}/health", headers=self._headers(), timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def _post_generate(self, url: str, body: dict, n: int) -> list[Completion]:
        try:
            r = self._session().post(f"{url}/generate", json=body, headers=self._headers(), timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            # ChunkedEncodingError: the server died while sending the body (a kill -9 mid-response)
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}: {r.text[:300]}")
        if r.status_code != 200:
            raise RolloutServerError(f"{url}/generate rejected the request: HTTP {r.status_code}: {r.text[:500]}")
        try:
            return completions_from_response(r.json(), n, where=f"{url}/generate")
        except (ValueError, ProtocolError) as exc:
            raise RolloutServerError(str(exc)) from None

    def _generate_one(self, prompt: Sequence[int], sampling: SamplingParams, n: int, index: int) -> list[Completion]:
        seeds = None if sampling.seed is None else [sample_seed(sampling.seed, index, j) for j in range(n)]
        body = generate_request(prompt, sampling, n, seeds=seeds)
        tried: set[str] = set()
        attempts = 1 + (self.max_retries if self.failover else 0)
        last = ""
        for _ in range(attempts):
            url = self._pick(tried)
            tried.add(url)
            try:
                return self._post_generate(url, body, n)
            except _Retryable as exc:
                last = f"{url}/generate failed: {exc}"
                if not self.failover:
                    raise RolloutServerError(f"{last} (failover is off)") from None
                if not self._healthy(url):  # a transient error on a healthy server does not retire it
                    self._mark_dead(url, str(exc))
        raise RolloutServerError(f"{last} (gave up after {attempts} attempts)")

    # ---- RolloutEngine ----
    def check_seeds_honoured(self) -> dict[str, str]:
        """Ask every live server not asked yet whether it honours ``sampling_seed`` (``/server_info``'s
        ``enable_deterministic_inference``: SGLang builds per-row seeds only with it,
        ``SamplingBatchInfo.from_schedule_batch``) and warn loudly for each that does not: seeded
        rollouts from it are not reproducible (not after a resume either). Returns the servers that
        ignore seeds, url -> why."""
        for url in self.live_urls():
            if url in self._seed_checked:
                continue
            self._seed_checked.add(url)
            try:
                r = self._session().get(f"{url}/server_info", headers=self._headers(), timeout=self.timeout[0])
                flag = r.json().get("enable_deterministic_inference") if r.status_code == 200 else None
                why = None if flag is True else (
                    "started without --enable-deterministic-inference" if flag is False
                    else f"/server_info does not say (HTTP {r.status_code})")
            except (requests.RequestException, ValueError, AttributeError) as exc:
                why = f"/server_info failed: {exc}"
            if why:
                self.seeds_ignored[url] = why
                warnings.warn(f"{url} ignores sampling_seed ({why}): seeded rollouts are NOT reproducible, "
                              "not after a resume either; set rollout.deterministic: true", stacklevel=2)
        return dict(self.seeds_ignored)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[list[Completion]]:
        """Sample ``n`` responses per prompt; result[i][j] is the j-th response to prompts[i]."""
        if not prompts:
            return []
        if sampling.seed is not None and sampling.temperature > 0:
            self.check_seeds_honoured()
        pool = ThreadPoolExecutor(max_workers=min(self.max_in_flight, len(prompts)))
        futures = [pool.submit(self._generate_one, p, sampling, n, i) for i, p in enumerate(prompts)]
        try:
            results = [f.result() for f in futures]
        except BaseException:
            # fail fast: queued requests are dropped; the ones in flight end by their own timeouts
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return results

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """pause_generation(``pause_mode``) -> send (tensor and/or distributed, or disk) -> flush_cache
        (not in "in_place") -> continue_generation -> checks. Requests in flight survive it.

        What each pause mode (SGLang 0.5.23 ``/pause_generation``, ``PauseGenerationReqInput``) means
        for the requests in flight and for the server's prefix (radix) cache:

        - "retract" (the default): the running rows go back to the waiting queue with their tokens,
          their K/V cache freed (``Scheduler.pause_generation``); the flush after the send empties the
          prefix cache, so after ``continue_generation`` every row is prefilled again over prompt +
          tokens so far ON THE NEW WEIGHTS: only the tokens already sampled come from the old ones.
          Costs one prefill per row in flight; the cache holds nothing of the old weights.
        - "in_place": the rows stay in the running batch with their K/V cache and go on decoding from it
          with the new weights (no recompute): a token sampled after the sync comes from the new
          weights attending to the OLD weights' K/V of everything before it. No ``/flush_cache``:
          SGLang refuses it while rows are held in place (``Scheduler.flush_cache`` flushes only when
          ``is_fully_idle``, which needs ``running_batch.is_empty()``: sglang/srt/managers/
          scheduler.py:5518-5520 and :5345; the in_place pause leaves ``running_batch`` as it is,
          scheduler.py:5821-5831; io_struct.py:1936 "flush_cache will fail if there are any requests
          in the running_batch"), so flushing would fail the sync. Hence the prefix cache also keeps
          what the old weights computed: a later request sharing a cached prefix reuses that K/V
          until the next flush (a "retract" sync, or ``flush_cache()`` while idle). A disk sync
          cannot be done in place (``/update_weights_from_disk`` flushes, see ``_from_disk``): it
          retracts the rows first, with a warning.
        - "abort" (accepted, not a config choice): the requests in flight are aborted (their
          ``generate`` raises RolloutServerError); then as "retract".

        Either way every response says which tokens which version sampled: its ``meta_info``
        ``weight_versions`` spans, kept in ``Completion.meta`` (``engine.versions_of``). "retract"
        runs are unchanged by the pause-mode choice (bit for bit the syncs of before).
        """
        urls = self.live_urls()
        if not urls:
            raise RolloutServerError("sync_weights: no live rollout server")
        self._paused_as = self.pause_mode
        self.pause_generation()
        try:
            report = self._send(named_tensors, str(version), urls)
            if self._paused_as != "in_place":
                self.flush_cache()
        finally:
            self.continue_generation()
        verify_weight_version(urls, report.version, api_key=self.api_key)
        probe_urls = [u for u in urls if u not in self.unprobed]
        if self.verify_probes_after_sync and report.probes and probe_urls:
            for url, why in verify_probes(probe_urls, report.probes, api_key=self.api_key).items():
                self.unprobed[url] = why
                warnings.warn(f"verify_sync: {url} cannot read weights back (/get_weights_by_name: HTTP 400 {why}; "
                              "SGLang implements it only for Llama-family, Granite, Exaone4 and OPT models, not "
                              "Qwen2): its syncs are checked by weight version only", stacklevel=2)
        self._version, self.last_sync = report.version, report

    def _from_disk(self, urls: list[str], named_tensors, version: str) -> SyncReport:
        """``sync_from_disk``, after retracting rows paused in place: ``/update_weights_from_disk``'s body
        asks for ``flush_cache: true`` (SGLang's default), which SGLang refuses while rows are held in
        place AFTER loading the weights ("Weights were updated, but the cache was not flushed",
        ``flush_cache_after_weight_update``, scheduler_components/weight_updater.py:120), failing the
        sync. A second ``/pause_generation`` in "retract" mode retracts the held rows (SGLang's
        ``pause_generation`` retracts whatever is in ``running_batch``)."""
        if self._paused_as == "in_place":
            if not self._warned_disk_retract:
                self._warned_disk_retract = True
                warnings.warn("pause_mode in_place: a weight sync through update_weights_from_disk flushes the "
                              "cache, which SGLang refuses while rows are paused in place; the rows in flight are "
                              "retracted for it (recomputed on the new weights)", stacklevel=3)
            self._post_all("/pause_generation", pause_generation_request("retract"))
            self._paused_as = "retract"
        return sync_from_disk(urls, named_tensors, version, self.disk_dir, api_key=self.api_key)

    def _send(self, named_tensors, version: str, urls: list[str]) -> SyncReport:
        """Tensor sync for ``tensor_urls``, distributed for the rest; in "auto" mode fall back to disk
        when the group cannot form.

        The tensors are streamed, never all held (a 70B model would not fit): a failure after
        the first bucket cannot be replayed from a one-shot iterator, so it is raised (the servers'
        version is left unchanged) unless ``named_tensors`` is a list or tuple. After any failure,
        "auto" uses the disk path for the following syncs.
        """
        fallback = self.sync_method == "auto" and bool(self.disk_dir)
        if self.sync_method == "disk" or (fallback and self._distributed_failed):
            return self._from_disk(urls, named_tensors, version)
        by_tensor = [u for u in urls if u in self.tensor_urls]
        by_group = [u for u in urls if u not in self.tensor_urls]
        try:
            if by_group and (self._sync is None or self._sync.urls != by_group):
                if self._sync is not None:
                    self._sync.close()
                tp = [self._tp_sizes[u] for u in by_group] if self._tp_sizes is not None else None
                self._sync = DistributedWeightSync(by_group, tp_sizes=tp, **self._sync_args)
                self._sync.connect()
        except WeightSyncError as exc:
            self._sync = None
            if not fallback:
                raise
            self._distributed_failed = True
            warnings.warn(f"distributed weight sync unavailable ({exc}); using update_weights_from_disk")
            return self._from_disk(urls, named_tensors, version)
        syncs = []
        if by_tensor:
            if self._tensor_sync is None or self._tensor_sync.urls != by_tensor:
                tp = [self._tp_sizes[u] for u in by_tensor] if self._tp_sizes is not None else None
                self._tensor_sync = TensorWeightSync(by_tensor, tp_sizes=tp, **self._sync_args)
            syncs.append(self._tensor_sync)
        if by_group:
            syncs.append(self._sync)
        try:
            return send_all(syncs, named_tensors, version)
        except WeightSyncError as exc:
            self._tensor_sync = None
            if self._sync is not None:
                self._sync.close()
                self._sync = None
            if fallback:
                self._distributed_failed = True
                if isinstance(named_tensors, (list, tuple)):
                    return self._from_disk(urls, named_tensors, version)
            raise WeightSyncError(f"{exc} -- the servers may hold partly updated weights under their old version; "
                                  "sync again (a list of tensors can be replayed through the disk fallback)") from None

    def replace_dead_servers(self, health_timeout_s: float = 300.0) -> list[str]:
        """Relaunch, in place, every server this engine started that died, and return them to rotation.

        A server counts as dead when a request marked it so or its process has exited. It is
        started again with its own command (same port, same log) and must pass /health. The new
        server holds its model path's weights, not the last synced ones: the caller must sync
        before sampling from it (the weight-update group is re-formed on the next sync). Servers
        this engine only attached to (``urls`` without a process) cannot be relaunched and stay
        out of rotation. Returns the relaunched URLs.
        """
        from popo_mega.rollout.sglang_launcher import launch

        replaced = []
        for i, server in enumerate(self._servers):
            if server.process.poll() is not None and server.url not in self.dead:
                self._mark_dead(server.url, f"process exited with code {server.process.returncode}")
            if server.url not in self.dead or server.cmd is None:
                continue
            server.stop(timeout_s=5.0)
            self._servers[i] = launch(server.cmd, server.url, log_path=server.log_path, env=server.env,
                                      health_timeout_s=health_timeout_s, api_key=self.api_key)
            with self._lock:
                del self.dead[server.url]
            self._control_sessions.forget(server.url)
            replaced.append(server.url)
        if replaced and self._sync is not None:
            self._sync.close()
            self._sync = None
        return replaced

    def weight_version(self) -> str | None:
        """The version this engine last synced; before any sync, what the first live server reports."""
        if self._version is None and self.live_urls():
            try:
                r = self._session().get(f"{self.live_urls()[0]}/model_info", headers=self._headers(), timeout=10)
                return r.json().get("weight_version") if r.status_code == 200 else None
            except (requests.RequestException, ValueError):
                return None
        return self._version

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        from popo_mega.rollout.sglang_launcher import stop_servers

        stop_servers(self._servers)
        self._servers = []
        self._control_sessions.close()

    # ---- control endpoints ----
    def _post_all(self, path: str, body: dict | None = None, *, ok=(200,)) -> None:
        """POST to every live server at once (``server_calls.post_all``); RolloutServerError naming each failure."""
        post_all(self.live_urls(), path, body, sessions=self._control_sessions, headers=self._headers(), timeout_s=self.timeout,
                 ok=ok, error=RolloutServerError)

    def pause_generation(self) -> None:
        self._post_all("/pause_generation", pause_generation_request(self.pause_mode))

    def continue_generation(self) -> None:
        self._post_all("/continue_generation", {})

    def flush_cache(self, retries: int = 20, wait_s: float = 0.25) -> None:
        """``/flush_cache`` answers 400 while requests are pending: retry a few times, then raise."""
        for _ in range(retries):
            try:
                self._post_all("/flush_cache")
                return
            except RolloutServerError as exc:
                last = exc
                time.sleep(wait_s)
        raise RolloutServerError(f"flush_cache kept failing: {last}")

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._post_all("/release_memory_occupation", memory_occupation_request(tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._post_all("/resume_memory_occupation", memory_occupation_request(tags))

    def verify_prompt_logprobs(self, prompt_ids: list[int], expected, *, atol: float) -> float:
        """Check every live server against the trainer's log-probs of a fixed prompt (see weight_sync)."""
        return verify_prompt_logprobs(self.live_urls(), prompt_ids, expected, atol=atol, api_key=self.api_key)
