"""The rollout-engine interface: what the trainer and the evaluator need from a generator.

Two real implementations speak the same SGLang HTTP API behind it: SGLang servers (GPU clusters)
and the embedded server (``popo-rollout-server``; CPU machines and tests). Prompts and responses
are token ids; text is the caller's business (it owns the tokenizer and the template).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """SGLang ``sampling_params`` subset used here (names as SGLang spells them).

    seed: when set, the engine gives the j-th sample of the i-th prompt of a ``generate`` call its
    own SGLang ``sampling_seed``, ``sample_seed(seed, i, j)``, so that the same call samples the
    same rollouts on a restarted or re-batched server (SGLang honours it with
    ``--enable-deterministic-inference``; the embedded server always does).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


def sample_seed(*parts: int) -> int:
    """A non-negative 63-bit seed mixed from integers (blake2b; stable across processes and runs)."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Completion:
    """One sampled response to one prompt.

    output_ids:       [L] sampled token ids (the stop token included when generation stopped on it)
    output_logprobs:  [L] log-prob of each sampled token under the engine's weights at sampling time,
                      as SGLang returns them in ``meta_info.output_token_logprobs``
    finish_reason:    "stop" or "length" (SGLang's ``finish_reason.type``)
    weight_version:   the engine's weight version when the response finished (its last token's)
    meta:             from ``meta_info``: ``id``, ``prompt_tokens``, ``num_retractions`` (times a
                      "retract" pause recomputed the row) and ``weight_versions``: SGLang 0.5.23's
                      spans ``[{"version": str, "start": int, "end": int}, ...]``, contiguous from 0,
                      token ``t`` sampled by the version whose ``start <= t < end``; several spans when
                      a weight sync happened while the response was sampled (a partial rollout);
                      None when the server sends none (``versions_of``)
    """

    output_ids: list[int]
    output_logprobs: list[float]
    finish_reason: str
    weight_version: str | None = None
    meta: dict = field(default_factory=dict)


def versions_of(completion: Completion) -> list[str]:
    """The distinct weight versions that sampled ``completion``'s tokens, in the order they did.

    From ``meta["weight_versions"]`` (SGLang's spans, see ``Completion``): one entry for a response
    sampled by one version, ``["v3", "v4"]`` for one whose first tokens came from v3 and the rest
    from v4 (a weight sync while it was in flight). Spans of zero tokens count only when they are
    all there is (a response with no tokens keeps its one span, as SGLang does). Without spans (a
    server that sends none) it is ``[weight_version]``, or ``[]`` when that is unknown too.
    """
    spans = completion.meta.get("weight_versions") if completion.meta else None
    if not spans:
        return [] if completion.weight_version is None else [completion.weight_version]
    used = [s for s in spans if s["end"] > s["start"]] or spans[:1]
    out: list[str] = []
    for span in used:
        if span["version"] not in out:
            out.append(span["version"])
    return out


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, n: int = 1) -> list[list[Completion]]:
        """Sample ``n`` responses per prompt; result[i][j] is the j-th response to prompts[i]."""

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Replace the engine's weights by HF-named tensors and set its weight version."""

    def weight_version(self) -> str | None:
        """The version of the weights the engine serves now."""

    def close(self) -> None:
        """Stop what this engine launched (servers it attached to are left running)."""
