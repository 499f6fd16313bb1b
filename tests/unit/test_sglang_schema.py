"""The client's requests and the embedded server's responses against SGLang's own schema.

``/generate`` bodies are checked with ``sglang/api/v1/api_types.py`` (the module SGLang's route
validates with); the weight-update and control bodies against the field lists of the
``*ReqInput`` classes in ``sglang/srt/managers/io_struct.py``, read with ``ast`` (importing the
sglang package needs its full dependency set, which CPU machines do not install).
CI installs both files from launch/requirements-test-nodeps.txt (pip install --no-deps).
"""

import ast
import os

import pytest

from popo_mega.rollout import sglang_api as api
from popo_mega.rollout.engine import SamplingParams
from tests.sglang_source import INSTALL, sglang_api_types, sglang_dir



@pytest.fixture(scope="module")
def types():
    return sglang_api_types()


@pytest.fixture(scope="module")
def req_fields():
    """class name -> (all field names, required field names) of io_struct's request classes."""
    path = os.path.join(sglang_dir(), "srt", "managers", "io_struct.py")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing ({INSTALL})")
    tree = ast.parse(open(path).read())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def fields(name):
        node = classes[name]
        out, required = [], []
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                f, r = fields(base.id)
                out += f
                required += r
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                out.append(st.target.id)
                if st.value is None:
                    required.append(st.target.id)
        return out, required

    return fields


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An in-process embedded server (no HTTP): its ``generate`` builds the response bodies."""
    from popo_mega.rollout.server import RolloutServer, ServerArgs
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    path = save_tiny_qwen2(str(tmp_path_factory.mktemp("tiny")), eos_token_id=3)
    srv = RolloutServer(ServerArgs(model_path=path, device="cpu", weight_version="w0"))
    yield srv
    srv.stopping.set()


def test_client_generate_requests_validate(types):
    cases = [
        (SamplingParams(), 1),
        (SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=33, stop_token_ids=(3, 5)), 4),
        (SamplingParams(temperature=0.0, max_new_tokens=1), 1),
    ]
    for sampling, n in cases:
        body = api.generate_request([1, 2, 3], sampling, n)
        req = types.GenerateRequest.from_json_value(body)  # raises JsonContractError on a violation
        assert req.input_ids == [1, 2, 3] and req.return_logprob is True
        sp = types.SamplingParams.from_json_value(body["sampling_params"])  # unknown keys are rejected
        assert (sp.temperature, sp.top_p, sp.max_new_tokens, sp.n) == (sampling.temperature, sampling.top_p,
                                                                       sampling.max_new_tokens, n)
        assert list(sp.stop_token_ids or []) == list(sampling.stop_token_ids)
    req = types.GenerateRequest.from_json_value(api.prompt_logprob_request([4, 5, 6]))
    assert req.logprob_start_len == 0 and req.input_ids == [4, 5, 6]


def test_schema_rejects_what_it_should(types):
    """The check can fail: a misspelt sampling parameter is a contract error."""
    body = api.generate_request([1, 2], SamplingParams(), 1)
    body["sampling_params"]["max_tokens"] = 5  # the OpenAI spelling, not SGLang's
    with pytest.raises(types.JsonContractError, match="max_tokens"):
        types.SamplingParams.from_json_value(body["sampling_params"])


def test_server_generate_responses_validate(types, server):
    body = api.generate_request([5, 6, 7], SamplingParams(temperature=1.0, max_new_tokens=6), 3)
    body["logprob_start_len"] = 0
    out = server.generate(body)
    assert isinstance(out, list) and len(out) == 3
    for item in out:
        resp = types.GenerateResponse.from_json_value(item)
        meta = resp.meta_info
        assert meta.weight_version == "w0"
        assert len(meta.output_token_logprobs) == meta.completion_tokens == len(resp.output_ids)
        assert [e.token_id for e in meta.output_token_logprobs] == resp.output_ids
        assert all(e.logprob <= 0.0 for e in meta.output_token_logprobs)
        # decode_FinishReason falls back to a plain dict on a contract error: demand the typed struct
        assert isinstance(meta.finish_reason, (types.FinishStop, types.FinishLength))
        if isinstance(meta.finish_reason, types.FinishStop):
            assert resp.output_ids[-1] == 3 and meta.finish_reason.matched == 3
        else:
            assert meta.finish_reason.length == 6 == len(resp.output_ids)
        assert meta.input_token_logprobs[0].logprob is None and len(meta.input_token_logprobs) == 3
    single = server.generate(api.generate_request([5], SamplingParams(temperature=0.0, max_new_tokens=2), 1))
    assert isinstance(single, dict)
    types.GenerateResponse.from_json_value(single)
    info = types.GetModelInfoResponse.from_json_value(server.model_info())
    assert info.weight_version == "w0" and info.is_generation


def test_control_and_weight_bodies_match_io_struct(req_fields):
    bodies = {
        "InitWeightsUpdateGroupReqInput": api.init_weights_update_group_request(
            master_address="127.0.0.1", master_port=1234, rank_offset=1, world_size=3, group_name="g", backend="gloo"),
        "UpdateWeightsFromDistributedReqInput": api.update_weights_from_distributed_request(
            ["a"], ["float32"], [[2, 3]], group_name="g", load_format="flattened_bucket"),
        "UpdateWeightFromDiskReqInput": api.update_weights_from_disk_request("/tmp/x", "v1"),
        "UpdateWeightVersionReqInput": api.update_weight_version_request("v1"),
        "DestroyWeightsUpdateGroupReqInput": api.destroy_weights_update_group_request("g"),
        "GetWeightsByNameReqInput": api.get_weights_by_name_request("model.norm.weight", 4),
        "BeginWeightUpdateReqInput": api.begin_weight_update_request(),
        "EndWeightUpdateReqInput": api.end_weight_update_request(),
        "PauseGenerationReqInput": api.pause_generation_request("retract"),
        "ReleaseMemoryOccupationReqInput": api.memory_occupation_request(["weights"]),
        "ResumeMemoryOccupationReqInput": api.memory_occupation_request(None),
    }
    for cls, body in bodies.items():
        fields, required = req_fields(cls)
        assert set(body) <= set(fields), f"{cls}: unknown keys {set(body) - set(fields)}"
        assert set(required) <= set(body), f"{cls}: missing required {set(required) - set(body)}"


def test_seeded_request_is_a_valid_batch_and_the_server_honours_it(types, server):
    """Per-sample seeds: the body is a batch of n copies with one sampling_params (n = 1, its own
    sampling_seed) each, valid under SGLang's schema; the embedded server then samples each copy
    from its seed alone, so the same body gives the same rollouts after other traffic."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    body = api.generate_request([5, 6, 7], sampling, 3, seeds=[101, 202, 303])
    req = types.GenerateRequest.from_json_value(body)
    assert req.input_ids == [[5, 6, 7]] * 3
    params = [types.SamplingParams.from_json_value(sp) for sp in body["sampling_params"]]
    assert [(sp.n, sp.sampling_seed) for sp in params] == [(1, 101), (1, 202), (1, 303)]
    first = server.generate(body)
    server.generate(api.generate_request([9, 9], sampling, 4))  # unseeded traffic moves the server's generator
    again = server.generate(body)
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in first]
    assert len({tuple(o["output_ids"]) for o in first}) > 1  # three seeds, not one sample three times
    for item in first:
        types.GenerateResponse.from_json_value(item)
    with pytest.raises(ValueError, match="2 seeds for n=3"):
        api.generate_request([5], sampling, 3, seeds=[1, 2])


def test_server_refuses_one_seed_for_n_samples(server):
    from popo_mega.rollout.server import RequestError

    body = api.generate_request([5, 6], SamplingParams(max_new_tokens=2), 2)
    body["sampling_params"]["sampling_seed"] = 7
    with pytest.raises(RequestError, match="identical samples"):
        server.generate(body)
