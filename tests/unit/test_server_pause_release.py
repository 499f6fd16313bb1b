"""Partial rollouts and memory release on the embedded server, in-process (issue 12 items 2-3).

What SGLang 0.5.23 does, and so what these tests expect, is cited in ``popo_mega/rollout/server.py``'s
module doc. The expected tokens never come from the server: before a weight update they are the
greedy continuation of ``transformers``' own forward of the first model; after it, the second model
("certain") makes one token certain whatever the context: its embedding rows are all equal, its
attention and MLP outputs are zero (o_proj, down_proj = 0), so the last hidden state is the same
for every position and every K/V cache, and ``lm_head`` puts all the mass on CERTAIN.
"""

import contextlib
import os
import threading
import time

import pytest
import torch

from tests.app_thread import app_in_thread
from tests.sglang_source import sglang_api_types

CERTAIN = 17
MAX_NEW = 60


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    root = tmp_path_factory.mktemp("pause")
    base = save_tiny_qwen2(str(root / "base"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[CERTAIN] = 1.0  # logit = sum(h) = hidden size (32) for CERTAIN, 0 for the rest
    certain = str(root / "certain")
    model.save_pretrained(certain)
    os.remove(os.path.join(certain, "config.json"))  # the update reads safetensors only
    return base, certain


def _greedy(path, prompt, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _server(path, **kw):
    from popo_mega.rollout.server import RolloutServer, ServerArgs

    return RolloutServer(ServerArgs(model_path=path, device="cpu", weight_version="v0", **kw))


def _slowed(srv, seconds=0.004):
    """Each forward takes a few ms more, so a pause lands mid-generation on a loaded machine too (the
    HTTP test: its pause goes out as the batch starts, 60 slowed steps before its end)."""
    forward = srv.model.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    srv.model.forward = slow


def _held(srv, tokens: int) -> None:
    """The first forward at which every unfinished row has ``tokens`` tokens waits (at most 60 s) until a
    pause or an abort is asked for (``pause_mode`` set, or ``abort_all`` called), or a pause has already
    come and gone (``continue_generation`` called): a pause or abort can reach the rows at the step
    boundary before that forward, and waiting then for one more would hold 60 s. So the pause lands
    mid-generation however late its caller runs; every other forward runs at once.
    Before, each forward took 4 ms more, and a caller that ran 0.5 s late after seeing the tokens
    (a loaded machine) paused a 30-token row after its last token."""
    forward, passed, asked = srv.model.forward, threading.Event(), threading.Event()
    continue_generation, abort_all = srv.continue_generation, srv.abort_all

    def continue_and_mark():  # a pause asked and ended before the hold was reached holds nothing
        asked.set()
        return continue_generation()

    def abort_and_mark():  # its mark on the running rows may be consumed before the hold is reached
        abort_all()
        asked.set()

    def held(*args, **kwargs):
        if not passed.is_set():
            rows = [s for s, slot in list(srv._collected) if not slot["done"].is_set()]
            if rows and min(len(s.output_ids) for s in rows) >= tokens:
                passed.set()
                end = time.monotonic() + 60
                while (srv.pause_mode is None and not srv._abort_running and not asked.is_set()
                       and not srv.stopping.is_set() and time.monotonic() < end):
                    time.sleep(0.001)
        return forward(*args, **kwargs)

    srv.model.forward = held
    srv.continue_generation, srv.abort_all = continue_and_mark, abort_and_mark


def _start(srv, prompt, body=None, **sp):
    """Submit ``body``, or by default a greedy ``MAX_NEW``-token request for ``prompt``."""
    body = body or {"input_ids": prompt, "return_logprob": True,
                    "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True, **sp}}
    plan = srv.plan(body)
    return plan, srv.submit(plan), time.time()


def _until(condition, timeout_s: float) -> bool:
    """Poll ``condition`` every millisecond until it holds or ``timeout_s`` passes; its last value."""
    end = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.001)
    return bool(condition())


def _wait_tokens(seq, k, timeout=30):
    assert _until(lambda: len(seq.output_ids) >= k, timeout)


def _finish(srv, plan, jobs, t0):
    for _, slot in jobs:
        assert slot["done"].wait(60)
    return srv.response(plan, jobs, t0)


@contextlib.contextmanager
def _mid_generation(path, prompt, tokens: int, mode: str | None = None, body=None, **server_kw):
    """A server decoding ``prompt`` (or ``body``; held at ``tokens`` tokens until a pause or an abort),
    once its row has ``tokens`` tokens, paused in ``mode`` if given; yields (server, plan, jobs, t0) and
    stops the server after."""
    srv = _server(path, **server_kw)
    try:
        _held(srv, tokens)
        plan, jobs, t0 = _start(srv, prompt, body)
        _wait_tokens(jobs[0][0], tokens)
        if mode is not None:
            srv.pause({"mode": mode})
        yield srv, plan, jobs, t0
    finally:
        srv.stopping.set()


@pytest.fixture(scope="module")
def expected(dirs):
    base, _ = dirs
    prompt = [5, 6, 7]
    greedy = _greedy(base, prompt, MAX_NEW)
    assert CERTAIN not in greedy, "pick another CERTAIN: the base model makes it itself"
    return prompt, greedy


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_paused_rows_continue_on_the_new_weights(dirs, expected, mode):
    """Pause mid-generation, load the other weights, continue: the tokens made before the pause are
    the base model's, every later one is the new model's, and meta_info's weight_versions say where
    the version changed. Before (the update waited for the batch), every token was the base model's."""
    base, certain = dirs
    prompt, greedy = expected
    with _mid_generation(base, prompt, 3, mode) as (srv, plan, jobs, t0):
        seq = jobs[0][0]
        k = len(seq.output_ids)
        assert 3 <= k < MAX_NEW
        if mode == "retract":
            assert srv.queue.snapshot()[0][0] is seq and not srv.pending()  # flush would pass (queue ignored)
        else:
            assert srv.pending()  # parked rows hold their K/V cache: /flush_cache refuses
        time.sleep(0.05)
        assert len(seq.output_ids) == k  # nothing decodes while paused
        srv.update_from_disk({"model_path": certain, "weight_version": "v1", "flush_cache": False})
        srv.continue_generation()
        out = _finish(srv, plan, jobs, t0)
    ids = out["output_ids"]
    assert ids[:k] == greedy[:k]
    assert ids[k:] == [CERTAIN] * (MAX_NEW - k)
    meta = out["meta_info"]
    assert meta["weight_versions"] == [{"version": "v0", "start": 0, "end": k},
                                       {"version": "v1", "start": k, "end": MAX_NEW}]
    assert meta["weight_version"] == "v1"
    assert meta["num_retractions"] == (1 if mode == "retract" else 0)
    assert all(lp > -1e-3 for lp, _, _ in meta["output_token_logprobs"][k:])  # certain: log-prob ~ 0


def test_in_place_update_with_flush_is_refused_after_loading(dirs, expected):
    """SGLang's default flush_cache: true cannot flush while rows are parked in place: the weights and
    version are updated, the answer is 400 with SGLang's message."""
    from popo_mega.rollout.server import FLUSH_REFUSED, RequestError

    base, certain = dirs
    prompt, greedy = expected
    with _mid_generation(base, prompt, 2, "in_place") as (srv, plan, jobs, t0):
        k = len(jobs[0][0].output_ids)
        with pytest.raises(RequestError, match="cache was not flushed"):
            srv.update_from_disk({"model_path": certain, "weight_version": "v1"})
        assert str(FLUSH_REFUSED).startswith("Weights were updated")
        assert srv.weight_version == "v1"
        srv.continue_generation()
        out = _finish(srv, plan, jobs, t0)
    assert out["output_ids"][:k] == greedy[:k] and out["output_ids"][k:] == [CERTAIN] * (MAX_NEW - k)


def test_abort_pause_answers_running_and_queued_requests(dirs, expected):
    """mode abort: a queued request is answered at once ("Abort in waiting queue", no tokens), a running
    one after one more token ("Aborted"), both HTTP 200 bodies; a request sent while paused waits
    and runs after /continue_generation."""
    base, _ = dirs
    prompt, greedy = expected
    srv = _server(base, max_running_requests=1)
    marked = []
    hook = srv._between_steps

    def spy(rows):
        before = [s.abort_message for s in rows]
        out = hook(rows)
        marked.extend(len(s.output_ids) for s, b in zip(rows, before) if b is None and s.abort_message)
        return out

    srv._between_steps = spy
    try:
        _held(srv, 3)
        plan, jobs, t0 = _start(srv, prompt)
        plan2, jobs2, _ = _start(srv, [9, 8])
        _wait_tokens(jobs[0][0], 3)
        srv.pause({"mode": "abort"})
        out, queued = _finish(srv, plan, jobs, t0), _finish(srv, plan2, jobs2, t0)
        later_plan, later, t1 = _start(srv, prompt, max_new_tokens=4)
        time.sleep(0.1)
        assert not later[0][1]["done"].is_set()  # held while paused
        srv.continue_generation()
        after = _finish(srv, later_plan, later, t1)
    finally:
        srv.stopping.set()
    assert out["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted", "status_code": None,
                                                 "err_type": None}
    assert len(marked) == 1 and len(out["output_ids"]) == marked[0] + 1 < MAX_NEW
    assert out["output_ids"] == greedy[:len(out["output_ids"])]
    assert queued["meta_info"]["finish_reason"] == {"type": "abort", "message": "Abort in waiting queue"}
    assert queued["output_ids"] == []
    assert after["output_ids"] == greedy[:4] and after["meta_info"]["finish_reason"]["type"] == "length"


def test_uninterrupted_seeded_row_is_unchanged_by_a_pause(dirs):
    """A seeded sampled row paused in place and continued on the same weights gives exactly the
    tokens of a server that never paused (its stream lives on the row; the K/V cache is kept)."""
    base, _ = dirs
    body = {"input_ids": [3, 4, 5], "sampling_params": {"temperature": 1.0, "max_new_tokens": 40,
                                                        "ignore_eos": True, "sampling_seed": 1234}}
    ref = _server(base)
    try:
        want = ref.generate(body)["output_ids"]
    finally:
        ref.stopping.set()
    with _mid_generation(base, None, 5, "in_place", body=body) as (srv, plan, jobs, t0):
        time.sleep(0.05)
        srv.continue_generation()
        got = _finish(srv, plan, jobs, t0)
    assert got["output_ids"] == want
    assert got["meta_info"]["weight_versions"] == [{"version": "v0", "start": 0, "end": 40}]


def test_bad_pause_and_memory_bodies_are_400(dirs):
    from popo_mega.rollout.server import RequestError

    base, _ = dirs
    srv = _server(base)
    try:
        with pytest.raises(RequestError, match="mode must be one of"):
            srv.pause({"mode": "later"})
        with pytest.raises(RequestError, match="unknown tag 'gpu'"):
            srv.release_memory({"tags": ["gpu"]})
        with pytest.raises(RequestError, match="'weights' is not released"):
            srv.resume_memory({"tags": ["weights"]})
        srv.release_memory({"tags": ["kv_cache"]})
        with pytest.raises(RequestError, match="'kv_cache' is already released"):
            srv.release_memory({})
        with pytest.raises(RequestError, match="memory is released"):
            srv.generate({"input_ids": [1, 2]})
        srv.resume_memory({"tags": ["kv_cache"]})
        assert len(srv.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})["output_ids"]) == 2
    finally:
        srv.stopping.set()


def test_release_refused_while_rows_are_held_in_place(dirs):
    from popo_mega.rollout.server import RequestError

    base, _ = dirs
    with _mid_generation(base, [5, 6, 7], 2, "in_place", enable_memory_saver=True) as (srv, plan, jobs, t0):
        with pytest.raises(RequestError, match="only when server is idle: 1 rows are paused in place"):
            srv.release_memory({})
        srv.continue_generation()
        assert len(_finish(srv, plan, jobs, t0)["output_ids"]) == MAX_NEW


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_saver_release_frees_the_weights_until_they_are_sent_again(tmp_path):
    """--enable-memory-saver without CPU backup (SGLang: the weights' content is lost): release frees
    every parameter's storage (and the process's RSS drops by most of it), /generate is refused with
    the reason until resume and then until every tensor was loaded again; after that a seeded request
    gives what a fresh server gives."""
    from popo_mega.rollout.server import RequestError
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    path = save_tiny_qwen2(str(tmp_path / "m"), seed=1, vocab_size=8192, hidden_size=256, num_heads=4,
                           num_kv_heads=2, intermediate_size=256)
    body = {"input_ids": [3, 4, 5], "sampling_params": {"temperature": 1.0, "max_new_tokens": 12,
                                                        "sampling_seed": 77}}
    fresh = _server(path)
    try:
        want = fresh.generate(body)["output_ids"]
    finally:
        fresh.stopping.set()
    srv = _server(path, enable_memory_saver=True)
    try:
        assert srv.generate(body)["output_ids"] == want
        param_bytes = sum(p.numel() * p.element_size() for p in srv.model.parameters())
        before = _rss_bytes()
        srv.release_memory({})
        dropped = before - _rss_bytes()
        assert all(p.untyped_storage().nbytes() == 0 for p in srv.model.parameters())
        assert dropped > 0.6 * param_bytes, (dropped, param_bytes)
        assert srv.health() == "memory released (cuda_graph, kv_cache, weights)"
        with pytest.raises(RequestError, match="memory is released"):
            srv.generate(body)
        with pytest.raises(RequestError, match="resume_memory_occupation first; nothing was loaded"):
            srv.update_from_disk({"model_path": path})
        srv.resume_memory({})
        assert all(p.untyped_storage().nbytes() > 0 for p in srv.model.parameters())
        n = len(srv.weights_missing)
        assert n == len(srv.model.state_dict())  # every tensor (no persistent buffers in Qwen2)
        with pytest.raises(RequestError, match=f"and {n} tensors have not been loaded since"):
            srv.generate(body)
        srv.update_from_disk({"model_path": path, "weight_version": "resynced"})
        assert not srv.weights_missing and srv.health() is None
        assert srv.generate(body)["output_ids"] == want
    finally:
        srv.stopping.set()


def test_cpu_backup_keeps_the_weights(dirs):
    """--enable-weights-cpu-backup: the weights survive a release (SGLang's backup), nothing to re-send."""
    base, _ = dirs
    body = {"input_ids": [3, 4, 5], "sampling_params": {"temperature": 0, "max_new_tokens": 6}}
    srv = _server(base, enable_memory_saver=True, enable_weights_cpu_backup=True)
    try:
        want = srv.generate(body)["output_ids"]
        srv.release_memory({"tags": ["weights"]})
        srv.resume_memory({"tags": ["weights"]})
        assert not srv.weights_missing and srv.generate(body)["output_ids"] == want
    finally:
        srv.stopping.set()


def test_weight_version_spans_follow_sglang():
    """compute_weight_version_spans + add_weight_versions_to_meta_info (srt/utils/weight_versions.py),
    worked by hand: changes recorded at 3 and 5 tokens, then a change with the same version, a
    change at 0 tokens (not recorded by SGLang: only requests with tokens get events)."""
    from popo_mega.rollout.server import weight_version_spans

    assert weight_version_spans([], "a", 4) == [{"version": "a", "start": 0, "end": 4}]
    assert weight_version_spans([], "a", 0) == [{"version": "a", "start": 0, "end": 0}]
    assert weight_version_spans([("a", 3), ("b", 5)], "c", 9) == [
        {"version": "a", "start": 0, "end": 3}, {"version": "b", "start": 3, "end": 5},
        {"version": "c", "start": 5, "end": 9}]
    assert weight_version_spans([("a", 3), ("b", 3)], "c", 9) == [
        {"version": "a", "start": 0, "end": 3}, {"version": "c", "start": 3, "end": 9}]
    assert weight_version_spans([("a", 3), ("a", 5)], "b", 9) == [
        {"version": "a", "start": 0, "end": 5}, {"version": "b", "start": 5, "end": 9}]
    assert weight_version_spans([("a", 4)], "b", 4) == [{"version": "a", "start": 0, "end": 4}]


def test_version_label_change_while_parked_splits_the_spans(dirs, expected):
    """/update_weight_version while rows are parked (the client's sync sets the version last) records
    the boundary at the parked rows' token count, as SGLang's record_weight_version_change."""
    base, _ = dirs
    prompt, greedy = expected
    with _mid_generation(base, prompt, 2, "in_place") as (srv, plan, jobs, t0):
        k = len(jobs[0][0].output_ids)
        srv.update_weight_version({"new_version": "v9", "abort_all_requests": False})
        srv.continue_generation()
        out = _finish(srv, plan, jobs, t0)
    assert out["output_ids"] == greedy  # same weights: same tokens
    assert out["meta_info"]["weight_versions"] == [{"version": "v0", "start": 0, "end": k},
                                                   {"version": "v9", "start": k, "end": MAX_NEW}]


def test_update_weight_version_aborts_by_default(dirs, expected):
    """UpdateWeightVersionReqInput.abort_all_requests defaults to True in SGLang."""
    base, _ = dirs
    prompt, _ = expected
    with _mid_generation(base, prompt, 2) as (srv, plan, jobs, t0):
        threading.Thread(target=srv.update_weight_version, args=({"new_version": "v2"},)).start()
        out = _finish(srv, plan, jobs, t0)
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and len(out["output_ids"]) < MAX_NEW


def _post_once_decoding(srv, url: str, body: dict, result: dict, key: str) -> threading.Thread:
    """POST ``body`` to ``url`` in a thread (its response into ``result[key]``); return once ``srv``
    decodes a batch (at most 6 s). A previous request's answer can reach its client before its batch
    ends, so first wait for that batch to end: else a pause could land before this request is admitted,
    and a request that arrives while paused waits for /continue_generation (as in SGLang)."""
    import requests

    assert _until(lambda: not srv.in_batch, 6.0), "the previous batch did not end within 6 s"
    client = threading.Thread(target=lambda: result.update({key: requests.post(url, json=body, timeout=60)}))
    client.start()
    _until(lambda: srv.in_batch, 6.0)
    return client


def test_pause_routes_over_http_and_sglang_reads_the_answers(dirs, expected):
    """The HTTP app: /pause_generation in_place answers once the rows are parked, /ready is 503 and
    /flush_cache 400 meanwhile, a disk update with SGLang's default flush_cache is 400 with SGLang's
    message (weights loaded anyway), and the /generate answer, spans included, and an abort answer
    decode with SGLang's own GenerateResponse."""
    import requests

    types = sglang_api_types()
    base, certain = dirs
    prompt, greedy = expected
    srv = _server(base)
    _slowed(srv)
    try:
        with app_in_thread(srv) as port:
            url = f"http://127.0.0.1:{port}"
            result = {}
            body = {"input_ids": prompt, "return_logprob": True,
                    "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}}
            client = _post_once_decoding(srv, f"{url}/generate", body, result, "r")
            r = requests.post(f"{url}/pause_generation", json={"mode": "in_place"}, timeout=30)
            assert r.status_code == 200 and r.json() == {"message": "Generation paused successfully.", "status": "ok"}
            assert requests.get(f"{url}/ready", timeout=5).status_code == 503
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
            assert requests.post(f"{url}/flush_cache", timeout=5).status_code == 400
            r = requests.post(f"{url}/update_weights_from_disk", json={"model_path": certain, "weight_version": "v1"},
                              timeout=30)
            assert r.status_code == 400 and r.json()["message"].startswith("Weights were updated, but the cache")
            assert requests.post(f"{url}/continue_generation", json={}, timeout=5).status_code == 200
            client.join(60)
            out = result["r"].json()
            abort_body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW,
                                                                   "ignore_eos": True}}
            client = _post_once_decoding(srv, f"{url}/generate", abort_body, result, "a")
            assert requests.post(f"{url}/pause_generation", json={}, timeout=30).status_code == 200  # default: abort
            client.join(60)
            aborted = result["a"]
            requests.post(f"{url}/continue_generation", json={}, timeout=5)
    finally:
        srv.stopping.set()
    assert result["r"].status_code == 200
    spans = out["meta_info"]["weight_versions"]
    k = spans[0]["end"]
    assert spans == [{"version": "v0", "start": 0, "end": k}, {"version": "v1", "start": k, "end": MAX_NEW}]
    assert out["output_ids"][:k] == greedy[:k] and out["output_ids"][k:] == [CERTAIN] * (MAX_NEW - k)
    decoded = types.GenerateResponse.from_json_value(out)
    assert [(s.version, s.start, s.end) for s in decoded.meta_info.weight_versions] == [("v0", 0, k),
                                                                                       ("v1", k, MAX_NEW)]
    assert aborted.status_code == 200 and aborted.json()["meta_info"]["finish_reason"]["type"] == "abort"
    types.GenerateResponse.from_json_value(aborted.json())


def test_retracted_row_recomputes_its_prompt_logprobs_and_keeps_its_own(dirs):
    """A retracted row is prefilled again over prompt + tokens (SGLang's reset_for_retract drops its
    input log-probs, recomputed then): on unchanged weights its input and output log-probs equal an
    uninterrupted run's (to fp32 rounding) and so do its seeded tokens."""
    base, _ = dirs
    body = {"input_ids": [3, 4, 5, 6], "return_logprob": True, "logprob_start_len": 1,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 30, "ignore_eos": True, "sampling_seed": 5}}
    ref = _server(base)
    try:
        want = ref.generate(body)
    finally:
        ref.stopping.set()
    with _mid_generation(base, None, 4, "retract", body=body) as (srv, plan, jobs, t0):
        srv.continue_generation()
        got = _finish(srv, plan, jobs, t0)
    assert got["meta_info"]["num_retractions"] == 1
    assert got["output_ids"] == want["output_ids"]
    assert len(jobs[0][0].input_logprobs) == 3  # prompt tokens 1..3 only, not the 4+ output tokens prefilled too
    for key in ("input_token_logprobs", "output_token_logprobs"):
        a, b = got["meta_info"][key], want["meta_info"][key]
        assert [t for _, t, _ in a] == [t for _, t, _ in b]
        assert torch.allclose(torch.tensor([x for x, _, _ in a]), torch.tensor([x for x, _, _ in b]), atol=1e-5)


def test_a_batch_winding_down_does_not_hold_a_flush_or_a_release(dirs):
    """Right after the last answer the scheduler still finishes its batch (one more admit call, held
    here until a weight operation waits for the model lock, at most 30 s); /flush_cache and
    /release_memory_occupation count unanswered requests, so neither is refused then. Before, the
    scheduler's busy flag refused them in that window. (A fixed 0.3 s hold failed "batch not over
    yet" when this thread ran that late after its answer.)"""
    base, _ = dirs
    srv = _server(base)
    batching = srv._continuous_batching

    def slow_wind_down(slots):
        callbacks = batching(slots)
        admit = callbacks["admit"]

        def late_admit(step):
            if all(slot["done"].is_set() for slot in slots.values()):
                end = time.monotonic() + 30
                while not srv._lock_waiters and time.monotonic() < end:  # until release_memory waits
                    time.sleep(0.001)
            return admit(step)

        return {**callbacks, "admit": late_admit}

    srv._continuous_batching = slow_wind_down
    try:
        out = srv.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        assert len(out["output_ids"]) == 2 and srv.busy  # answered, batch not over yet
        assert not srv.pending()
        srv.release_memory({"tags": ["kv_cache"]})
        srv.resume_memory({"tags": ["kv_cache"]})
    finally:
        srv.stopping.set()
