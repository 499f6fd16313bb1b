"""Batched sampling with a KV cache on a ``transformers`` causal LM: the embedded server's engine room.

Log-probs follow SGLang's default sampler (``srt/layers/sampler.py``, no RL on-policy flags):
the returned log-prob of a sampled token is ``log_softmax(logits / T)`` over the FULL vocabulary,
i.e. before top-p truncation, and ``log_softmax(logits)`` for greedy requests (T == 0). The trainer
recomputes the same quantity from its own logits, so the two agree to fp32 rounding.

Sampling is by inverse CDF over the (top-p truncated) sorted distribution, one uniform number per
row and token. A request that carries SGLang's ``sampling_seed`` draws its uniforms from its own
``random.Random(seed)``, so its sample depends on the seed and the logits only, not on which other
requests shared its batch or on the server's history: a restarted server, or a trainer at another
TP/PP layout, samples the same rollouts (up to logits rounding at a CDF boundary). Unseeded rows
draw from the server's generator.

Simplification (documented, not hidden): static batching. A batch is prefilled together (left
padding, explicit position ids) and decoded until every member has finished; rows that finished
early keep feeding a pad token whose outputs are ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-6  # SGLang treats temperature below this as greedy


@dataclass
class SequenceRequest:
    """One sequence to sample. ``prompt``: [P] ids. Filled in by ``generate_batch``."""

    prompt: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: frozenset[int] = frozenset()
    logprob_start_len: int = -1
    seed: int | None = None  # SGLang's sampling_seed: the row's own uniform stream
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    finish: tuple[str, int | None] = ("length", None)  # (type, matched token or length)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None, uniforms: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return it with its SGLang-style log-prob.

    logits: [B, V] (any float dtype; computed in fp32), temperature: [B], top_p: [B],
    uniforms: [B] in [0, 1) (float64), one per row; drawn from ``generator`` when None.
    Row b takes the first token, in descending-probability order, whose cumulative kept mass
    exceeds uniforms[b] times the kept total (inverse CDF).
    Returns (tokens [B] int64, logprobs [B] fp32) with logprobs = log_softmax(logits / T)[token]
    (T == 0 rows: argmax and log_softmax(logits)[token]).
    """
    logits = logits.float()
    greedy = temperature < GREEDY_EPS
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)
    probs = logp.exp()
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    drop = (cum - sorted_p) > top_p[:, None].float()  # keep the smallest prefix whose mass reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64, device=logits.device)
    kept_cdf = sorted_p.double().cumsum(dim=-1)
    target = (uniforms.to(kept_cdf)[:, None] * kept_cdf[:, -1:])
    last_kept = (~drop).sum(dim=-1, keepdim=True) - 1
    pick = torch.searchsorted(kept_cdf, target, right=True).clamp(max=last_kept).squeeze(-1)
    sampled = order.gather(-1, pick[:, None]).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


@torch.no_grad()
def generate_batch(model, seqs: list[SequenceRequest], *, pad_token_id: int, eos_token_ids: frozenset[int],
                   generator: torch.Generator | None, device: torch.device) -> None:
    """Sample every sequence of ``seqs`` in place (output_ids, output_logprobs, finish, input_logprobs).

    Rows with a ``seed`` draw their uniforms from ``random.Random(seed)``, the others from ``generator``.
    A sequence stops at its ``max_new_tokens`` (finish ("length", n)), or after emitting a token in
    ``stop_token_ids`` or ``eos_token_ids`` (finish ("stop", token); the token is kept, as in SGLang).
    """
    from transformers import DynamicCache

    batch = len(seqs)
    width = max(len(s.prompt) for s in seqs)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s.prompt):] = torch.tensor(s.prompt, dtype=torch.long)
        mask[i, width - len(s.prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
    for i, s in enumerate(seqs):
        if s.logprob_start_len >= 0:  # prompt log-probs, [None] for the first prompt token as SGLang does
            start = width - len(s.prompt)
            logp = torch.log_softmax(out.logits[i, start:-1].float(), dim=-1)
            given = logp.gather(-1, ids[i, start + 1:, None]).squeeze(-1).tolist()
            s.input_logprobs = ([None] + given)[s.logprob_start_len:]
    temperature = torch.tensor([s.temperature for s in seqs], device=device)
    top_p = torch.tensor([s.top_p for s in seqs], device=device)
    active = [s.max_new_tokens > 0 for s in seqs]
    for i, s in enumerate(seqs):
        if not active[i]:
            s.finish = ("length", 0)
    logits = out.logits[:, -1]
    position = position[:, -1:]
    own = {i: random.Random(s.seed) for i, s in enumerate(seqs) if s.seed is not None}
    while any(active):
        uniforms = torch.rand(batch, generator=generator, dtype=torch.float64)
        for i, rng in own.items():
            uniforms[i] = rng.random()
        tokens, logps = sample_next(logits, temperature, top_p, generator, uniforms.to(device))
        tokens_l, logps_l = tokens.tolist(), logps.tolist()
        for i, s in enumerate(seqs):
            if not active[i]:
                continue
            s.output_ids.append(tokens_l[i])
            s.output_logprobs.append(logps_l[i])
            if tokens_l[i] in s.stop_token_ids or tokens_l[i] in eos_token_ids:
                s.finish, active[i] = ("stop", tokens_l[i]), False
            elif len(s.output_ids) >= s.max_new_tokens:
                s.finish, active[i] = ("length", s.max_new_tokens), False
        if not any(active):
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        position = position + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True)
        logits = out.logits[:, -1]
