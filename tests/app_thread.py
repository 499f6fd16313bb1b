"""The embedded server's HTTP app (``rollout/server_app.build_app``) served by uvicorn in a thread of
the test process, so that a test drives a ``RolloutServer`` it holds both over HTTP and directly."""

import contextlib
import threading
import time


@contextlib.contextmanager
def app_in_thread(srv, log_level: str = "warning"):
    """Serve ``srv`` on a free 127.0.0.1 port; yields the port once uvicorn has started, and stops it
    after (the ``RolloutServer`` itself is the caller's to stop)."""
    import uvicorn

    from popo_mega.rollout.server_app import build_app
    from popo_mega.runtime import free_port

    port = free_port()
    httpd = uvicorn.Server(uvicorn.Config(build_app(srv), host="127.0.0.1", port=port, log_level=log_level,
                                          lifespan="off", http="h11"))
    thread = threading.Thread(target=httpd.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if httpd.started:
                break
            time.sleep(0.05)
        yield port
    finally:
        httpd.should_exit = True
        thread.join(10)
