"""Start rollout servers as child processes (SGLang, or the embedded server), or attach to URLs.

    servers = launch_servers("auto", model_path, num_servers=2, tp_size=1)   # waits for /health
    engine  = HttpEngine([s.url for s in servers])
    ...
    stop_servers(servers)

``"auto"`` picks SGLang when ``sglang.launch_server`` is importable and the embedded server
(``python -m popo_mega.rollout.server``) otherwise. Several SGLang servers can be put behind
``sglang-router`` (``launch_router``); the client then sees one URL. Attaching to running servers
is simply passing their URLs to ``HttpEngine`` (use ``wait_for_health`` first).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import requests

from popo_mega.runtime import free_port


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
                          extra_args: tuple[str, ...] = ()) -> list[str]:
    """argv of ``python -m sglang.launch_server`` (flag names as SGLang spells them)."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--host", host,
           "--port", str(port), "--tp-size", str(tp_size), "--base-gpu-id", str(base_gpu_id)]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if api_key:
        cmd += ["--api-key", api_key]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    return cmd + list(extra_args)


def embedded_server_command(model_path: str, *, host: str = "127.0.0.1", port: int = 30000,
                            device: str = "auto", dtype: str = "auto", api_key: str | None = None,
                            random_seed: int | None = None, extra_args: tuple[str, ...] = (),
                            exit_with_parent: bool = True) -> list[str]:
    """argv of the embedded server (same flag names as SGLang where they overlap). With
    ``exit_with_parent`` the server stops when this process dies, kill -9 included."""
    cmd = [sys.executable, "-m", "popo_mega.rollout.server", "--model-path", model_path, "--host", host,
           "--port", str(port), "--device", device, "--dtype", dtype]
    if exit_with_parent:
        cmd += ["--parent-pid", str(os.getpid())]
    if api_key:
        cmd += ["--api-key", api_key]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    return cmd + list(extra_args)


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
                   health_timeout_s: float = 300.0, extra_args: tuple[str, ...] = ()) -> list[ServerProcess]:
    """Launch ``num_servers`` servers of ``kind`` ("sglang", "embedded" or "auto"), all healthy on return.

    SGLang server i uses GPUs [i*tp_size, (i+1)*tp_size). If one fails to come up, the ones already
    started are stopped before the error propagates.
    """
    if kind == "auto":
        kind = "sglang" if sglang_available() else "embedded"
    if kind not in ("sglang", "embedded"):
        raise ValueError(f"launch_servers: kind must be 'sglang', 'embedded' or 'auto', got {kind!r}")
    if kind == "sglang" and not sglang_available():
        raise RuntimeError("sglang is not installed: pip install 'popo_mega[sglang]' (GPU machines), "
                           "or use kind='embedded'")
    ports = ports or [free_port(host) for _ in range(num_servers)]
    if len(ports) != num_servers:
        raise ValueError(f"launch_servers: {len(ports)} ports for {num_servers} servers")
    started: list[ServerProcess] = []
    try:  # start all, then wait for all: the servers load their models in parallel
        for i, port in enumerate(ports):
            if kind == "sglang":
                cmd = sglang_server_command(model_path, host=host, port=port, tp_size=tp_size,
                                            mem_fraction_static=mem_fraction_static, base_gpu_id=i * tp_size,
                                            api_key=api_key, random_seed=random_seed, extra_args=extra_args)
            else:
                cmd = embedded_server_command(model_path, host=host, port=port, device=device, dtype=dtype,
                                              api_key=api_key, random_seed=random_seed, extra_args=extra_args)
            log = os.path.join(log_dir, f"{kind}_server_{i}.log") if log_dir else None
            started.append(start(cmd, f"http://{host}:{port}", log_path=log))
        for s in started:
            wait_for_health(s.url, timeout_s=health_timeout_s, process=s.process, api_key=api_key, log_path=s.log_path)
    except BaseException:
        stop_servers(started)
        raise
    return started


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
