"""The embedded server as a separate process against hostile-but-honest clients (issue 15).

One ``popo-rollout-server`` started by ``launch_servers`` (so its API key travels by environment,
not argv) on a tiny Qwen2 with 4,096 positions and no EOS, so a request can be made long. Checked
over HTTP: a client that disconnects takes its sequences out of the batch; a long request does not
keep later ones waiting; one bad request fails alone while other clients' requests in the same batch
succeed; the key is not in the process's command line. Last, a property-based test of the
``/generate`` contract (hypothesis): random bodies, valid and invalid, get a 200 that obeys SGLang's
response schema or a 400 naming a field; never a 500, never a hang.
"""

import json
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.sglang_source import sglang_api_types

KEY = "hostile-test-key"
H = {"Authorization": f"Bearer {KEY}"}
VOCAB, POSITIONS, MAX_SEQUENCES = 64, 4096, 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers

    root = tmp_path_factory.mktemp("hostile")
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    Qwen2ForCausalLM(config).save_pretrained(str(root / "model"))
    servers = launch_servers("embedded", str(root / "model"), num_servers=1, device="cpu", api_key=KEY,
                             log_dir=str(root), health_timeout_s=120,
                             extra_args=("--max-sequences-per-request", str(MAX_SEQUENCES)))
    try:
        yield servers[0]
    finally:
        stop_servers(servers)


def _post(url, path, body, timeout=30, **kw):
    return requests.post(f"{url}{path}", data=json.dumps(body), headers={**H, "Content-Type": "application/json"},
                         timeout=timeout, **kw)


def test_key_is_not_on_the_command_line(server):
    cmdline = open(f"/proc/{server.process.pid}/cmdline", "rb").read()
    assert KEY.encode() not in cmdline and b"--api-key" not in cmdline
    assert requests.get(f"{server.url}/model_info", timeout=10).status_code == 401
    assert requests.get(f"{server.url}/model_info", headers={"Authorization": "Bearer " + "x" * len(KEY)},
                        timeout=10).status_code == 401
    assert requests.get(f"{server.url}/model_info", headers=H, timeout=10).status_code == 200


def test_limits_answer_400_naming_the_field(server):
    for body, field in [({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10 ** 9}}, "max_new_tokens"),
                        ({"input_ids": [1, 2], "sampling_params": {"n": 10 ** 6}}, "sampling_params.n"),
                        ({"input_ids": [1] * POSITIONS}, "context length")]:
        t0 = time.monotonic()
        r = _post(server.url, "/generate", body)
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        assert time.monotonic() - t0 < 10
    r = _post(server.url, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 3


def test_one_bad_request_fails_alone(server):
    """``logprob_start_len: "x"`` made the four valid requests of other clients in its batch 500."""
    good = {"input_ids": [3, 4, 5], "return_logprob": True, "sampling_params": {"max_new_tokens": 24}}
    bad = {**good, "logprob_start_len": "x"}
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(_post, server.url, "/generate", b) for b in (good, good, bad, good, good)]
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200, 200, 400, 200, 200]
    assert answers[2].json()["error"]["message"].startswith("logprob_start_len")
    assert all(len(a.json()["output_ids"]) == 24 for a in answers if a.status_code == 200)


def _flush_ok(url) -> bool:
    return _post(url, "/flush_cache", {}).status_code == 200


def test_a_client_that_leaves_frees_the_server(server):
    """``max_new_tokens`` near the context with n = 32: the client hangs up after 0.5 s. Before, the
    server generated on (every flush_cache said "requests are pending" until the batch ended)."""
    with _send_raw(server.url, {"input_ids": [1, 2, 3], "sampling_params": {
            "max_new_tokens": POSITIONS - 8, "n": 32, "ignore_eos": True}}):
        time.sleep(0.5)
        assert not _flush_ok(server.url)  # it is running
    deadline = time.monotonic() + 5
    while not _flush_ok(server.url):
        assert time.monotonic() < deadline, "the abandoned request still holds the server"
        time.sleep(0.1)


def _send_raw(url: str, body: dict) -> socket.socket:
    """POST /generate on a raw connection (closing it is the client leaving)."""
    data = json.dumps(body).encode()
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_a_long_request_does_not_starve_later_ones(server):
    """After 64 decode steps a batch admitted nobody, so every request behind a long one waited
    for all of it (and timed out, issue 15). Now newcomers join between decode steps."""
    long_one = _send_raw(server.url, {"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": POSITIONS - 8, "n": 16, "ignore_eos": True}})
    try:
        time.sleep(1.0)  # well past 64 decode steps of the long batch
        t0 = time.monotonic()
        try:
            r = _post(server.url, "/generate", {"input_ids": [7, 8], "sampling_params": {"max_new_tokens": 4}},
                      timeout=15)
        except requests.Timeout:
            pytest.fail("a 4-token request waited more than 15 s behind a long one")
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 4
        assert not _flush_ok(server.url), "the long request had ended: the check proves nothing"
        assert time.monotonic() - t0 < 15
    finally:
        long_one.close()  # the client leaves: its rows are dropped (test_a_client_that_leaves_frees_the_server)
    deadline = time.monotonic() + 10
    while not _flush_ok(server.url):
        assert time.monotonic() < deadline
        time.sleep(0.1)


# ------------------------------------------------------------------ the /generate contract, fuzzed

FIELDS = ("input_ids", "sampling_params", "logprob_start_len", "return_logprob", "rid", "text", "stream", "body",
          "top_logprobs_num", "token_ids_logprob", "return_hidden_states")


def test_generate_contract_holds_for_random_bodies(server):
    """Budget: 60 examples, each answered within 20 s (a hang fails the test), no hypothesis
    deadline. A third of the bodies are valid (small: max_new_tokens <= 4, n <= 2, <= 2 prompts,
    so the run stays short); the others are a valid body with one field or one token id replaced by junk: wrong
    types, NaN/inf, huge or negative numbers, booleans, unknown keys."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    types = sglang_api_types()
    junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True),
                     # no junk integer in [7, 5000]: a corrupted max_new_tokens that happens to be valid stays cheap
                     st.integers(min_value=-2 ** 70, max_value=2 ** 70).filter(lambda x: not 7 <= x <= 5000),
                     st.lists(st.integers(-3, 70), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    prompt = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
    sampling = st.fixed_dictionaries({"max_new_tokens": st.integers(0, 4)}, optional={  # absent: 128, slow
        "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
        "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2), "ignore_eos": st.booleans(),
        "top_k": st.just(-1), "min_p": st.just(0.0)})
    single = st.fixed_dictionaries({"input_ids": prompt, "sampling_params": st.builds(
        lambda sp, n: {**sp, "n": n}, sampling, st.integers(1, 2))}, optional={"logprob_start_len": st.integers(-1, 1)})
    batch = st.fixed_dictionaries({"input_ids": st.lists(prompt, min_size=1, max_size=2), "sampling_params": sampling},
                                  optional={"logprob_start_len": st.sampled_from([-1, 0])})
    valid = st.builds(lambda b, extra: {**b, **extra}, st.one_of(single, batch), st.fixed_dictionaries({}, optional={
        "return_logprob": st.booleans(), "rid": st.text(max_size=4), "stream": st.just(False)}))
    keys = ["input_ids", "sampling_params", "return_logprob", "logprob_start_len", "rid", "stream", "text",
            "sp:max_new_tokens", "sp:n", "sp:temperature", "sp:top_p", "sp:stop_token_ids", "sp:ignore_eos",
            "sp:sampling_seed", "sp:top_k", "sp:bogus", "ids:0"]

    def corrupt(b, key, value):
        b = json.loads(json.dumps(b))
        if key == "sp:max_new_tokens" and value is None:
            value = "None"  # null is valid (up to the context: 4,000 tokens) and only slow
        if key.startswith("sp:"):
            sp = b.get("sampling_params")
            sp = sp if isinstance(sp, dict) else {}
            b["sampling_params"] = {**sp, key[3:]: value}
        elif key == "ids:0":
            ids = b["input_ids"]
            (ids[0] if isinstance(ids[0], list) else ids)[0] = value
        else:
            b[key] = value
        return b

    corrupted = st.builds(corrupt, valid, st.sampled_from(keys), junk)
    body = st.one_of(valid, corrupted, corrupted)  # a third valid
    seen = {"200": 0, "400": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body)
    def check(b):
        raw = json.dumps(b)  # NaN/Infinity go out as the literals a careless client sends
        r = requests.post(f"{server.url}/generate", data=raw, headers={**H, "Content-Type": "application/json"},
                          timeout=20)
        assert r.status_code in (200, 400), (r.status_code, r.text[:300], raw[:300])
        out = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"bare {c} in the response: {r.text[:200]}"))
        if r.status_code == 400:
            seen["400"] += 1
            message = out["error"]["message"]
            assert message.split(":")[0].split(".")[0] in FIELDS, message
            return
        seen["200"] += 1
        items = out if isinstance(out, list) else [out]
        prompts = b["input_ids"] if isinstance(b["input_ids"][0], list) else [b["input_ids"]]
        sps = b.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(prompts)
        assert len(items) == sum((sp.get("n") or 1) for sp in sps)
        for item in items:
            resp = types.GenerateResponse.from_json_value(item)  # SGLang's own response contract
            meta = resp.meta_info
            assert all(0 <= t < VOCAB for t in resp.output_ids)
            assert meta.completion_tokens == len(resp.output_ids)
            assert isinstance(meta.finish_reason, (types.FinishStop, types.FinishLength))
            if meta.output_token_logprobs is not None:
                assert [e.token_id for e in meta.output_token_logprobs] == resp.output_ids
                assert all(e.logprob is None or (math.isfinite(e.logprob) and e.logprob <= 1e-6)
                           for e in meta.output_token_logprobs)

    t0 = time.monotonic()
    check()
    print(f"generate contract fuzz: {seen} in {time.monotonic() - t0:.1f}s")
    assert seen["200"] >= 5 and seen["400"] >= 5, seen  # the strategy reaches both sides of the contract
    r = _post(server.url, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200  # still serving
