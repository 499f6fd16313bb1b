"""The JSON bodies of SGLang's native HTTP API, as the client sends and the embedded server answers them.

Field names and shapes follow SGLang 0.5.23 (``srt/entrypoints/http_server.py``,
``srt/managers/io_struct.py``, ``api/v1/api_types.py``); the tests validate both directions against
SGLang's own schema module. Only what the rollout engine needs is built here:

- ``/generate`` request: ``input_ids`` (one prompt), ``sampling_params`` (temperature, top_p,
  max_new_tokens, stop_token_ids, n), ``return_logprob``; optional ``logprob_start_len``.
- ``/generate`` response: one object (n == 1) or a list of n objects, each with ``output_ids`` and
  ``meta_info`` = {id, prompt_tokens, completion_tokens, finish_reason: {"type": "stop"|"length"|
  "abort", ...}, output_token_logprobs: [[logprob, token_id, text|None], ...], weight_version,
  weight_versions: [{version, start, end}, ...] over the output tokens (SGLang 0.5.23
  ``srt/utils/weight_versions.py``; a request that spanned a weight update has several spans), kept in
  ``Completion.meta["weight_versions"]``}.
"""

from __future__ import annotations

from typing import Any, Sequence

from popo_mega.rollout.engine import Completion, SamplingParams


class ProtocolError(ValueError):
    """A server answered with a body that does not follow SGLang's /generate contract."""


def generate_request(prompt_ids: Sequence[int], sampling: SamplingParams, n: int = 1, *,
                     return_logprob: bool = True, logprob_start_len: int | None = None,
                     rid: str | None = None, seeds: Sequence[int] | None = None) -> dict:
    """The ``/generate`` body for ``n`` samples of one tokenised prompt.

    prompt_ids: [P] token ids (P >= 1). ``n`` goes into ``sampling_params.n`` as SGLang expects.
    seeds: [n] per-sample ``sampling_seed``s. One seed cannot serve n > 1 samples (they would all
    be equal), so a seeded body is a batch: the prompt n times, one sampling_params with n = 1 and
    its own seed each; the response is the same list of n objects.
    """
    if len(prompt_ids) == 0:
        raise ValueError("generate_request: empty prompt (input_ids needs at least one token)")
    if n < 1:
        raise ValueError(f"generate_request: n must be >= 1, got {n}")
    params: dict[str, Any] = {
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "max_new_tokens": int(sampling.max_new_tokens),
        "n": int(n),
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
    body: dict[str, Any] = {"input_ids": [int(t) for t in prompt_ids], "sampling_params": params,
                            "return_logprob": bool(return_logprob)}
    if seeds is not None:
        if len(seeds) != n:
            raise ValueError(f"generate_request: {len(seeds)} seeds for n={n} samples")
        body["input_ids"] = [body["input_ids"]] * n
        body["sampling_params"] = [{**params, "n": 1, "sampling_seed": int(s)} for s in seeds]
    if logprob_start_len is not None:
        body["logprob_start_len"] = int(logprob_start_len)
    if rid is not None:
        body["rid"] = rid
    return body


def _one_completion(obj: Any, where: str) -> Completion:
    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise ProtocolError(f"{where}: expected an object with 'meta_info', got {type(obj).__name__}")
    meta = obj["meta_info"]
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list):
        raise ProtocolError(f"{where}: meta_info.output_token_logprobs is missing (was return_logprob sent?)")
    try:
        logprobs = [float(e[0]) for e in entries]
        ids = [int(e[1]) for e in entries]
    except (TypeError, IndexError, ValueError) as exc:
        raise ProtocolError(f"{where}: output_token_logprobs entries must be [logprob, token_id, text]: {exc}") from None
    output_ids = obj.get("output_ids")
    if output_ids is not None and [int(t) for t in output_ids] != ids:
        raise ProtocolError(f"{where}: output_ids disagree with the token ids in output_token_logprobs")
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind not in ("stop", "length", "abort"):
        raise ProtocolError(f"{where}: meta_info.finish_reason must be an object with type stop|length|abort, got {finish!r}")
    if kind == "abort":
        raise ProtocolError(f"{where}: the server aborted the request: {finish.get('message')}")
    return Completion(output_ids=ids, output_logprobs=logprobs, finish_reason=kind,
                      weight_version=meta.get("weight_version"),
                      meta={"id": meta.get("id"), "prompt_tokens": meta.get("prompt_tokens"),
                            "num_retractions": meta.get("num_retractions"),
                            "weight_versions": _weight_version_spans(meta.get("weight_versions"), len(ids), where)})


def _weight_version_spans(spans: Any, tokens: int, where: str) -> list[dict] | None:
    """``meta_info.weight_versions`` checked (None when absent): SGLang's spans are contiguous from
    token 0 (``compute_weight_version_spans`` starts each where the previous ended;
    ``add_weight_versions_to_meta_info`` clips them to the output), so a span list that is not says
    the server is not speaking SGLang's protocol and ``engine.versions_of`` would misreport a
    rollout's versions."""
    if spans is None:
        return None
    bad = ProtocolError(f"{where}: meta_info.weight_versions must be a list of {{version: str, start: int, end: int}} "
                        f"contiguous from 0 over the {tokens} output tokens, got {spans!r:.200}")
    if not isinstance(spans, list) or not spans:
        raise bad
    out, at = [], 0
    for span in spans:
        if not isinstance(span, dict) or not isinstance(span.get("version"), str):
            raise bad
        start, end = span.get("start"), span.get("end")
        if (not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool)
                or isinstance(end, bool) or start != at or end < start or end > tokens):
            raise bad
        out.append({"version": span["version"], "start": start, "end": end})
        at = end
    return out


def completions_from_response(body: Any, n: int, where: str = "/generate") -> list[Completion]:
    """Parse a ``/generate`` response to one prompt with ``n`` samples into n Completions."""
    items = body if isinstance(body, list) else [body]
    if len(items) != n:
        raise ProtocolError(f"{where}: expected {n} responses, got {len(items)}")
    return [_one_completion(item, f"{where}[{i}]") for i, item in enumerate(items)]


def finish_reason(kind: str, *, matched: int | None = None, length: int | None = None,
                  message: str | None = None) -> dict:
    """SGLang's ``meta_info.finish_reason`` object (``FinishStop`` / ``FinishLength`` / ``FINISH_ABORT.to_json``,
    ``srt/managers/schedule_batch.py:332``)."""
    if kind == "stop":
        return {"type": "stop", "matched": matched}
    if kind == "length":
        return {"type": "length", "length": length}
    if kind == "abort":
        return {"type": "abort", "message": message or "Aborted", "status_code": None, "err_type": None}
    raise ValueError(f"finish_reason: unknown kind {kind!r}")


def prompt_logprob_request(prompt_ids: Sequence[int]) -> dict:
    """``/generate`` body that returns the log-probs of the prompt itself (``input_token_logprobs``)."""
    return {"input_ids": [int(t) for t in prompt_ids], "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}


# ---- control and weight-update bodies (io_struct.*ReqInput in SGLang) ----

def init_weights_update_group_request(*, master_address: str, master_port: int, rank_offset: int,
                                      world_size: int, group_name: str, backend: str) -> dict:
    """``InitWeightsUpdateGroupReqInput``."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def update_weights_from_distributed_request(names: list[str], dtypes: list[str], shapes: list[list[int]], *,
                                            group_name: str, load_format: str | None) -> dict:
    """``UpdateWeightsFromDistributedReqInput`` (the version is set afterwards, see weight_sync)."""
    body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "flush_cache": False, "abort_all_requests": False}
    if load_format:
        body["load_format"] = load_format
    return body


def begin_weight_update_request(selector: str = "all") -> dict:
    """``BeginWeightUpdateReqInput``: opens the window outside which SGLang 0.5.23 rejects
    ``/update_weights_from_distributed`` (and ``_from_tensor``)."""
    if selector not in ("target", "draft", "all"):
        raise ValueError(f"begin_weight_update: selector must be target|draft|all, got {selector!r}")
    return {"selector": selector}


def end_weight_update_request() -> dict:
    """``EndWeightUpdateReqInput`` (no fields): closes the window, finalises the loaded weights."""
    return {}


def update_weights_from_disk_request(model_path: str, weight_version: str) -> dict:
    """``UpdateWeightFromDiskReqInput``."""
    return {"model_path": model_path, "weight_version": str(weight_version), "abort_all_requests": False,
            "flush_cache": True}


def update_weight_version_request(version: str) -> dict:
    """``UpdateWeightVersionReqInput``."""
    return {"new_version": str(version), "abort_all_requests": False}


def destroy_weights_update_group_request(group_name: str) -> dict:
    """``DestroyWeightsUpdateGroupReqInput``."""
    return {"group_name": group_name}


def get_weights_by_name_request(name: str, truncate_size: int) -> dict:
    """``GetWeightsByNameReqInput``."""
    return {"name": name, "truncate_size": int(truncate_size)}


def pause_generation_request(mode: str) -> dict:
    """``PauseGenerationReqInput`` (mode: abort | retract | in_place)."""
    if mode not in ("abort", "retract", "in_place"):
        raise ValueError(f"pause_generation: mode must be abort|retract|in_place, got {mode!r}")
    return {"mode": mode}


def memory_occupation_request(tags: list[str] | None) -> dict:
    """``ReleaseMemoryOccupationReqInput`` / ``ResumeMemoryOccupationReqInput``."""
    return {"tags": list(tags)} if tags else {}


def update_weights_from_tensor_request(serialized_per_tp_rank: list[str], *, load_format: str | None = None) -> dict:
    """``UpdateWeightsFromTensorReqInput`` (SGLang 0.5.23 ``managers/io_struct.py``): one base64
    ``MultiprocessingSerializer`` payload per TP rank of the server (``TpModelWorker.deserialize_own_rank``
    reads entry ``tp_rank`` only); the cache is flushed once after the whole sync and the version set
    afterwards, as for ``/update_weights_from_distributed``."""
    if not serialized_per_tp_rank or not all(isinstance(s, str) for s in serialized_per_tp_rank):
        raise ValueError("update_weights_from_tensor: one base64 string per TP rank")
    body = {"serialized_named_tensors": list(serialized_per_tp_rank), "flush_cache": False,
            "abort_all_requests": False}
    if load_format:
        body["load_format"] = load_format
    return body
