"""One call per rollout server, all at once, bounded: the single fan-out used to talk to a server pool.

Two ways of waiting share it:

* ``ServerCalls(urls, call).wait(timeout_s, what)``: every answer or a deadline, then one error
  naming every server that failed or did not answer (weight-sync windows, version updates,
  ``/server_info`` reads, the HTTP engine's control endpoints through ``post_all``);
* polling ``errors()`` / ``pending()`` / ``finished`` while something else runs, as the weight sync
  does next to a broadcast that a server may never join (``weight_sync.await_collective``).

Each call runs in its own daemon thread, so a server that never answers cannot hold the caller past
its deadline (its thread is left behind; requests' own timeout ends it later).
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Callable

import requests
import urllib3


class ServerCalls:
    """``call(url)`` for every url, each in its own daemon thread, started at construction.

    ``errors()``: url -> message of the calls that raised so far; ``pending()``: the urls whose call
    has not returned; ``finished`` is set when every call returned or one raised.
    """

    def __init__(self, urls: list[str], call: Callable[[str], object]):
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}
        self._results: dict[str, object] = {}
        self.urls = list(urls)
        self.finished = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(u, call), daemon=True) for u in self.urls]
        for t in self._threads:
            t.start()
        if not self.urls:
            self.finished.set()

    def _run(self, url: str, call) -> None:
        try:
            result = call(url)
        except Exception as exc:  # noqa: BLE001 - reported by errors() / wait()
            with self._lock:
                self._errors[url] = str(exc)
                self.finished.set()
            return
        with self._lock:
            self._results[url] = result
            if len(self._results) + len(self._errors) == len(self.urls):
                self.finished.set()

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def pending(self) -> list[str]:
        with self._lock:
            return [u for u in self.urls if u not in self._results and u not in self._errors]

    def wait(self, timeout_s: float, what: str, error: type[Exception] = RuntimeError) -> list:
        """Every call's result in url order, after all returned; else ``error`` naming each server
        that failed or had not answered within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            errors = dict(self._errors)
            for u in self.urls:
                if u not in self._results and u not in errors:
                    errors[u] = f"no answer within {timeout_s:g} s"
            if errors:
                raise error(f"{what} failed: " + "; ".join(f"{u}: {e}" for u, e in errors.items()))
            return [self._results[u] for u in self.urls]


class SessionPool:
    """One ``requests.Session`` per server URL, kept across calls, so that the control posts of every
    sync (pause, flush, continue, ...) reuse their connections instead of opening one per call: before,
    each call's fresh thread got a fresh thread-local session. A session is lent to one call at a
    time; a call that finds its URL's session lent (a call left running past its deadline) gets a
    new one, and the pool keeps one per URL."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict[str, requests.Session] = {}

    @contextlib.contextmanager
    def session(self, url: str):
        with self._lock:
            s = self._idle.pop(url, None)
        s = s or requests.Session()
        try:
            yield s
        finally:
            with self._lock:
                spare = self._idle.setdefault(url, s) is not s
            if spare:
                s.close()

    def forget(self, url: str) -> None:
        """Close ``url``'s session (its server was relaunched: its kept connection is to the dead one)."""
        with self._lock:
            s = self._idle.pop(url, None)
        if s is not None:
            s.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for s in idle.values():
            s.close()


def closed_without_answer(exc: Exception) -> bool:
    """The server closed the connection before answering (``RemoteDisconnected``, a reset, a broken
    pipe), as opposed to refusing it or not answering in time. What a kept connection meets when the
    server's idle timeout closes it just as a request goes out (SGLang 0.5.23's uvicorn closes idle
    keep-alive connections after 5 s: ``SGLANG_TIMEOUT_KEEP_ALIVE``, srt/environ.py:337, passed as
    ``timeout_keep_alive`` in srt/entrypoints/http_server.py:2956; urllib3 only notices a close that
    arrived before the send): the request was not served, and a control post may be sent again."""
    inner = exc.args[0] if isinstance(exc, requests.ConnectionError) and exc.args else None
    cause = inner.args[1] if isinstance(inner, urllib3.exceptions.ProtocolError) and len(inner.args) > 1 else None
    return isinstance(cause, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))


def post_all(urls: list[str], path: str, body: dict | None, *, sessions: SessionPool, headers: dict,
             timeout_s: float | tuple[float, float], ok: tuple[int, ...] = (200,),
             error: type[Exception] = RuntimeError) -> list[requests.Response]:
    """POST ``body`` to ``path`` on every server at once; the responses in url order, or ``error``
    naming every server that answered another status, failed to connect or did not answer within
    ``timeout_s`` (requests' timeout: seconds, or (connect, read)). Each server's session comes from
    ``sessions`` (one per URL, reused by the next call); a post whose connection the server closed
    before answering is sent once more (``closed_without_answer``). The control posts (pause,
    continue, flush, memory release/resume) are safe to repeat."""
    def call(url):
        for attempt in (1, 2):
            try:
                with sessions.session(url) as session:
                    r = session.post(f"{url}{path}", json=body or {}, headers=headers, timeout=timeout_s)
                break
            except requests.RequestException as exc:
                if attempt == 1 and closed_without_answer(exc):
                    continue  # once more, on a new connection (the pool dropped the closed one)
                raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
        if r.status_code not in ok:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        return r

    bound = sum(timeout_s) if isinstance(timeout_s, tuple) else timeout_s
    return ServerCalls(urls, call).wait(bound + 5, path, error)
