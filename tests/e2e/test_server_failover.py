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
