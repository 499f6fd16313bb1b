"""RolloutPipeline (rollout.max_staleness = k): the producer samples ahead by at most k weight versions,
hands failures to the step that failed and starts again there with the same prompts, stays out of
evaluations, and gives a checkpoint the cursor of the first batch not trained. A fake worker records
when each collect ran and what the engine served then; every expectation is counted by hand.

No expectation rests on how soon the producer thread runs: a test that needs it to have reached a
point waits for that point (``FakeWorker.reached``, ``_wait_logged``). Before, fixed sleeps of 50-100
ms stood in for it, and a producer woken 60 ms late (a loaded 2-core machine) failed six tests."""

import threading
import time

import pytest

from popo_mega.rollout.http_engine import RolloutServerError
from popo_mega.train.prompts import Prompt, PromptStream
from popo_mega.train.rollout_pipeline import RolloutPipeline, staleness_metrics, version_step
from popo_mega.train.rollout_worker import RolloutBatch

P = 3  # prompts per step


class FakeEngine:
    def __init__(self):
        self.restarts = 0
        self.serving = 0  # the step whose weights the fake server holds


class FakeWorker:
    """collect(step) draws P prompts; it records (step, served step at its start, prompt ids) and can
    be told to fail once at a step, or to wait on an event (``reached(step)`` is set as it starts to)."""

    def __init__(self, engine, n_prompts=100):
        self.engine = engine
        self.setup = type("Setup", (), {})()
        self.setup.stream = PromptStream([Prompt([i], str(i), str(i)) for i in range(n_prompts)], seed=0)
        self.log, self.fail_at, self.gate = [], set(), {}
        self._reached = {}
        self.lock = threading.Lock()

    def reached(self, step) -> threading.Event:
        """Set once collect(step) waits at its gate (setdefault: both threads get the one event)."""
        return self._reached.setdefault(step, threading.Event())

    def collect(self, step):
        cursor = self.setup.stream.state_dict()
        served = self.engine.serving
        prompts = self.setup.stream.next_batch(P)
        if step in self.gate:
            self.reached(step).set()
            self.gate[step].wait(10)
        if step in self.fail_at:
            self.fail_at.discard(step)
            self.setup.stream.load_state_dict(cursor)  # as RolloutWorker.collect does
            raise RolloutServerError(f"server died at step {step}")
        with self.lock:
            self.log.append((step, served, [p.ids[0] for p in prompts]))
        return RolloutBatch(samples=[step], metrics={}, versions=[[f"step{served}"]] * 2)


def _wait_logged(worker, step, timeout_s=10.0):
    """Until ``worker`` has logged collect(step) (or ``timeout_s``: the assertions after say what went wrong)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with worker.lock:
            if any(s == step for s, _, _ in worker.log):
                return
        time.sleep(0.001)


def _train(pipeline, engine, first, last, between=None):
    """The loop's order: take, train (between), sync (engine serves the new step), served."""
    batches = []
    for step in range(first, last):
        batches.append(pipeline.take(step))
        if between:
            between(step)
        engine.serving = step + 1
        pipeline.served(step + 1)
    return batches


def test_version_step_and_staleness_metrics():
    assert version_step("step12") == 12 and version_step("default") is None and version_step("step3-policy") is None
    m = staleness_metrics([["step3"], ["step2", "step3"], ["default"]], step=4)
    # rollouts by first version: 3 and 2 (the third is not a step's) -> max 4-2 = 2, mean (1+2)/2
    assert m["staleness"] == 2.0 and m["staleness_mean"] == 1.5
    assert m["partial_rollouts"] == pytest.approx(1 / 3)  # one of three spans two versions
    assert staleness_metrics([["default"]], step=1) == {}


def test_k0_collects_in_the_callers_thread_one_step_at_a_time():
    engine = FakeEngine()
    worker = FakeWorker(engine)
    pipe = RolloutPipeline(worker, engine, k=0, steps=4)
    batches = _train(pipe, engine, 0, 4)
    assert [b.samples for b in batches] == [[0], [1], [2], [3]]
    assert [(s, v) for s, v, _ in worker.log] == [(0, 0), (1, 1), (2, 2), (3, 3)]  # each on its own step's weights
    assert [b.metrics["staleness"] for b in batches] == [0.0] * 4
    assert [b.metrics["prompt_cursor"] for b in batches] == [0.0, 3.0, 6.0, 9.0]


@pytest.mark.parametrize("k", [1, 2])
def test_k_steps_ahead_never_more(k):
    """Each batch s is sampled from weights of step >= s - k, and the producer does run ahead: with a
    slow trainer, batch s + 1 was sampled before the trainer took it, from step s - k + 1's weights.
    The trainer of step t is as slow as it takes the producer to log batch t + k (a fixed 50 ms let a
    late producer read the next step's weights); a producer that does not run ahead still fails: it
    samples batch t + k after the trainer moved on, or never (the wait ends after 10 s)."""
    engine = FakeEngine()
    worker = FakeWorker(engine)
    pipe = RolloutPipeline(worker, engine, k=k, steps=8)

    def slow_trainer(step):
        if step + k < 8:
            _wait_logged(worker, step + k)

    batches = _train(pipe, engine, 0, 8, between=slow_trainer)
    pipe.close()
    assert [b.samples for b in batches] == [[s] for s in range(8)]
    served_at_start = {s: v for s, v, _ in worker.log}
    assert all(served_at_start[s] >= s - k for s in range(8))
    assert [served_at_start[s] for s in range(k, 8)] == [s - k for s in range(k, 8)]  # it ran ahead, k steps
    assert [b.metrics["staleness"] for b in batches] == [float(min(s, k)) for s in range(8)]
    # the prompts are the stream's, in order, with none skipped or repeated
    assert [i for _, _, ids in sorted(worker.log) for i in ids] == [
        p.ids[0] for p in PromptStream(worker.setup.stream.prompts, seed=0).next_batch(8 * P)]


def test_a_failure_reaches_the_step_that_failed_and_sampling_starts_again_there():
    engine = FakeEngine()
    worker = FakeWorker(engine)
    worker.fail_at = {2}
    pipe = RolloutPipeline(worker, engine, k=1, steps=5)
    got = _train(pipe, engine, 0, 2)
    with pytest.raises(RolloutServerError, match="step 2"):
        pipe.take(2)
    engine.restarts += 1  # the ResilientEngine relaunched and re-synced
    got += _train(pipe, engine, 2, 5)
    assert [b.samples for b in got] == [[s] for s in range(5)]
    by_step = {s: ids for s, _, ids in worker.log}
    assert by_step[2] == [p.ids[0] for p in PromptStream(worker.setup.stream.prompts, seed=0).next_batch(3 * P)][6:]


def test_a_failure_during_a_relaunch_for_another_reason_is_sampled_again_without_raising():
    engine = FakeEngine()
    worker = FakeWorker(engine)
    worker.fail_at, worker.gate = {1}, {1: threading.Event()}
    pipe = RolloutPipeline(worker, engine, k=1, steps=3)
    pipe.take(0)
    assert worker.reached(1).wait(10)  # step 1 is sampling (else the relaunch would come before it)
    engine.restarts += 1  # a sync met the dead server first and relaunched it, while step 1 sampled
    worker.gate[1].set()
    assert pipe.take(1).samples == [1]
    pipe.close()


def test_quiet_waits_for_the_running_collect_and_starts_none():
    engine = FakeEngine()
    worker = FakeWorker(engine)
    worker.gate = {1: threading.Event()}
    pipe = RolloutPipeline(worker, engine, k=2, steps=4)
    pipe.take(0)  # the producer goes on to step 1 (served 0 >= 1 - 2) and waits at its gate
    assert worker.reached(1).wait(10)
    entered, inside = threading.Event(), []

    def evaluate():
        with pipe.quiet(True):
            entered.set()
            time.sleep(0.1)
            inside.append({s for s, _, _ in worker.log})  # asserted below: a failed assert here would not fail the test
    t = threading.Thread(target=evaluate)
    t.start()
    time.sleep(0.1)
    assert not entered.is_set()  # step 1's collect is still running
    worker.gate[1].set()
    t.join(5)
    assert entered.is_set() and not t.is_alive()
    assert inside == [{0, 1}]  # step 2 may start (0 >= 2 - 2) but must not while quiet
    assert [pipe.take(s).samples for s in (1, 2)] == [[1], [2]]
    pipe.close()


def test_checkpoint_cursor_is_before_the_first_batch_not_trained():
    engine = FakeEngine()
    worker = FakeWorker(engine)
    pipe = RolloutPipeline(worker, engine, k=1, steps=6)
    _train(pipe, engine, 0, 3)
    _wait_logged(worker, 4)  # the producer has sampled steps 3 and 4 (served 3 >= 4 - 1) and waits to sample 5
    assert worker.setup.stream.state_dict()["position"] == 5 * P  # steps 0-4 drawn, 0-2 trained
    assert pipe.cursor(3)["position"] == 3 * P
    batch = pipe.take(3)  # an interrupt now: the checkpoint is before batch 3, which is sampled again
    assert batch.metrics["prompt_cursor"] == 3 * P and pipe.cursor(3)["position"] == 3 * P
    pipe.close()


def test_close_waits_for_the_collect_in_flight_and_starts_no_other():
    """The loop's close after an interrupt: the batch in flight finishes before the final evaluation."""
    engine = FakeEngine()
    worker = FakeWorker(engine)
    worker.gate = {1: threading.Event()}
    pipe = RolloutPipeline(worker, engine, k=2, steps=6)
    pipe.take(0)
    assert worker.reached(1).wait(10)  # step 1 is in flight (else close would come before it started)
    threading.Timer(0.2, worker.gate[1].set).start()
    pipe.close(timeout_s=None)
    assert not pipe._thread.is_alive() and {s for s, _, _ in worker.log} == {0, 1}  # 2 was allowed, not started
