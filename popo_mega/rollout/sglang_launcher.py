"""Start rollout servers as child processes (SGLang, or the embedded server), or attach to URLs.

    servers = launch_servers("auto", model_path, num_servers=2, tp_size=1)   # waits for /health
    engine  = HttpEngine([s.url for s in servers])
    ...
    stop_servers(servers)

``"auto"`` picks SGLang when ``sglang.launch_server`` is importable and the embedded server
(``python -m popo_mega.rollout.server``) otherwise. Several SGLang servers can be put behind
``sglang-router`` (``launch_router``); the client then sees one URL. Attaching to running servers
is simply passing their URLs to ``HttpEngine`` (use ``wait_for_health`` first).

A training run calls :func:`start_run_servers` on every rank: each node starts the servers that
``popo_mega.rollout.placement`` puts on it, on their own GPUs (``disaggregated``) or on the trainer's
with ``--enable-memory-saver`` (``colocated``, see :func:`released_during_step`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import requests

from popo_mega.runtime import free_port, free_ports


def sglang_available() -> bool:
    """True when ``python -m sglang.launch_server`` can run here (a full sglang install).

    Decided without importing sglang (its ``__init__`` patches transformers in-process): the
    package must ship ``launch_server.py`` and its server dependencies must be installed — the
    schema-only ``pip install --no-deps sglang`` used by the tests does not count.
    """
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return False
    if not os.path.isfile(os.path.join(list(spec.submodule_search_locations)[0], "launch_server.py")):
        return False
    return all(importlib.util.find_spec(dep) is not None for dep in ("fastapi", "uvicorn", "zmq", "orjson"))


def sglang_server_command(model_path: str, *, host: str = "127.0.0.1", port: int = 30000, tp_size: int = 1,
                          mem_fraction_static: float | None = None, base_gpu_id: int = 0,
                          api_key: str | None = None, random_seed: int | None = None,
                          memory_saver: bool = False, extra_args: tuple[str, ...] = ()) -> list[str]:
    """argv of ``python -m sglang.launch_server`` (flag names as SGLang 0.5.23 spells them).

    memory_saver: ``--enable-memory-saver`` (``/release_memory_occupation`` frees the weights and KV
    cache for a colocated trainer's step) with ``--enable-weights-cpu-backup`` (the released weights
    come back on resume, so the server can answer before the next weight sync).
    """
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host,
           "--port", str(port), "--tp-size", str(tp_size), "--base-gpu-id", str(base_gpu_id)]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if api_key:  # visible in ps: launch_servers passes keys by --config file or environment instead
        cmd += ["--api-key", api_key]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    if memory_saver:
        cmd += ["--enable-memory-saver", "--enable-weights-cpu-backup"]
    return cmd + list(extra_args)


def embedded_server_command(model_path: str, *, host: str = "127.0.0.1", port: int = 30000,
                            device: str = "auto", dtype: str = "auto", api_key: str | None = None,
                            random_seed: int | None = None, extra_args: tuple[str, ...] = (),
                            exit_with_parent: bool = True) -> list[str]:
    """argv of the embedded server (same flag names as SGLang where they overlap). With
    ``exit_with_parent`` the server stops when this process dies, kill -9 included. It runs with
    ``--strict-sglang``: it rejects what SGLang 0.5.23 rejects (see popo_mega/rollout/server.py)."""
    cmd = [sys.executable, "-m", "popo_mega.rollout.server", "--model-path", model_path, "--host", host,
           "--port", str(port), "--device", device, "--dtype", dtype]
    if exit_with_parent:
        cmd += ["--parent-pid", str(os.getpid())]
    if api_key:  # visible in ps: launch_servers passes keys by --config file or environment instead
        cmd += ["--api-key", api_key]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    return cmd + ["--strict-sglang", *extra_args]


API_KEY_ENV = "POPO_ROLLOUT_API_KEY"  # read by the embedded server (popo_mega.rollout.server)


def api_key_config_file(api_key: str) -> str:
    """A ``--config`` YAML file (mode 0600) holding ``api-key``, as ``sglang.launch_server`` reads it
    (``ConfigArgumentMerger``; SGLang 0.5.23 reads no key from the environment). ``launch_servers``
    gives keys this way (SGLang) or by ``POPO_ROLLOUT_API_KEY`` (the embedded server), never on the
    command line, where every user of the node can read it (``ps``)."""
    import json
    import tempfile

    fd, path = tempfile.mkstemp(prefix="popo_rollout_key_", suffix=".yaml")  # created 0600
    with os.fdopen(fd, "w") as f:
        f.write(f"api-key: {json.dumps(api_key)}\n")  # a JSON string is a YAML string
    return path


def router_command(worker_urls: list[str], *, host: str = "127.0.0.1", port: int = 30000) -> list[str]:
    """argv of ``sglang-router`` in front of ``worker_urls``."""
    if not worker_urls:
        raise ValueError("router_command: no worker URLs")
    return [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--host", host, "--port", str(port)]


@dataclass
class ServerProcess:
    """A launched server: its URL, its process, where its output goes and the command that started it
    (to relaunch it in place when it dies)."""

    url: str
    process: subprocess.Popen
    log_path: str | None = None
    cmd: list[str] | None = None
    env: dict | None = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate, then kill after ``timeout_s``; never raises for a process already gone."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]


def wait_for_health(url: str, *, timeout_s: float = 300.0, process: subprocess.Popen | None = None,
                    api_key: str | None = None, log_path: str | None = None) -> None:
    """Poll ``GET url/health`` until 200; raise TimeoutError, or RuntimeError if ``process`` exits."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = ServerProcess(url, process, log_path).log_tail()
            raise RuntimeError(f"server for {url} exited with code {process.returncode} before /health answered:\n{tail}")
        try:
            if requests.get(f"{url}/health", headers=headers, timeout=2.0).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f}s")


def start(cmd: list[str], url: str, *, log_path: str | None = None, env: dict | None = None) -> ServerProcess:
    """Start ``cmd`` (its output to ``log_path``) without waiting for it."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        if log_path:
            out.close()
    return ServerProcess(url, proc, log_path, cmd=list(cmd), env=env)


def launch(cmd: list[str], url: str, *, log_path: str | None = None, health_timeout_s: float = 300.0,
           api_key: str | None = None, env: dict | None = None) -> ServerProcess:
    """Start ``cmd`` and wait for ``url``'s /health; the process is killed if it does not come up."""
    server = start(cmd, url, log_path=log_path, env=env)
    proc = server.process
    try:
        wait_for_health(url, timeout_s=health_timeout_s, process=proc, api_key=api_key, log_path=log_path)
    except BaseException:
        server.stop(timeout_s=5.0)
        raise
    return server


def launch_servers(kind: str, model_path: str, *, num_servers: int = 1, host: str = "127.0.0.1",
                   ports: list[int] | None = None, tp_size: int = 1, mem_fraction_static: float | None = None,
                   device: str = "auto", dtype: str = "auto", api_key: str | None = None,
                   random_seed: int | None = None, log_dir: str | None = None,
                   health_timeout_s: float = 300.0, extra_args: tuple[str, ...] = (),
                   slots: list | None = None, node_gpus: list[str] | None = None,
                   advertise_host: str | None = None) -> list[ServerProcess]:
    """Launch ``num_servers`` servers of ``kind`` ("sglang", "embedded" or "auto"), all healthy on return.

    slots: the placement's :class:`~popo_mega.rollout.placement.ServerSlot` of each server (then
    ``num_servers``, ``tp_size`` and ``mem_fraction_static`` come from them), with ``node_gpus`` the
    node's GPUs as CUDA names them (slot GPU ids index it). Each server sees the whole node
    (CUDA_VISIBLE_DEVICES) and starts at ``--base-gpu-id`` (colocated servers index GPUs as the trainer
    does); an embedded server sees only its GPU. Without slots (no GPUs to place), SGLang server i uses
    GPUs [i*tp_size, (i+1)*tp_size). advertise_host: the host in the returned URLs (a server bound to
    0.0.0.0 is reached by this node's name). If one fails to come up, the ones already started are
    stopped before the error propagates.
    """
    if kind == "auto":
        kind = "sglang" if sglang_available() else "embedded"
    if kind not in ("sglang", "embedded"):
        raise ValueError(f"launch_servers: kind must be 'sglang', 'embedded' or 'auto', got {kind!r}")
    if kind == "sglang" and not sglang_available():
        raise RuntimeError("sglang is not installed: pip install 'popo_mega[sglang]' (GPU machines), "
                           "or use kind='embedded'")
    if slots is not None:
        num_servers = len(slots)
        if node_gpus is None:
            raise ValueError("launch_servers: slots need node_gpus (the node's GPUs as CUDA names them)")
    ports = ports or free_ports(num_servers, host)  # distinct: two servers never race for one port
    if len(ports) != num_servers:
        raise ValueError(f"launch_servers: {len(ports)} ports for {num_servers} servers")
    started: list[ServerProcess] = []
    try:  # start all, then wait for all: the servers load their models in parallel
        for i, port in enumerate(ports):
            slot = slots[i] if slots is not None else None
            env, index = None, (slot.index if slot is not None else i)
            if kind == "sglang":
                if slot is None:
                    placed = dict(tp_size=tp_size, mem_fraction_static=mem_fraction_static, base_gpu_id=i * tp_size)
                else:
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(node_gpus)}
                    placed = dict(tp_size=len(slot.gpus), mem_fraction_static=slot.mem_fraction,
                                  base_gpu_id=slot.base_gpu_id, memory_saver=slot.memory_saver)
                key_args = ("--config", api_key_config_file(api_key)) if api_key else ()
                cmd = sglang_server_command(model_path, host=host, port=port, random_seed=random_seed,
                                            extra_args=(*key_args, *extra_args), **placed)
            else:
                if slot is not None:
                    env = {**os.environ, "CUDA_VISIBLE_DEVICES": node_gpus[slot.gpus[0]]}
                if api_key:
                    env = {**(env or os.environ), API_KEY_ENV: api_key}
                # a colocated GPU slot: SGLang's flags (the weights wait in host RAM while released)
                saver = ("--enable-memory-saver", "--enable-weights-cpu-backup") if slot is not None and slot.memory_saver else ()
                cmd = embedded_server_command(model_path, host=host, port=port,
                                              device="cuda" if slot is not None else device, dtype=dtype,
                                              random_seed=random_seed, extra_args=(*extra_args, *saver))
            log = os.path.join(log_dir, f"{kind}_server_{index}.log") if log_dir else None
            started.append(start(cmd, f"http://{advertise_host or host}:{port}", log_path=log, env=env))
        for s in started:
            wait_for_health(s.url, timeout_s=health_timeout_s, process=s.process, api_key=api_key, log_path=s.log_path)
    except BaseException:
        stop_servers(started)
        raise
    return started


@dataclass
class RunServers:
    """The servers of a training run, as :func:`start_run_servers` leaves them on one rank."""

    local: list[ServerProcess]      # started by this process (stopped by it; relaunched by rank 0's engine)
    urls: list[str]                 # rank 0: every server's URL in server order; other ranks: []
    master_address: str            # where the servers reach rank 0 for the weight-update group
    nodes: list = field(default_factory=list)  # rank 0: each server's node (None: an attached URL not on
                                               # this host), for placement.sync_methods


def node_gpu_names(gpus_per_node: int | None = None) -> list[str]:
    """This node's GPUs as CUDA names them: POPO_NODE_GPUS (launch/train.sh keeps the node's list there
    before it narrows torchrun's CUDA_VISIBLE_DEVICES to the trainer's GPUs), else this process's
    CUDA_VISIBLE_DEVICES, else 0..device_count-1."""
    for var in ("POPO_NODE_GPUS", "CUDA_VISIBLE_DEVICES"):
        names = [v for v in os.environ.get(var, "").split(",") if v.strip()]
        if names:
            return names
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def start_run_servers(cfg, rt, log_dir: str | None = None) -> RunServers:
    """Start the run's rollout servers where ``rollout.*`` and ``placement.*`` put them. Collective.

    On GPUs, local rank 0 of each node starts the servers :func:`~popo_mega.rollout.placement.place`
    puts on its node, on their GPUs, and rank 0 gathers every URL; the node count and rank are
    torchrun's (WORLD_SIZE / LOCAL_WORLD_SIZE, GROUP_RANK). A node whose torchrun runs another number
    of processes than the placement's trainer GPUs there is an error (two processes on one GPU is
    what NCCL rejects as "Duplicate GPU detected"). On CPU, rank 0 starts every server. With
    ``rollout.urls`` nothing is started. Servers on other nodes are stopped by their node's process,
    and cannot be relaunched by rank 0's engine.
    """
    import socket

    import torch.distributed as dist

    from popo_mega.config import ConfigError
    from popo_mega.rollout.placement import place

    r = cfg.rollout
    if r.urls:
        from urllib.parse import urlparse

        from popo_mega.rollout.placement import _LOOPBACK
        return RunServers([], list(r.urls), "127.0.0.1",
                          [0 if urlparse(u).hostname in _LOOPBACK else None for u in r.urls])
    extra = ("--enable-deterministic-inference",) if r.deterministic else ()  # both backends: strict embedded too
    # the servers load model.hf_path: the weights of step 0, named as the loop names the versions it
    # syncs (SGLang's --weight-version, "default" otherwise), so that a rollout's version says its step
    extra = (*extra, "--weight-version", "step0")
    common = dict(host=r.host, api_key=r.api_key, random_seed=cfg.train.seed, log_dir=log_dir, extra_args=extra)
    if rt.device.type != "cuda":
        if cfg.placement.mode == "colocated" and r.backend != "sglang":
            # the CPU's colocated mode: the embedded server frees its weights while the policy steps
            # (released_during_step) and gets them back by the weight sync that follows (no
            # --enable-weights-cpu-backup: on the CPU the backup would be the same memory)
            common["extra_args"] = (*extra, "--enable-memory-saver")
        local = launch_servers(r.backend, cfg.model.hf_path, num_servers=r.num_servers, tp_size=r.server_tp,
                               mem_fraction_static=r.mem_fraction, **common) if rt.rank == 0 else []
        return RunServers(local, [s.url for s in local], "127.0.0.1", [0] * len(local))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    nodes, node_rank = rt.world_size // local_world, int(os.environ.get("GROUP_RANK", "0"))
    if cfg.placement.nodes is not None and cfg.placement.nodes != nodes:
        raise ConfigError(f"{cfg.source}: key 'placement.nodes' = {cfg.placement.nodes}, but torchrun runs "
                          f"{nodes} node(s) of {local_world} process(es)")
    gpus = node_gpu_names()
    placement = place(cfg, nodes=nodes, gpus_per_node=cfg.placement.gpus_per_node or len(gpus))
    if len(gpus) < placement.gpus_per_node:
        raise ConfigError(f"{cfg.source}: key 'placement.gpus_per_node' = {placement.gpus_per_node}, but node "
                          f"{node_rank} shows {len(gpus)} GPU(s) ({','.join(gpus)})")
    node = placement.nodes[node_rank]
    if len(node.trainer_gpus) != local_world:
        raise ConfigError(f"{cfg.source}: torchrun runs {local_world} process(es) on node {node_rank}, but the "
                          f"placement ({placement.mode}) gives the trainer {len(node.trainer_gpus)} GPU(s) there "
                          "(placement.trainer_gpus_per_node): start the run with launch/train.sh")
    advertise = socket.gethostname() if r.host in ("0.0.0.0", "::") else r.host
    local, error = [], None
    if rt.local_rank == 0 and node.servers:
        try:
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
            local = launch_servers(r.backend, cfg.model.hf_path, slots=list(node.servers), node_gpus=gpus,
                                   advertise_host=advertise, **common)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below, so none waits forever
            error = f"node {node_rank}: {type(exc).__name__}: {exc}"
    found = [(error, [(slot.index, s.url) for slot, s in zip(node.servers, local)])]
    if rt.world_size > 1:
        box = [None] * rt.world_size
        dist.all_gather_object(box, found[0])
        found = box
    errors = [e for e, _ in found if e]
    if errors:
        stop_servers(local)
        raise RuntimeError("rollout servers failed to start: " + "; ".join(errors))
    urls = [u for _, u in sorted(iu for _, lst in found for iu in lst)] if rt.rank == 0 else []
    master = os.environ.get("MASTER_ADDR", "127.0.0.1") if nodes > 1 else "127.0.0.1"
    node_of = {s.index: n.node for n in placement.nodes for s in n.servers}
    return RunServers(local, urls, master, [node_of[i] for i in sorted(node_of)] if rt.rank == 0 else [])


@contextlib.contextmanager
def released_during_step(engine, colocated: bool, world_size: int, timings: dict | None = None,
                         rank: int = 0):
    """Colocated servers give their GPU memory to the policy step, and take it back after. Collective.

    Rank 0 (the engine's owner: ``engine`` is None on the other ranks) posts
    ``/release_memory_occupation`` to every server before any rank starts the step; after it every
    rank returns its cached blocks to CUDA (``torch.cuda.empty_cache``: the trainer's allocator would
    otherwise keep the activations' memory), and once all have (a barrier) rank 0 posts
    ``/resume_memory_occupation``. Both posts go through ``on_rank0``: a server that refuses or dies
    there makes every rank raise, instead of rank 0 alone while the others wait in the next
    collective. A no-op when the servers have GPUs of their own. ``timings`` (rank 0): filled with
    ``release_s`` and ``resume_s``, the seconds the two posts took (the cost of colocation, with the
    weight sync that gives a memory-saver server its weights back).
    """
    if not colocated:
        yield
        return
    import time

    import torch
    import torch.distributed as dist

    from popo_mega.train.rank0 import on_rank0

    timings = {} if timings is None else timings

    def post(what: str, key: str) -> None:
        if engine is not None:
            t0 = time.perf_counter()
            getattr(engine, what)()
            timings[key] = time.perf_counter() - t0

    on_rank0(lambda: post("release_memory_occupation", "release_s"), rank, world_size)
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if world_size > 1:
        dist.barrier()
    on_rank0(lambda: post("resume_memory_occupation", "resume_s"), rank, world_size)


def launch_router(worker_urls: list[str], *, host: str = "127.0.0.1", port: int | None = None,
                  log_dir: str | None = None, health_timeout_s: float = 120.0) -> ServerProcess:
    """Put ``sglang-router`` in front of ``worker_urls``; returns it once its /health answers."""
    try:
        found = importlib.util.find_spec("sglang_router") is not None
    except Exception:  # noqa: BLE001
        found = False
    if not found:
        raise RuntimeError("sglang-router is not installed: pip install sglang-router (or pass the server URLs "
                           "to HttpEngine directly: it balances and fails over by itself)")
    port = port or free_port(host)
    log = os.path.join(log_dir, "sglang_router.log") if log_dir else None
    return launch(router_command(worker_urls, host=host, port=port), f"http://{host}:{port}", log_path=log,
                  health_timeout_s=health_timeout_s)


def stop_servers(servers: list[ServerProcess]) -> None:
    """Stop every server in ``servers`` (each one even if another fails to stop)."""
    for s in servers:
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - keep stopping the rest
            pass
