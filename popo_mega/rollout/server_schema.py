"""The embedded server's ``/generate`` body, checked per request before anything reaches the batch.

A bad field is a :class:`RequestError` (HTTP 400) whose message starts with the field's path
(``sampling_params.temperature: ...``, ``input_ids.0.3: ...``), so one bad request fails alone and
never the batch it would have joined (issue 15: ``logprob_start_len: "x"`` used to fail four other
clients' requests with 500).

Types follow SGLang 0.5.23's own schema, ``sglang/api/v1/api_types.py`` (``GenerateRequest``: unknown
top-level keys ignored; ``SamplingParams``: unknown keys rejected; integers are never booleans).
Ranges follow ``SamplingParams.verify`` (``srt/sampling/sampling_params.py``: temperature finite and
>= 0, top_p in (0, 1], max_new_tokens >= 0, sampling_seed in int64), and the context length check of
``TokenizerManager._validate_one_request`` (an input of ``context_len`` tokens or more, or input +
max_new_tokens above ``context_len``, is rejected; ``allow_auto_truncate`` is off by default). The
scheduler then caps max_new_tokens at ``max_req_len - input - 1`` with ``max_req_len = context_len - 1``
(``Scheduler._init_req_max_new_tokens``), which :func:`parse_generate` does as well.

Stricter than SGLang, by design of a CPU stand-in: ``n`` times the prompts is capped
(``max_sequences``: SGLang's bound is its KV memory, ours would be the host's RAM: ``n: 1000000`` took
3 GB), SGLang sampling parameters this server does not implement are rejected unless they have
their no-op value (instead of being silently ignored), and ``stream: true`` is rejected (no streaming).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
SGLANG_TOP_K_ALL = 1 << 30  # api_types.SamplingParams.top_k default: every id


class RequestError(Exception):
    """A bad request body: answered with HTTP 400 and the message (which names the field)."""


def context_length(config) -> int:
    """The model's context length as SGLang derives it (``hf_transformers/common.get_context_length``):
    the first of ``CONTEXT_LENGTH_KEYS`` the config has, times the rope-scaling factor unless the
    scaling keeps ``original_max_position_embeddings`` or is llama3's; 2048 when none is set."""
    rope = getattr(config, "rope_scaling", None) or {}
    factor = rope.get("factor", 1) if rope else 1
    if "original_max_position_embeddings" in rope or rope.get("rope_type") == "llama3":
        factor = 1
    for key in ("max_sequence_length", "seq_length", "max_seq_len", "model_max_length", "max_position_embeddings"):
        value = getattr(config, key, None)
        if value is not None:
            return int(factor * value)
    return 2048


Int64 = Annotated[int, Field(strict=True, ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class SamplingParamsBody(BaseModel):
    """One ``sampling_params`` object: SGLang's field set (unknown keys are 400 as in SGLang)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: Optional[Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]] = 128
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[Int64]] = None  # api_types Int64List: any int64 (one outside the vocab never matches)
    stop_regex: Optional[Union[str, list[str]]] = None
    temperature: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0.0)]] = 1.0
    top_p: Optional[Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0.0, le=1.0)]] = 1.0
    top_k: Optional[Int64] = SGLANG_TOP_K_ALL
    min_p: Optional[FiniteFloat] = 0.0
    frequency_penalty: Optional[FiniteFloat] = 0.0
    presence_penalty: Optional[FiniteFloat] = 0.0
    repetition_penalty: Optional[FiniteFloat] = 1.0
    min_new_tokens: Optional[Int64] = 0
    n: Optional[Annotated[int, Field(strict=True, ge=1, le=INT64_MAX)]] = 1
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[str] = None
    ignore_eos: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True            # text only: no effect on token ids
    spaces_between_special_tokens: Optional[bool] = True  # text only
    no_stop_trim: Optional[bool] = False                  # text only
    stream_interval: Optional[Int64] = None               # streaming only
    logit_bias: Optional[dict[str, FiniteFloat]] = None
    sampling_seed: Optional[Int64] = None
    custom_params: Optional[Any] = None
    beam_width: Optional[Int64] = None
    watermark: Optional[dict] = None
    choice: Optional[list[str]] = None


# SGLang parameters this server does not implement: accepted only at their no-op value.
_NO_OP = {
    "stop_regex": lambda v: not v, "top_k": lambda v: v in (None, -1, SGLANG_TOP_K_ALL),
    "min_p": lambda v: not v, "frequency_penalty": lambda v: not v, "presence_penalty": lambda v: not v,
    "repetition_penalty": lambda v: v in (None, 1.0), "min_new_tokens": lambda v: not v,
    "json_schema": lambda v: v is None, "regex": lambda v: v is None, "ebnf": lambda v: v is None,
    "structural_tag": lambda v: v is None, "logit_bias": lambda v: not v, "custom_params": lambda v: v is None,
    "beam_width": lambda v: v is None, "watermark": lambda v: not v, "choice": lambda v: not v,
}


class GenerateTop(BaseModel):
    """The top-level keys this server reads (others are ignored, as ``GenerateRequest`` does).
    ``input_ids``/``sampling_params`` are checked per prompt by :func:`parse_generate`."""

    model_config = ConfigDict(extra="ignore", strict=True)

    rid: Optional[Union[str, list[str]]] = None
    text: Optional[Any] = None
    input_ids: Optional[list[Any]] = None
    stream: Optional[bool] = False
    sampling_params: Optional[Union[dict, list[Any]]] = None
    return_logprob: Optional[Union[bool, list[bool]]] = None
    logprob_start_len: Optional[Union[Int64, list[Int64]]] = None
    top_logprobs_num: Optional[Union[Int64, list[Int64]]] = None
    token_ids_logprob: Optional[list[Any]] = None
    return_hidden_states: Optional[Union[bool, list[bool]]] = None


@dataclass(frozen=True)
class PromptPlan:
    """One prompt of a /generate request, checked: its ``n`` sequences share everything here."""

    prompt: list[int]
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    sampling_seed: int | None
    return_logprob: bool
    logprob_start_len: int


@dataclass(frozen=True)
class GeneratePlan:
    """A checked /generate request."""

    prompts: list[PromptPlan]
    rid: str | None

    @property
    def sequences(self) -> int:
        return sum(p.n for p in self.prompts)


def _where(prefix: str, err: dict) -> str:
    """The field path of a pydantic error: its loc without the union members and constraint kinds
    pydantic puts there ("bool", "list[int]", "constrained-int"); an unknown key keeps its name."""
    loc = err["loc"]
    known = set(GenerateTop.model_fields) | set(SamplingParamsBody.model_fields)
    parts = [prefix] if prefix else []
    for i, p in enumerate(loc):
        if isinstance(p, int) or p in known or (err["type"] == "extra_forbidden" and i == len(loc) - 1):
            parts.append(str(p))
    return ".".join(parts) or "body"


def _validate(model, value, prefix: str):
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        got = err.get("input")
        shown = repr(got) if isinstance(got, (bool, int, float, str, type(None))) else type(got).__name__
        raise RequestError(f"{_where(prefix, err)}: {err['msg']} (got {shown[:80]})") from None


def _per_prompt(value, count: int, field: str, default):
    """A field that is one value for every prompt or a list with one per prompt."""
    if value is None:
        return [default] * count
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{field}: {len(value)} values for {count} prompts")
        return [default if v is None else v for v in value]
    return [value] * count


def parse_generate(body: Any, *, vocab_size: int, context_len: int, max_sequences: int) -> GeneratePlan:
    """Check a parsed /generate body; raise :class:`RequestError` naming the first bad field.

    input_ids: [P] ids or a list of such lists (P >= 1, ids in [0, vocab_size)).
    Returns the plan with max_new_tokens capped as SGLang's scheduler does (see the module doc).
    """
    if not isinstance(body, dict):
        raise RequestError(f"body: must be a JSON object, got {type(body).__name__}")
    top = _validate(GenerateTop, body, "")
    if top.text is not None:
        raise RequestError("text: this server has no tokenizer; send input_ids")
    if top.input_ids is None:
        raise RequestError("input_ids: required (this server has no tokenizer; text is not accepted)")
    if top.stream:
        raise RequestError("stream: streaming is not supported by this server")
    for field in ("top_logprobs_num", "token_ids_logprob", "return_hidden_states"):
        value = getattr(top, field)
        if value not in (None, 0, False, []) and not (isinstance(value, list) and not any(value)):
            raise RequestError(f"{field}: not supported by this server (got {value!r})")
    ids = top.input_ids
    single = bool(ids) and not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    if not prompts:
        raise RequestError("input_ids: must not be empty")
    for i, prompt in enumerate(prompts):
        where = "input_ids" if single else f"input_ids.{i}"
        if not isinstance(prompt, list) or not prompt:
            raise RequestError(f"{where}: must be a non-empty list of token ids")
        for j, t in enumerate(prompt):
            if not isinstance(t, int) or isinstance(t, bool):
                raise RequestError(f"{where}.{j}: token id must be an integer, got {t!r:.40}")
            if not 0 <= t < vocab_size:
                raise RequestError(f"{where}.{j}: token id {t} outside the vocabulary [0, {vocab_size})")
        if len(prompt) >= context_len:  # TokenizerManager._validate_one_request
            raise RequestError(f"{where}: the input ({len(prompt)} tokens) is longer than the model's context "
                               f"length ({context_len} tokens)")
    count = len(prompts)
    raw_sp = top.sampling_params
    broadcast = not isinstance(raw_sp, list)
    raw_list = _per_prompt(raw_sp, count, "sampling_params", {})
    returns = _per_prompt(top.return_logprob, count, "return_logprob", False)
    starts = _per_prompt(top.logprob_start_len, count, "logprob_start_len", -1)
    plans = []
    for i, (prompt, sp_raw, ret, start) in enumerate(zip(prompts, raw_list, returns, starts)):
        where = "sampling_params" if broadcast else f"sampling_params.{i}"
        sp = _validate(SamplingParamsBody, sp_raw, where)
        for key, no_op in _NO_OP.items():
            if key in sp.model_fields_set and not no_op(getattr(sp, key)):
                raise RequestError(f"{where}.{key}: not supported by this server (got {getattr(sp, key)!r:.60}); "
                                   "only its no-op value is accepted")
        if sp.stop:
            raise RequestError(f"{where}.stop: string stops need a tokenizer; use stop_token_ids")
        n = 1 if sp.n is None else sp.n
        if plans and n != plans[0].n:  # GenerateReqInput._normalize_parallel_sampling
            raise RequestError(f"{where}.n: {n} differs from the first prompt's {plans[0].n} (SGLang needs one n "
                               "for every prompt of a request)")
        if n > max_sequences:
            raise RequestError(f"{where}.n: {n} samples exceed this server's limit of {max_sequences} "
                               "sequences per request (--max-sequences-per-request)")
        budget = context_len - len(prompt)
        new = budget if sp.max_new_tokens is None else sp.max_new_tokens
        if new > budget:  # TokenizerManager._validate_one_request (validate_total_tokens)
            raise RequestError(f"{where}.max_new_tokens: the request's {len(prompt)} input + {new} new tokens "
                               f"exceed the model's context length of {context_len} tokens")
        new = max(0, min(new, context_len - 1 - len(prompt) - 1))  # Scheduler: max_req_len - input - 1
        start_where = "logprob_start_len" if not isinstance(top.logprob_start_len, list) else f"logprob_start_len.{i}"
        if ret and not -1 <= start <= len(prompt):  # Scheduler: above the input length is an abort
            raise RequestError(f"{start_where}: {start} outside [-1, {len(prompt)}] (the input has {len(prompt)} tokens)")
        temperature = 1.0 if sp.temperature is None else float(sp.temperature)
        top_p = 1.0 if sp.top_p is None else float(sp.top_p)
        plans.append(PromptPlan(prompt=list(prompt), n=n, temperature=temperature, top_p=top_p, max_new_tokens=new,
                                stop_token_ids=frozenset(sp.stop_token_ids or ()), ignore_eos=bool(sp.ignore_eos),
                                sampling_seed=sp.sampling_seed, return_logprob=bool(ret),
                                logprob_start_len=start if ret else -1))
    plan = GeneratePlan(prompts=plans, rid=top.rid if isinstance(top.rid, str) else None)
    if plan.sequences > max_sequences:
        raise RequestError(f"sampling_params.n: {plan.sequences} sequences (prompts x n) exceed this server's limit "
                           f"of {max_sequences} per request (--max-sequences-per-request)")
    return plan


def json_number(value: float | None) -> float | None:
    """A log-prob as JSON can carry it: NaN and +-inf become null, as SGLang's ORJSONResponse
    writes them (orjson serialises non-finite floats as null; ``LogprobEntry.logprob`` is optional)."""
    if value is None or not math.isfinite(value):
        return None
    return value
