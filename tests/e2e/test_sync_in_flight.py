"""Partial rollouts through the client (issue 12 item 2): ``HttpEngine.sync_weights`` while its own
``generate`` is in flight pauses the server, loads the new weights and lets the requests go on, in
both pause modes; every response says which tokens which weight version sampled.

The server is an embedded ``RolloutServer`` (``--strict-sglang``) served over HTTP in this process
(``tests/app_thread``), so that the test can hold its decode loop: the forward that follows the
step at which every row has ``K`` tokens waits until a ``/pause_generation`` arrives, so the sync
always lands mid-generation, however loaded the machine. ``/flush_cache`` requests are counted where
the server answers them (its ``pending`` check).

The expected log-probs never come from the server: they are ``transformers`` forwards of the two
models (seed 0 served first as "v0", seed 1 synced as "v1"), teacher-forced on the server's tokens:
- before the sync, the old model's log-probs;
- after it, in "retract" mode, the new model's over the whole sequence (the rows are prefilled again);
- after it, in "in_place" mode, the new model attending to the OLD model's K/V cache of everything
  up to the row's last token before the pause (SGLang keeps the rows' cache; the first forward after
  the pause feeds that last token to the new weights).
Each expectation is also checked to differ from the others by far more than the tolerance, so a
sync that took effect late, or in the other mode, fails. ~2 s each on two CPU cores.
"""

import contextlib
import threading
import time
import warnings

import pytest
import torch

from popo_mega.rollout.engine import Completion, SamplingParams, versions_of
from tests.app_thread import app_in_thread

PROMPTS = [[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8]]
MAX_NEW = 100   # prompt + response fit the tiny model's 256 positions; no EOS: every response is MAX_NEW long
K = 4           # tokens every row has when the sync lands (at least)
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=11)
ATOL = 1e-4     # fp32: the server's batched, left-padded forward and a one-row HF forward differ by ~1e-6
APART = 1e-2    # the expectations of the other hypotheses are at least this far off somewhere


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The server decodes in this process: with torch's two threads on the two shared cores each decode
    step of the tiny model took ~100 ms (12 s a test), with one (as ``popo-rollout-server`` runs) ~5 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    root = tmp_path_factory.mktemp("sync_in_flight")
    old_path = save_tiny_qwen2(str(root / "old"), seed=0)
    new_path = save_tiny_qwen2(str(root / "new"), seed=1)
    old = AutoModelForCausalLM.from_pretrained(old_path).eval()
    new = AutoModelForCausalLM.from_pretrained(new_path).eval()
    return old_path, old, new


@contextlib.contextmanager
def _held_server(path: str, rows: int):
    """An embedded server on ``path`` (version "v0") over HTTP whose decode loop waits for the requests of
    all ``rows`` rows to arrive, then, once every row has ``K`` tokens, for a pause. Yields (url, gate,
    flush_modes): ``gate`` is set when the loop waits for the pause; ``flush_modes`` gets the pause mode
    in force at each ``/flush_cache``."""
    from popo_mega.rollout.server import RolloutServer, ServerArgs

    srv = RolloutServer(ServerArgs(model_path=path, device="cpu", weight_version="v0", strict_sglang=True,
                                   enable_deterministic_inference=True))
    gate, flush_modes = threading.Event(), []
    forward, pending = srv.model.forward, srv.pending

    def held_forward(*args, **kwargs):
        end = time.monotonic() + 60
        # every request reaches the server before the first row decodes on (they join between steps)
        while not gate.is_set() and len(srv._collected) + len(srv.queue) < rows and time.monotonic() < end:
            time.sleep(0.001)
        seqs = [seq for seq, _ in list(srv._collected)]
        if not gate.is_set() and len(seqs) == rows and min(len(s.output_ids) for s in seqs) >= K:
            gate.set()
            while srv.pause_mode is None and time.monotonic() < end:
                time.sleep(0.001)
        return forward(*args, **kwargs)

    def counted_pending():
        flush_modes.append(srv.pause_mode)
        return pending()

    srv.model.forward, srv.pending = held_forward, counted_pending
    try:
        with app_in_thread(srv) as port:
            yield f"http://127.0.0.1:{port}", gate, flush_modes
    finally:
        srv.stopping.set()


def _generate_across_a_sync(engine, new_model, gate) -> list[Completion]:
    """``engine.generate(PROMPTS)`` in a thread; ``sync_weights(new_model, "v1")`` once the rows are held."""
    box = {}

    def run():
        try:
            box["result"] = engine.generate(PROMPTS, SAMPLING)
        except Exception as exc:  # noqa: BLE001 - re-raised below
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert gate.wait(60), "the rows never reached K tokens together"
    engine.sync_weights(list(new_model.state_dict().items()), "v1")
    worker.join(60)
    assert not worker.is_alive(), "generate did not finish after the sync"
    if "error" in box:
        raise box["error"]
    return [row[0] for row in box["result"]]


def _teacher_forced(model, ids: list[int], start: int, cache=None) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = start .. len(ids)-1 by one fp32 forward: of ``ids[:-1]``, or
    of ``ids[start-1:-1]`` after ``cache``, which must hold ids[:start-1]. Returns [len(ids) - start],
    float64."""
    fed = start - 1 if cache is not None else 0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[fed:-1]]), cache=cache, use_cache=cache is not None).logits[0]
    logp = torch.log_softmax(logits[start - 1 - fed:].double(), dim=-1)
    return logp.gather(-1, torch.tensor(ids[start:])[:, None]).squeeze(-1)


def _in_place_expected(old, new, ids: list[int], start: int) -> torch.Tensor:
    """The tokens from ``start`` on, sampled by ``new`` over ``old``'s K/V cache of ids[:start-1]."""
    with torch.no_grad():
        cache = old(input_ids=torch.tensor([ids[:start - 1]]), use_cache=True).cache
    return _teacher_forced(new, ids, start, cache)


def _check_spans(c: Completion, prompt_len: int) -> int:
    """Two spans, v0 then v1, split somewhere after K tokens; returns the split (response tokens)."""
    assert len(c.output_ids) == MAX_NEW and c.finish_reason == "length"
    spans = c.meta["weight_versions"]
    assert [s["version"] for s in spans] == ["v0", "v1"], spans
    k = spans[0]["end"]
    assert spans == [{"version": "v0", "start": 0, "end": k}, {"version": "v1", "start": k, "end": MAX_NEW}]
    assert K <= k < MAX_NEW
    assert versions_of(c) == ["v0", "v1"] and c.weight_version == "v1"
    return prompt_len + k  # index in prompt + response of the first token the new weights sampled


def _sync_mid_generation(models, mode: str, **engine_kw):
    from popo_mega.rollout.http_engine import HttpEngine

    path, old, new = models
    with _held_server(path, len(PROMPTS)) as (url, gate, flush_modes):
        sync = dict(tensor_urls=[url]) if not engine_kw else {}
        engine = HttpEngine([url], pause_mode=mode, request_timeout_s=60, sync_timeout_s=60, verify_probes=False,
                            **sync, **engine_kw)
        completions = _generate_across_a_sync(engine, new, gate)
        assert engine.weight_version() == "v1"
    return completions, flush_modes


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_requests_in_flight_finish_on_the_new_weights(models, mode):
    """A sync while the engine's own requests decode: they all finish with MAX_NEW tokens, their
    spans say v0 then v1, the tokens before the split have the old model's log-probs and those after
    the new model's (in_place: over the old K/V cache; retract: recomputed); retract flushes the
    cache while paused, in_place never asks (SGLang would refuse: rows are held in the running batch)."""
    _, old, new = models
    completions, flush_modes = _sync_mid_generation(models, mode)
    for prompt, c in zip(PROMPTS, completions):
        split = _check_spans(c, len(prompt))
        ids = prompt + c.output_ids
        k = split - len(prompt)
        got = torch.tensor(c.output_logprobs, dtype=torch.float64)
        by_old = _teacher_forced(old, ids, len(prompt))
        assert torch.allclose(got[:k], by_old[:k], atol=ATOL)

        after, stale = got[k:], by_old[k:]
        recomputed = _teacher_forced(new, ids, len(prompt))[k:]
        in_place = _in_place_expected(old, new, ids, split)
        want, other = (recomputed, in_place) if mode == "retract" else (in_place, recomputed)
        assert torch.allclose(after, want, atol=ATOL), float((after - want).abs().max())
        assert float((after - other).abs().max()) > APART   # not the other mode
        assert float((after - stale).abs().max()) > APART   # not the old weights
        assert c.meta["num_retractions"] == (1 if mode == "retract" else 0)
    assert flush_modes == (["retract"] if mode == "retract" else [])


def test_in_place_disk_sync_retracts_the_rows_first(models, tmp_path):
    """``/update_weights_from_disk`` asks for a cache flush, which SGLang refuses while rows are held in
    place: an in_place engine syncing through the disk retracts them first (with a warning), so the
    sync succeeds and the rows are recomputed on the new weights."""
    _, old, new = models
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        completions, flush_modes = _sync_mid_generation(models, "in_place", sync_method="disk",
                                                        disk_dir=str(tmp_path / "sync"))
    assert any("retracted" in str(w.message) for w in caught)
    for prompt, c in zip(PROMPTS, completions):
        split = _check_spans(c, len(prompt))
        ids = prompt + c.output_ids
        want = _teacher_forced(new, ids, len(prompt))[split - len(prompt):]
        assert torch.allclose(torch.tensor(c.output_logprobs[split - len(prompt):], dtype=torch.float64), want,
                              atol=ATOL)
        assert c.meta["num_retractions"] == 1
    assert flush_modes == ["retract"]


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_the_run_engine_pauses_as_rollout_pause_mode_says(tmp_path, mode):
    """``ResilientEngine._connect`` hands ``rollout.pause_mode`` to the HttpEngine the run syncs through
    (before, every run paused in the HttpEngine default, "retract", whatever the config said)."""
    import types

    from popo_mega.config import config_from_dict
    from popo_mega.rollout.resilient_engine import ResilientEngine

    cfg = config_from_dict({"rollout": {"pause_mode": mode}})
    servers = types.SimpleNamespace(urls=["http://127.0.0.1:9"], local=[], nodes=[0], master_address="127.0.0.1")
    rt = types.SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    engine = ResilientEngine(None, servers, rt, None, None, max_restarts=0, colocated=False, serving=None, version="v0")
    engine._connect(cfg, str(tmp_path))
    assert engine.http.pause_mode == mode


def test_versions_of_reads_the_spans():
    """The distinct versions in span order; an empty span does not count unless it is the only one;
    without spans, the completion's weight_version."""
    def comp(spans, version="x"):
        return Completion(output_ids=[1] * 5, output_logprobs=[0.0] * 5, finish_reason="length",
                          weight_version=version, meta={"weight_versions": spans})

    assert versions_of(comp([{"version": "s1", "start": 0, "end": 2}, {"version": "s2", "start": 2, "end": 5}],
                            "s2")) == ["s1", "s2"]
    assert versions_of(comp([{"version": "s1", "start": 0, "end": 1}, {"version": "s2", "start": 1, "end": 3},
                             {"version": "s3", "start": 3, "end": 5}])) == ["s1", "s2", "s3"]
    assert versions_of(comp([{"version": "a", "start": 0, "end": 0}, {"version": "b", "start": 0, "end": 5}])) == ["b"]
    assert versions_of(comp([{"version": "a", "start": 0, "end": 0}])) == ["a"]
    assert versions_of(comp(None, "v7")) == ["v7"]
    assert versions_of(comp(None, None)) == []
    assert versions_of(Completion([1], [0.0], "stop", "v2")) == ["v2"]


def test_malformed_spans_are_a_protocol_error():
    """Spans that do not tile the output from token 0 are refused naming the field (they would make
    ``versions_of`` misreport the rollout); well-formed ones and absent ones are kept as sent."""
    from popo_mega.rollout.sglang_api import ProtocolError, completions_from_response

    def body(spans):
        meta = {"id": "r", "prompt_tokens": 2, "finish_reason": {"type": "length", "length": 3}, "weight_version": "b",
                "output_token_logprobs": [[-0.5, 7, None], [-0.25, 8, None], [-1.0, 9, None]], "num_retractions": 1}
        if spans is not None:
            meta["weight_versions"] = spans
        return {"output_ids": [7, 8, 9], "meta_info": meta}

    good = [{"version": "a", "start": 0, "end": 1}, {"version": "b", "start": 1, "end": 3}]
    (c,) = completions_from_response(body(good), 1)
    assert c.meta["weight_versions"] == good and c.meta["num_retractions"] == 1
    assert completions_from_response(body(None), 1)[0].meta["weight_versions"] is None
    for bad in ([], [{"version": "a", "start": 1, "end": 3}],                                   # not from 0
                [{"version": "a", "start": 0, "end": 1}, {"version": "b", "start": 2, "end": 3}],  # a gap
                [{"version": "a", "start": 0, "end": 4}],                                   # past the output
                [{"version": 3, "start": 0, "end": 3}], [["a", 0, 3]], "a"):
        with pytest.raises(ProtocolError, match="weight_versions"):
            completions_from_response(body(bad), 1)
