"""A raw socket HTTP server for the tests of a server that misbehaves mid-answer (a kill while it
sends, an idle keep-alive close as a request goes out), which no HTTP framework will do on purpose."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def raw_server(reply: Callable[[int], bytes]) -> tuple[str, list[int], threading.Event]:
    """Serve each connection once: read the request, send ``reply(n)`` (n = 1, 2, ...: the request's
    number; b"" sends nothing) and close. Returns (url, [requests seen], stop)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    seen, stop = [0], threading.Event()

    def serve():
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    conn.recv(65536)
                    seen[0] += 1
                    conn.sendall(reply(seen[0]))

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", seen, stop
