"""The embedded server's request checks, limits and weight loads, in-process (issue 15).

The /generate checks (``server_schema.parse_generate``) are a case table: every bad field is a
RequestError whose message starts with the field's path. The rest runs a real ``RolloutServer`` on
a tiny Qwen2 without HTTP (the HTTP side is tests/e2e/test_server_hostile.py).
"""

import json
import os
import socket
import threading
import time

import pytest
import torch

from popo_mega.rollout.server_schema import RequestError, context_length, json_number, parse_generate
from tests.app_thread import app_in_thread

LIMITS = dict(vocab_size=64, context_len=256, max_sequences=16)


def _body(**sp):
    return {"input_ids": [1, 2, 3], "sampling_params": sp}


# (body, the field the 400 must name first). Before the fix each was a 200, a 500, or silently changed.
BAD = [
    (_body(max_new_tokens=10 ** 9), "sampling_params.max_new_tokens"),     # locked the server (was 200)
    (_body(max_new_tokens=254), "sampling_params.max_new_tokens"),         # 3 + 254 > 256 (SGLang's check)
    (_body(max_new_tokens=-1), "sampling_params.max_new_tokens"),          # was 200
    (_body(max_new_tokens="5"), "sampling_params.max_new_tokens"),         # was int("5") = 5
    (_body(max_new_tokens=2.5), "sampling_params.max_new_tokens"),         # was int(2.5) = 2
    (_body(n=10 ** 6), "sampling_params.n"),                               # 3 GB and 60 s of starvation
    (_body(n=17), "sampling_params.n"),                                    # above max_sequences
    (_body(n=-3), "sampling_params.n"),                                    # was [] (200)
    (_body(n=0), "sampling_params.n"),                                     # was silently 1
    (_body(n=True), "sampling_params.n"),
    (_body(temperature=float("nan")), "sampling_params.temperature"),     # was accepted
    (_body(temperature=float("inf")), "sampling_params.temperature"),
    (_body(temperature=-0.5), "sampling_params.temperature"),
    (_body(temperature="hot"), "sampling_params.temperature"),            # was 500
    (_body(top_p=float("nan")), "sampling_params.top_p"),
    (_body(top_p=0.0), "sampling_params.top_p"),
    (_body(top_p=1.5), "sampling_params.top_p"),
    (_body(stop_token_ids=[1, "2"]), "sampling_params.stop_token_ids.1"),
    (_body(stop_token_ids=[True]), "sampling_params.stop_token_ids.0"),
    (_body(sampling_seed=2 ** 63), "sampling_params.sampling_seed"),
    (_body(sampling_seed=1.0), "sampling_params.sampling_seed"),
    (_body(ignore_eos="yes"), "sampling_params.ignore_eos"),
    (_body(max_tokens=5), "sampling_params.max_tokens"),                  # SGLang rejects unknown keys
    (_body(top_k=5), "sampling_params.top_k"),                            # not implemented: not ignored
    (_body(repetition_penalty=1.2), "sampling_params.repetition_penalty"),
    (_body(stop="\n"), "sampling_params.stop"),
    ({"input_ids": [1, True, 3]}, "input_ids.1"),                          # booleans were token ids
    ({"input_ids": [1, 2.0]}, "input_ids.1"),
    ({"input_ids": [1, 64]}, "input_ids.1"),                               # outside the vocabulary
    ({"input_ids": [1, -1]}, "input_ids.1"),
    ({"input_ids": [[1, 2], [3, "x"]]}, "input_ids.1.1"),
    ({"input_ids": [[1], []]}, "input_ids.1"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": "1 2 3"}, "input_ids"),
    ({"input_ids": [1] * 256}, "input_ids"),                               # prompt >= context length
    ({}, "input_ids"),
    ({"text": "hello"}, "text"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "return_logprob": True, "logprob_start_len": "x"}, "logprob_start_len"),  # failed the batch
    ({"input_ids": [1], "logprob_start_len": "x"}, "logprob_start_len"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 3}, "logprob_start_len"),
    ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
    ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}, {"temperature": None, "top_p": -1}]}, "sampling_params.1.top_p"),
    ({"input_ids": [[1], [2]], "sampling_params": {"n": 9}}, "sampling_params.n"),  # 2 x 9 > 16 sequences
    ({"input_ids": [1], "sampling_params": "greedy"}, "sampling_params"),
    ({"input_ids": [1], "top_logprobs_num": 5}, "top_logprobs_num"),
    ([1, 2], "body"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_every_bad_field_is_a_400_naming_it(body, field):
    with pytest.raises(RequestError) as info:
        parse_generate(body, **LIMITS)
    assert str(info.value).startswith(field + ":") or str(info.value).startswith(field + " "), str(info.value)


def test_good_bodies_become_the_plan_sglang_would_run():
    plan = parse_generate({"input_ids": [[1, 2], [3]], "sampling_params": {"n": 3, "temperature": 0, "top_p": 1,
                                                                             "ignore_eos": True, "top_k": -1}}, **LIMITS)
    assert [p.n for p in plan.prompts] == [3, 3] and plan.sequences == 6
    assert plan.prompts[0].temperature == 0.0 and plan.prompts[0].ignore_eos
    # SGLang's scheduler caps max_new_tokens at max_req_len - input - 1, max_req_len = context_len - 1
    plan = parse_generate({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 253}}, **LIMITS)
    assert plan.prompts[0].max_new_tokens == 256 - 1 - 3 - 1
    plan = parse_generate({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": None}}, **LIMITS)
    assert plan.prompts[0].max_new_tokens == 251
    plan = parse_generate({"input_ids": [1, 2, 3], "return_logprob": [True], "logprob_start_len": [0]}, **LIMITS)
    assert plan.prompts[0].return_logprob and plan.prompts[0].logprob_start_len == 0
    plan = parse_generate({"input_ids": [1], "logprob_start_len": 7}, **LIMITS)  # ignored without return_logprob
    assert plan.prompts[0].logprob_start_len == -1
    plan = parse_generate({"input_ids": [1], "unknown_top_level": 1, "sampling_params": {"skip_special_tokens": False}},
                          **LIMITS)  # GenerateRequest ignores unknown keys; text-only flags change no ids
    assert plan.prompts[0].max_new_tokens == 128


def test_context_length_as_sglang_derives_it():
    class Cfg:
        max_position_embeddings = 4096
        rope_scaling = None
    assert context_length(Cfg()) == 4096
    Cfg.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    assert context_length(Cfg()) == 16384
    Cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert context_length(Cfg()) == 4096
    Cfg.seq_length = 1000  # an earlier key of CONTEXT_LENGTH_KEYS wins
    assert context_length(Cfg()) == 1000


def test_json_number_writes_non_finite_as_null_as_orjson_does():
    assert [json_number(x) for x in (-0.5, float("-inf"), float("nan"), float("inf"), None)] == [-0.5, None, None,
                                                                                                 None, None]


# ------------------------------------------------------------------ a real server, in-process

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    return save_tiny_qwen2(str(tmp_path_factory.mktemp("srv") / "model"), seed=0)


def _server(path, **kw):
    from popo_mega.rollout.server import RolloutServer, ServerArgs

    return RolloutServer(ServerArgs(model_path=path, device="cpu", **kw))


@pytest.fixture(scope="module")
def server(model_dir):
    srv = _server(model_dir)
    yield srv
    srv.stopping.set()


def _greedy_first(path, prompt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return int(model(torch.tensor([prompt])).logits[0, -1].argmax())


def test_ignore_eos_is_honoured(tmp_path, model_dir):
    """SGLang's ignore_eos: no stop on EOS (nor on stop_token_ids, ``_check_token_based_finish``).
    Before, it was silently ignored: the row stopped at its first token."""
    prompt = [5, 6, 7]
    eos = _greedy_first(model_dir, prompt)
    import shutil

    path = str(tmp_path / "eos_model")
    shutil.copytree(model_dir, path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["eos_token_id"] = eos
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    srv = _server(path)
    try:
        stops = srv.generate({"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 6}})
        assert stops["output_ids"] == [eos] and stops["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
        body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True,
                                                         "stop_token_ids": [eos]}}
        runs = srv.generate(body)
        assert len(runs["output_ids"]) == 6 and runs["output_ids"][0] == eos
        assert runs["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    finally:
        srv.stopping.set()


def test_non_finite_logprobs_are_null_in_the_response(server):
    """A -inf or NaN log-prob was written as a bare NaN/-Infinity (not JSON); SGLang's orjson writes null."""
    from popo_mega.rollout.generation import SequenceRequest

    plan = server.plan({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 0})
    seq = SequenceRequest(prompt=[1, 2], logprob_start_len=0, output_ids=[3, 4], output_logprobs=[float("-inf"), -0.5],
                          input_logprobs=[None, float("nan")], finish=("length", 2))
    out = server.response(plan, [(seq, {"done": threading.Event(), "version": "v"})], time.time())
    text = json.dumps(out, allow_nan=False)  # raises on any NaN/inf left
    meta = json.loads(text)["meta_info"]
    assert meta["output_token_logprobs"] == [[None, 3, None], [-0.5, 4, None]]
    assert meta["input_token_logprobs"] == [[None, 1, None], [None, 2, None]]


def test_health_fails_while_generation_is_stuck(model_dir):
    """/health answered 200 while one request held the server (issue 15): now a running batch that
    makes no progress for --stall-timeout-s turns it 503, through the real HTTP app. The stall is
    timed from the stuck forward's start (its heartbeat came just before), not from the submit: a
    scheduler that took over 1 s to reach it left a fixed 1.5 s sleep under the 0.5 s stall."""
    import requests

    srv = _server(model_dir, stall_timeout_s=0.5)
    release, entered = threading.Event(), threading.Event()
    forward = srv.model.forward

    def stuck(*args, **kwargs):
        entered.set()
        release.wait(30)
        return forward(*args, **kwargs)

    srv.model.forward = stuck
    try:
        with app_in_thread(srv) as port:
            url = f"http://127.0.0.1:{port}"
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
            jobs = srv.submit(srv.plan({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}}))
            assert entered.wait(30), "the batch never started"
            time.sleep(1.0)
            r = requests.get(f"{url}/health", timeout=5)
            assert r.status_code == 503 and "no progress" in r.text
            release.set()
            jobs[0][1]["done"].wait(30)
            assert "error" not in jobs[0][1] and len(jobs[0][0].output_ids) == 3
            assert requests.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        release.set()
        srv.stopping.set()


def test_cancelled_sequences_leave_the_batch(server):
    """A cancelled request (its client left) frees its rows within a decode step; before, nothing
    could stop a max_new_tokens: 1e9 request."""
    plan = server.plan({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 250, "n": 4, "ignore_eos": True}})
    jobs = server.submit(plan)
    time.sleep(0.05)
    server.cancel(jobs)
    for _, slot in jobs:
        assert slot["done"].wait(10)
        assert slot["error"] == "cancelled"
    assert all(len(seq.output_ids) < 250 for seq, _ in jobs)
    ok = server.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert len(ok["output_ids"]) == 2


# ------------------------------------------------------------------ /update_weights_from_disk

def _logprobs(server):
    return server.generate({"input_ids": [1, 2, 3, 4], "return_logprob": True, "logprob_start_len": 0,
                            "sampling_params": {"max_new_tokens": 1, "temperature": 0}})["meta_info"]["input_token_logprobs"]


def _weights(seed):
    import tempfile

    from transformers import AutoModelForCausalLM

    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    with tempfile.TemporaryDirectory() as d:
        path = save_tiny_qwen2(d, seed=seed)
        return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_disk_update_takes_exactly_the_model_tensor_set(tmp_path, model_dir):
    from safetensors.torch import save_file

    srv = _server(model_dir, weight_version="v0")
    try:
        before = _logprobs(srv)
        new = _weights(seed=4)

        def attempt(files, index=None):
            d = tmp_path / f"try{len(list(tmp_path.iterdir()))}"
            d.mkdir()
            for name, tensors in files.items():
                save_file(tensors, str(d / name))
            if index is not None:
                json.dump({"metadata": {}, "weight_map": index}, open(d / "model.safetensors.index.json", "w"))
            return str(d)

        some = dict(list(new.items())[:3])
        cases = [  # (directory, what the 400 must name)
            (attempt({"model.safetensors": some}), "lacks"),  # a partial file was a success that bumped the version
            (attempt({"model.safetensors": new, "stale.safetensors": {"lm_head.weight": torch.full_like(new["lm_head.weight"], 7.0)}}),
             "stale.safetensors"),  # no index: which file holds the model is ambiguous (was: lm_head became 7.0)
            (attempt({"model.safetensors": {**new, "extra.weight": torch.zeros(2)}}), "extra.weight"),
            (attempt({"model.safetensors": {**new, "lm_head.weight": torch.zeros(3, 3)}}), "lm_head.weight"),
            (attempt({"model.safetensors": {**new, "lm_head.weight": new["lm_head.weight"].long()}}), "dtype"),
            (attempt({"a.safetensors": some}, index={**{k: "a.safetensors" for k in some}, "lm_head.weight": "a.safetensors"}),
             "lm_head.weight"),  # the index puts a tensor in a file that lacks it
            (attempt({"a.safetensors": some}, index={k: "../a.safetensors" for k in some}), "outside"),
        ]
        for path, named in cases:
            with pytest.raises(RequestError, match=named):
                srv.update_from_disk({"model_path": path, "weight_version": "bad"})
            assert srv.weight_version == "v0", path  # atomic: version not bumped ...
            assert _logprobs(srv) == before, path    # ... and nothing written
        truncated = attempt({"model.safetensors": new})
        with open(os.path.join(truncated, "model.safetensors"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
        with pytest.raises(RequestError, match="model.safetensors"):
            srv.update_from_disk({"model_path": truncated})
        # a sharded checkpoint with its index, plus a stale extra file the index does not name: loads exactly the index's
        keys = sorted(new)
        half = {k: new[k] for k in keys[: len(keys) // 2]}
        rest = {k: new[k] for k in keys[len(keys) // 2:]}
        stale = {"lm_head.weight": torch.full_like(new["lm_head.weight"], 7.0)}
        good = attempt({"m-1.safetensors": half, "m-2.safetensors": rest, "stale.safetensors": stale},
                       index={**{k: "m-1.safetensors" for k in half}, **{k: "m-2.safetensors" for k in rest}})
        out = srv.update_from_disk({"model_path": good, "weight_version": "v1"})
        assert out["success"] and srv.weight_version == "v1"
        served = srv.model.state_dict()
        assert all(torch.equal(served[k], new[k]) for k in keys)  # lm_head from m-*, not the stale 7.0
    finally:
        srv.stopping.set()


# ------------------------------------------------------------------ /init_weights_update_group

def _listening_ports():
    import psutil

    return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"}


def test_update_group_rejects_what_would_host_a_store_or_hang(model_dir):
    from popo_mega.runtime import free_port

    srv = _server(model_dir, weight_group_timeout_s=1.5, strict_sglang=True)
    try:
        base = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
                "backend": "gloo"}
        listening = _listening_ports()
        for bad, named in [({"world_size": 1, "rank_offset": 0}, "world_size"), ({"rank_offset": 0}, "rank_offset"),
                           ({"master_address": "0.0.0.0"}, "wildcard"), ({"master_port": "80"}, "master_port"),
                           ({"world_size": True}, "world_size"), ({"master_port": 70000}, "master_port")]:
            with pytest.raises(RequestError, match=named):
                srv.init_group({**base, **bad})
            assert _listening_ports() <= listening  # no store was opened on this server
        srv.begin_update()
        with pytest.raises(RequestError, match="not initialised"):  # nothing to receive from: never a success
            srv.update_from_distributed({"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[64, 32]]})
        srv.end_update()
        t0 = time.monotonic()  # nobody listens at the master: the answer comes within the stated timeout
        with pytest.raises(RequestError, match="did not form within 1.5s|Failed to initialize"):
            srv.init_group(base)
        assert time.monotonic() - t0 < 1.5 + 1.0
        assert "weight_update_group" not in srv.groups
    finally:
        srv.stopping.set()


def test_trainer_store_listens_only_on_the_master_address():
    """torch's TCPStore server binds every interface whatever host it is given (seen: ``::``)."""
    from popo_mega.rollout.weight_group import WeightUpdateGroup
    from popo_mega.runtime import free_port

    port = free_port()
    box = {}
    peer = threading.Thread(target=lambda: box.update(g=WeightUpdateGroup(
        master_address="127.0.0.1", master_port=port, rank=1, world_size=2, backend="gloo", timeout_s=30)))
    peer.start()
    root = WeightUpdateGroup(master_address="127.0.0.1", master_port=port, rank=0, world_size=2, backend="gloo",
                             timeout_s=30)
    peer.join(30)
    try:
        import psutil

        on_port = [c.laddr.ip for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"
                   and c.laddr.port == port]
        assert on_port == ["127.0.0.1"]
        sent, got = torch.arange(5.0), torch.zeros(5)
        work = box["g"].broadcast_async(got)
        root.broadcast(sent)
        work.wait()
        assert torch.equal(got, sent)
    finally:
        root.close()
        box["g"].close()


# ------------------------------------------------------------------ the API key

def test_api_key_from_environment_or_config_file(tmp_path, monkeypatch):
    from popo_mega.rollout.server import API_KEY_ENV, parse_args

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert parse_args(["--model-path", "/m"]).api_key is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args(["--model-path", "/m"]).api_key == "from-env"
    assert parse_args(["--model-path", "/m", "--api-key", "flag"]).api_key == "flag"
    cfg = tmp_path / "server.yaml"
    cfg.write_text('api-key: "from-file"\nmax_running_requests: 8\nstrict-sglang: true\n')
    args = parse_args(["--model-path", "/m", "--config", str(cfg)])
    assert (args.api_key, args.max_running_requests, args.strict_sglang) == ("from-file", 8, True)
    cfg.write_text("api-kee: x\n")
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "/m", "--config", str(cfg)])
    for bad in (["--max-sequences-per-request", "0"], ["--stall-timeout-s", "nan"], ["--max-body-bytes", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--model-path", "/m", *bad])


def test_launcher_keeps_the_key_off_the_command_line(monkeypatch):
    import yaml

    from popo_mega.rollout import sglang_launcher

    started = []
    monkeypatch.setattr(sglang_launcher, "start", lambda cmd, url, *, log_path=None, env=None: started.append(
        (cmd, env)) or sglang_launcher.ServerProcess(url, process=None, cmd=cmd, env=env))
    monkeypatch.setattr(sglang_launcher, "wait_for_health", lambda *a, **k: None)
    monkeypatch.setattr(sglang_launcher, "sglang_available", lambda: True)
    for kind in ("embedded", "sglang"):
        started.clear()
        sglang_launcher.launch_servers(kind, "/m", num_servers=1, ports=[1], api_key="s3cret")
        (cmd, env), = started
        assert "s3cret" not in " ".join(cmd) and "--api-key" not in cmd
        if kind == "embedded":
            assert env[sglang_launcher.API_KEY_ENV] == "s3cret"
        else:
            path = cmd[cmd.index("--config") + 1]
            assert yaml.safe_load(open(path)) == {"api-key": "s3cret"}
            assert os.stat(path).st_mode & 0o077 == 0  # only its owner can read it
            os.remove(path)


def test_raw_http_abuse_is_answered_at_once(model_dir):
    """A negative Content-Length held a stdlib handler until the client closed (issue 15); oversized,
    streamed-oversized and too-deeply-nested bodies, and keys, are answered before any route runs."""
    srv = _server(model_dir, api_key="k", max_body_bytes=4096)
    try:
        with app_in_thread(srv, log_level="critical") as port:

            def raw(head: bytes, body: bytes = b"") -> bytes:
                """The whole answer (the server closes the connection after it)."""
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(head.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n") + body)
                    answer = b""
                    while chunk := s.recv(65536):
                        answer += chunk
                    return answer

            auth = b"Authorization: Bearer k\r\n"
            for length in (b"-1", b"-100", b"abc"):
                t0 = time.monotonic()
                answer = raw(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: " + length + b"\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 400") and time.monotonic() - t0 < 3
            answer = raw(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5000\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 413")  # declared too large: answered before the body is read
            chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
            answer = raw(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n",
                         chunk * 2 + b"0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 413")  # streamed too large
            deep = b'{"input_ids":' + b"[" * 1990 + b"]" * 1990 + b"}"  # deeper than json's recursion limit
            answer = raw(b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: " + str(len(deep)).encode()
                         + b"\r\n\r\n", deep)
            assert answer.startswith(b"HTTP/1.1 400") and b"body: not JSON" in answer
            assert raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200")  # no key, as SGLang
            assert raw(b"GET /model_info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer j\r\n\r\n").startswith(b"HTTP/1.1 401")
            assert raw(b"GET /model_info HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n").startswith(b"HTTP/1.1 200")
    finally:
        srv.stopping.set()

