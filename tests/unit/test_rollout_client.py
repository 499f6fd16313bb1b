"""HttpEngine's retry / failover / error rules and response parsing, against scripted stdlib servers."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from popo_mega.rollout.engine import SamplingParams
from popo_mega.rollout.http_engine import HttpEngine, RolloutServerError
from popo_mega.rollout.sglang_api import ProtocolError, completions_from_response, generate_request


def _response(ids, version="v0"):
    return {"text": "", "output_ids": ids, "meta_info": {
        "id": "x", "prompt_tokens": 1, "completion_tokens": len(ids), "weight_version": version,
        "finish_reason": {"type": "length", "length": len(ids)},
        "output_token_logprobs": [[-0.5 - i, t, None] for i, t in enumerate(ids)]}}


class Scripted:
    """A loopback server answering /generate by ``mode``: ok | 500 | 400 | slow (sleeps)."""

    def __init__(self, mode):
        self.mode, self.hits = mode, 0
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.hits += 1
                if outer.mode == "slow":
                    time.sleep(2.0)
                if outer.mode in ("500", "400"):
                    status, payload = int(outer.mode), {"error": {"message": "scripted failure"}}
                else:
                    n = body["sampling_params"]["n"]
                    items = [_response([body["input_ids"][0] + j, 7]) for j in range(n)]
                    status, payload = 200, items[0] if n == 1 else items
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # the "slow" mode's client has timed out and gone: writing back fails, as intended

        self.httpd = Server(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(mode):
        made.append(Scripted(mode))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_results_keep_prompt_order_and_n(servers):
    a, b = servers("ok"), servers("ok")
    engine = HttpEngine([a.url, b.url], max_in_flight=4)
    out = engine.generate([[10], [20], [30], [40], [50]], SamplingParams(max_new_tokens=2), n=3)
    assert [[c.output_ids[0] for c in row] for row in out] == [[p, p + 1, p + 2] for p in (10, 20, 30, 40, 50)]
    assert out[0][0].output_logprobs == [-0.5, -1.5] and out[0][0].finish_reason == "length"
    assert a.hits > 0 and b.hits > 0  # both servers were used


def test_server_error_fails_over_or_raises_by_configuration(servers):
    bad, good = servers("500"), servers("ok")
    engine = HttpEngine([bad.url, good.url], failover=True)
    out = engine.generate([[1], [2], [3], [4]], SamplingParams(), n=1)
    assert [r[0].output_ids[0] for r in out] == [1, 2, 3, 4]
    assert bad.url in engine.dead and good.url not in engine.dead
    strict = HttpEngine([bad.url, good.url], failover=False)
    with pytest.raises(RolloutServerError, match=f"{bad.url}/generate failed: HTTP 500.*failover is off"):
        strict.generate([[1], [2], [3], [4]], SamplingParams(), n=1)


def test_bad_request_is_not_retried(servers):
    rejecting, good = servers("400"), servers("ok")
    engine = HttpEngine([rejecting.url, good.url], failover=True, max_in_flight=1)
    with pytest.raises(RolloutServerError, match="rejected the request: HTTP 400"):
        engine.generate([[1], [2]], SamplingParams(), n=1)
    assert not engine.dead


def test_timeouts_end_in_a_clear_error(servers):
    slow = servers("slow")
    engine = HttpEngine([slow.url], request_timeout_s=0.3, failover=True, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError, match="ReadTimeout|no live rollout server"):
        engine.generate([[1]], SamplingParams(), n=1)
    assert time.monotonic() - t0 < 1.9  # did not wait for the 2 s answer


def test_all_servers_down_is_an_error_not_a_hang():
    engine = HttpEngine(["http://127.0.0.1:9", "http://127.0.0.1:10"], connect_timeout_s=1.0)
    with pytest.raises(RolloutServerError, match="no live rollout server|gave up"):
        engine.generate([[1]], SamplingParams(), n=1)


def test_response_parsing_rejects_malformed_bodies():
    good = _response([4, 5])
    assert completions_from_response(good, 1)[0].output_ids == [4, 5]
    with pytest.raises(ProtocolError, match="expected 2 responses"):
        completions_from_response(good, 2)
    no_lp = json.loads(json.dumps(good))
    del no_lp["meta_info"]["output_token_logprobs"]
    with pytest.raises(ProtocolError, match="output_token_logprobs is missing"):
        completions_from_response(no_lp, 1)
    mismatch = json.loads(json.dumps(good))
    mismatch["output_ids"] = [4, 6]
    with pytest.raises(ProtocolError, match="disagree"):
        completions_from_response(mismatch, 1)
    aborted = json.loads(json.dumps(good))
    aborted["meta_info"]["finish_reason"] = {"type": "abort", "message": "oom"}
    with pytest.raises(ProtocolError, match="aborted.*oom"):
        completions_from_response(aborted, 1)
    with pytest.raises(ValueError, match="empty prompt"):
        generate_request([], SamplingParams())
