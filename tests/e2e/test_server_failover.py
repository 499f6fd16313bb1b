"""Killing one embedded server mid-batch: the batch completes on the other (failover on), or fails
with an error naming the dead server (failover off). Every wait is bounded; servers always stop."""

import threading
import time

import pytest

from popo_mega.rollout.engine import SamplingParams

PROMPTS = [[1 + (i % 50), 2 + (i % 7)] for i in range(24)]
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=48)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    root = tmp_path_factory.mktemp("failover")
    path = save_tiny_qwen2(str(root / "model"), seed=0)  # no EOS: every response has 48 tokens
    procs = launch_servers("embedded", path, num_servers=3, device="cpu", log_dir=str(root), health_timeout_s=120)
    try:
        yield procs
    finally:
        stop_servers(procs)


def _run_and_kill(engine, victim, kill_after_s=0.4, limit_s=60.0):
    """Run a batch in a thread, SIGKILL ``victim`` while it runs; return (result, error, seconds)."""
    box = {}

    def run():
        try:
            box["result"] = engine.generate(PROMPTS, SAMPLING, n=2)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            box["error"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(kill_after_s)
    assert worker.is_alive(), "the batch finished before the kill: make it longer"
    victim.process.kill()
    worker.join(timeout=limit_s)
    assert not worker.is_alive(), f"generate() still running {limit_s}s after a server was killed"
    return box.get("result"), box.get("error"), time.monotonic() - t0


def test_failover_off_fails_with_the_dead_server_named(servers):
    from popo_mega.rollout.http_engine import HttpEngine, RolloutServerError

    a, b, _ = servers
    engine = HttpEngine([a.url, b.url], failover=False, max_in_flight=2, request_timeout_s=60)
    result, error, _ = _run_and_kill(engine, a)
    assert result is None and isinstance(error, RolloutServerError)
    assert a.url in str(error) and "failover is off" in str(error)


def test_failover_on_completes_the_batch_on_the_other_server(servers):
    from popo_mega.rollout.http_engine import HttpEngine

    _, b, c = servers
    engine = HttpEngine([b.url, c.url], failover=True, max_in_flight=2, request_timeout_s=60)
    result, error, _ = _run_and_kill(engine, b)
    assert error is None, error
    assert len(result) == len(PROMPTS) and all(len(row) == 2 for row in result)
    assert all(len(comp.output_ids) == 48 and len(comp.output_logprobs) == 48 for row in result for comp in row)
    assert b.url in engine.dead and c.url not in engine.dead


def test_a_dead_launched_server_is_relaunched_in_place(tmp_path):
    """kill -9 the only server: generate fails with no live server; replace_dead_servers starts it
    again on the same URL (from its own command), and the engine samples from it again."""
    from popo_mega.rollout.http_engine import HttpEngine, RolloutServerError
    from popo_mega.rollout.sglang_launcher import launch_servers
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    path = save_tiny_qwen2(str(tmp_path / "model"), seed=1)
    procs = launch_servers("embedded", path, num_servers=1, device="cpu", log_dir=str(tmp_path), health_timeout_s=120)
    engine = HttpEngine([procs[0].url], servers=procs, failover=True, max_retries=1, request_timeout_s=60)
    try:
        old_pid = procs[0].process.pid
        procs[0].process.kill()
        procs[0].process.wait(timeout=10)
        with pytest.raises(RolloutServerError, match="no live rollout server"):
            engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4), n=1)
        assert engine.replace_dead_servers(health_timeout_s=120) == [procs[0].url]
        assert engine._servers[0].process.pid != old_pid and not engine.dead
        out = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4), n=2)
        assert [len(c.output_ids) for row in out for c in row] == [4, 4, 4, 4]
        assert engine.replace_dead_servers() == []  # nothing dead: nothing relaunched
    finally:
        engine.close()


def test_an_embedded_server_exits_with_its_launcher(tmp_path):
    """The trainer that launched a server is killed with -9: the server notices its parent is gone
    and stops (no orphaned servers holding ports and memory)."""
    import subprocess
    import sys

    import requests

    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    path = save_tiny_qwen2(str(tmp_path / "model"), seed=2)
    script = ("import time; from popo_mega.rollout.sglang_launcher import launch_servers; "
              f"s = launch_servers('embedded', {path!r}, device='cpu', health_timeout_s=120)[0]; "
              "print(s.url, flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        url = launcher.stdout.readline().strip()
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(f"{url}/health", timeout=1)
            except requests.ConnectionError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"{url} still answers 20 s after its launcher was killed")
    finally:
        launcher.kill()


def test_a_server_that_dies_mid_answer_is_a_server_failure():
    """The body is cut short (requests raises ChunkedEncodingError, neither a ConnectionError nor a
    Timeout): the engine reports a RolloutServerError naming the server, which is what the run's
    ResilientEngine relaunches on; a raw requests error would end the run (CI, stop 18)."""
    from popo_mega.rollout.http_engine import HttpEngine, RolloutServerError

    from tests.raw_http import raw_server

    # a 200 header announcing 1,793 bytes, 10 of them, and the socket closes: a kill while it answers
    url, _, stop = raw_server(lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 1793\r\n\r\n{\"text\": \"")
    engine = HttpEngine([url], failover=False, max_in_flight=1, request_timeout_s=10)
    try:
        with pytest.raises(RolloutServerError, match="failover is off") as err:
            engine.generate([[1, 2]], SamplingParams(temperature=0.0, max_new_tokens=4))
    finally:
        stop.set()
    assert url in str(err.value) and "ChunkedEncodingError" in str(err.value)
