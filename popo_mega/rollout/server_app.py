"""The embedded rollout server's HTTP side: a FastAPI app on uvicorn, as SGLang's own ``http_server``.

Why not the stdlib ``http.server`` it replaced (issue 15): a thread per connection could not tell
that a client had left, so an abandoned ``max_new_tokens: 1e9`` request kept the model busy; a
negative Content-Length held a handler until the client closed; bodies had no size limit. Here:
- ``/generate`` waits for its sequences on the event loop next to a watch on the connection: when
  the client disconnects (``http.disconnect``) its sequences are cancelled and leave the batch
  within one decode step (``RolloutServer.cancel``); nothing holds a thread meanwhile.
- :class:`Guard`, a plain ASGI middleware (a ``BaseHTTPMiddleware`` would hide the disconnect, as
  SGLang's ``_ApiKeyASGIMiddleware`` notes): the API key in constant time (``hmac.compare_digest``;
  ``/health*`` and ``/ready`` need none, as ``sglang.srt.utils.auth.decide_request_auth``), and a
  declared Content-Length above ``--max-body-bytes`` is 413 before the body is read (a streamed
  body is counted as it arrives). h11 itself answers a malformed or negative Content-Length 400.
- every error is JSON ``{"success": false, "message": m, "error": {"message": m}}``: 400 for a bad
  request (the message names the field), 413, 401, 404, and 500 for a server fault.
- responses are rendered with ``allow_nan=False``: the server makes log-probs JSON-safe itself
  (``server_schema.json_number``), so a stray NaN is a loud 500, never a body that is not JSON.
Blocking routes (weight loads, group joins, broadcasts) are plain ``def`` routes: FastAPI runs them
in its thread pool, so they never stall the loop that serves ``/generate`` and ``/health``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from popo_mega.rollout.server_schema import RequestError

OPEN_PREFIXES = ("/health", "/ready")  # no key needed (SGLang: k8s probes)
METHODS = ["GET", "POST", "PUT"]        # the stdlib server routed every method alike; clients rely on it


class BodyTooLarge(Exception):
    """A request body above --max-body-bytes (HTTP 413)."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message, "error": {"message": message}}, status_code=status)


class Guard:
    """ASGI middleware: API key (constant time) and the declared body size, before any route runs."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and not scope["path"].startswith(OPEN_PREFIXES):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token, self.key)):
                return await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():  # h11 rejects these first; kept for other protocol back ends
                return await _error(400, f"invalid Content-Length {length[:40]!r}")(scope, receive, send)
            if int(length) > self.max_body_bytes:
                return await _error(413, f"request body of {int(length)} bytes exceeds this server's limit of "
                                         f"{self.max_body_bytes} (--max-body-bytes)")(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_json(request: Request, max_bytes: int) -> dict:
    """The request's JSON object ({} for an empty body); 400 when it is not one, 413 above ``max_bytes``."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(f"request body exceeds this server's limit of {max_bytes} bytes (--max-body-bytes)")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise RequestError(f"body: not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError(f"body: must be a JSON object, got {type(body).__name__}")
    return body


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(server) -> FastAPI:
    """The routes of ``server`` (a ``RolloutServer``)."""
    limit = server.args.max_body_bytes
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _bad_request(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc):
        return _error(413, str(exc))

    @app.exception_handler(404)
    async def _no_route(request, exc):
        return _error(404, f"no route {request.method} {request.url.path}")

    @app.exception_handler(Exception)
    async def _server_error(request, exc):  # a server fault is answered, never crashes the server
        return _error(500, f"{type(exc).__name__}: {exc}")

    def route(*paths):
        def register(fn):
            for path in paths:
                app.add_api_route(path, fn, methods=METHODS)
            return fn
        return register

    @route("/health", "/health_generate")
    async def health():
        why = server.health()
        return PlainTextResponse("" if why is None else why, status_code=200 if why is None else 503)

    @route("/ready")
    async def ready():  # SGLang's is_ready: also 503 while generation is paused
        why = server.ready()
        return PlainTextResponse("" if why is None else why, status_code=200 if why is None else 503)

    @route("/model_info", "/get_model_info")
    async def model_info():
        return server.model_info()

    @route("/server_info", "/get_server_info")
    async def server_info():
        return server.server_info()

    @route("/generate")
    async def generate(request: Request):
        plan = server.plan(await read_json(request, limit))
        loop, done, left, t0 = asyncio.get_running_loop(), asyncio.Event(), [plan.sequences], time.time()

        def one_done():  # on the loop, once per sequence
            left[0] -= 1
            if not left[0]:
                done.set()

        jobs = server.submit(plan, notify=lambda: loop.call_soon_threadsafe(one_done))
        finished, gone = asyncio.ensure_future(done.wait()), asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not finished.done():  # the client left (or this task was cancelled): free the batch rows
                server.cancel(jobs)
                finished.cancel()
            gone.cancel()
        if not done.is_set():
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        return JSONResponse(server.response(plan, jobs, t0))  # no jsonable_encoder walk over every token

    @route("/flush_cache")
    async def flush_cache():
        if server.pending():
            return PlainTextResponse("Flush cache failed: requests are pending.\n", status_code=400)
        return PlainTextResponse("Cache flushed.\n")

    @route("/continue_generation")
    async def continue_generation():
        return server.continue_generation()

    def blocking(path, method):
        """A route whose work may block (model lock, weight loads, broadcasts): run in the thread pool."""
        async def handler(request: Request):
            body = await read_json(request, limit)
            return await run_in_threadpool(method, body)
        app.add_api_route(path, handler, methods=METHODS)

    blocking("/update_weights_from_disk", server.update_from_disk)
    blocking("/init_weights_update_group", server.init_group)
    blocking("/begin_weight_update", lambda body: server.begin_update())
    blocking("/end_weight_update", lambda body: server.end_update())
    blocking("/update_weights_from_distributed", server.update_from_distributed)
    blocking("/update_weights_from_tensor", server.update_from_tensor)
    blocking("/get_weights_by_name", server.get_weights_by_name)
    blocking("/pause_generation", server.pause)  # answers once the scheduler has stopped (server.pause)
    blocking("/update_weight_version", server.update_weight_version)
    blocking("/release_memory_occupation", server.release_memory)
    blocking("/resume_memory_occupation", server.resume_memory)

    @route("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        out = await run_in_threadpool(server.destroy_group, await read_json(request, limit))
        return JSONResponse(out, status_code=200 if out["success"] else 400)

    return Guard(app, api_key=server.args.api_key, max_body_bytes=limit)


def _exit_with_parent(parent_pid: int, httpd, interval_s: float = 0.5) -> None:
    """Stop serving once ``parent_pid`` is no longer our parent (it exited or was killed: the kernel
    re-parents us at once, even while the dead parent is an unreaped zombie)."""
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    print(f"popo-rollout-server: parent process {parent_pid} is gone; shutting down", flush=True)
    httpd.should_exit = True


def run(server, ready: threading.Event | None = None) -> None:
    """Serve ``server`` on its --host/--port until interrupted (SIGINT/SIGTERM) or the parent dies.

    h11 (pure Python, always installed with uvicorn) parses HTTP; keep-alive connections stay open
    while idle as the stdlib server kept them (the client's pooled connections must not be closed
    under it between rollout steps)."""
    import uvicorn

    args = server.args
    config = uvicorn.Config(build_app(server), host=args.host, port=args.port, http="h11", loop="asyncio",
                            lifespan="off", log_level="warning", access_log=False, backlog=1024,
                            timeout_keep_alive=3600, timeout_graceful_shutdown=2)
    httpd = uvicorn.Server(config)
    if args.parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(args.parent_pid, httpd), name="parent-watch",
                         daemon=True).start()

    def announce():
        while not httpd.started and not httpd.should_exit:
            time.sleep(0.02)
        if httpd.started:
            print(f"popo-rollout-server: serving {args.model_path} on http://{args.host}:{args.port} "
                  f"({server.device}, weight_version={server.weight_version})", flush=True)
            if ready is not None:
                ready.set()

    threading.Thread(target=announce, name="announce", daemon=True).start()
    try:
        httpd.run()
    finally:
        server.stopping.set()
