"""Batched sampling with a KV cache on a ``transformers`` causal LM: the embedded server's engine room.

Log-probs follow SGLang's default sampler (``srt/layers/sampler.py``, no RL on-policy flags):
the returned log-prob of a sampled token is ``log_softmax(logits / T)`` over the FULL vocabulary,
i.e. before top-p truncation, and ``log_softmax(logits)`` for greedy requests (T == 0). The trainer
recomputes the same quantity from its own logits, so the two agree to fp32 rounding.

Sampling draws from the kept probabilities (all ids at top_p = 1, the top-p nucleus otherwise) with
one uniform number and one noise key per row and token (``sample_ids``: the block of ids by inverse
CDF, the id inside it by Gumbel-max). A request that carries SGLang's ``sampling_seed`` draws both
from its own ``random.Random(seed)``, so its sample depends on the seed and the logits only, not on
which other requests shared its batch or on the server's history: a restarted server, or a trainer
at another TP/PP layout, samples the same rollouts. Logits move in their last bits with the batch;
the sampler is built so that this rarely changes a pick even at 151,936 ids (``sample_ids`` says
why; a plain inverse CDF over ids sorted by probability changed most 24-token seeded samples of a
tiny Qwen2.5-vocabulary model). Unseeded rows draw from the server's generator.

Speed, against ``transformers`` ``generate`` on the same model (``benchmarks/rollout.py``): the
prompt pass computes logits only at the positions whose log-probs were asked for (``logits_to_keep``),
and sampling is one fused softmax plus one pass over [B, V] for the block masses (no sort of the
vocabulary: a partial sort, ``torch.topk``, finds the nucleus when top_p < 1), where
``torch.multinomial`` draws an exponential per vocabulary entry.

Batching: a finished row leaves the batch at once (its K/V rows are dropped), and sequences that
arrive while a batch runs join it between decode steps (``admit``: prefilled on their own, then
left-padded into the running K/V cache). Simplification against SGLang: no paged KV cache, so
joining copies the cache; the prompt pass of a joining group is not chunked.

Pausing (SGLang's ``/pause_generation``, see ``server.py``): ``generate_batch`` calls ``pause(rows)``
between decode steps, after the rows' last sampled tokens are recorded and before the forward pass
that feeds those tokens to the model. The callback may block there (SGLang's ``in_place``: the
rows keep their K/V cache, and the next forward, on whatever weights the model holds by then,
computes the logits of their next token), or return True (``retract``: the batch stops and its
unfinished rows are returned; fed back in later, a row is prefilled again from its prompt plus
the tokens it has, so its K/V cache and next logits are recomputed on the weights of that time).
A row's own random stream (``rng``) lives on the row, so a retracted seeded row continues its
stream instead of restarting it. A row with ``abort_message`` set finishes ("abort", message)
after its next token, as SGLang's ``req.to_finish = FINISH_ABORT()`` (``Scheduler.abort_request``:
"the request will still run one decode forward pass").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-6  # SGLang treats temperature below this as greedy
CDF_BLOCK = 512    # ids per block of the two-level search ([B, 512] ops stay below torch's parallel grain)
NUCLEUS_FIRST_K = 64  # first partial-sort width when looking for a top-p nucleus (doubled until it fits)


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
    ignore_eos: bool = False  # SGLang's ignore_eos: no token-based stop at all (EOS nor stop_token_ids)
    cancelled: bool = False   # set from another thread (its client left): the row leaves at the next step
    abort_message: str | None = None  # set by a pause in "abort" mode: the row ends after its next token
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    finish: tuple[str, int | str | None] = ("length", None)  # (type, matched token, length or abort message)
    rng: random.Random | None = None  # the seeded row's own stream (made from ``seed`` at its first prefill)
    version_events: list[tuple[str, int]] = field(default_factory=list)  # (old version, tokens made before it changed)
    retractions: int = 0      # times a pause in "retract" mode sent the row back to the queue

    @property
    def fill(self) -> list[int]:
        """The ids a prefill of this row runs on: [P + len(output_ids)] (SGLang's ``fill_ids``)."""
        return self.prompt + self.output_ids


def nucleus_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which ids each row keeps under top-p: [R, V] bool from probs [R, V] (rows sum to 1), top_p [R].

    As SGLang (``probs_sum - probs_sort > top_p`` is dropped): in descending-probability order an id
    is kept when the mass before it is at most top_p. Found with ``torch.topk`` of width k, doubled
    until the k kept candidates hold more than top_p (then every id past them is dropped) or k = V.
    """
    rows, vocab = probs.shape
    k = min(NUCLEUS_FIRST_K, vocab)
    while True:
        values, ids = probs.topk(k, dim=-1)
        before = values.cumsum(dim=-1) - values  # mass before each candidate
        if k == vocab or bool((before[:, -1] + values[:, -1] > top_p).all()):
            break
        k = min(2 * k, vocab)
    keep = before <= top_p[:, None]
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, ids, keep)


def sample_ids(weights: torch.Tensor, uniforms: torch.Tensor, keys: torch.Tensor, block: int = CDF_BLOCK
               ) -> torch.Tensor:
    """One id per row, id i of row b with probability weights[b, i] / weights[b].sum().

    weights: [B, V] >= 0 with a positive total per row; uniforms: [B] in [0, 1) (float64);
    keys: [B] int64 seeds of the in-block noise. Returns [B] int64; an id of zero weight never.

    Two levels: the block of ``block`` consecutive ids is the first whose cumulative mass exceeds
    uniforms[b] times the total (inverse CDF over block masses, float64); the id inside it is a
    Gumbel-max draw, argmax(log w_i - log E_i) with E_i = -log U_i, U_i ~ U(0, 1) from a generator
    seeded with keys[b]. Why not one inverse CDF over the ids: the logits of one row move in their
    last bits with the batch it shares (padding, matmul shapes), and a CDF boundary moved by that
    much swaps the pick with probability ~ (CDF error) / (probability of the picked id), which at
    151,936 ids of ~1e-5 each made seeded samples depend on the batch. A block of 512 ids holds
    ~1/300 of the mass and the Gumbel-max pick flips only when two perturbed scores come within the
    rounding error, so both levels are stable. ``block`` = 1 is a plain inverse CDF.
    """
    rows, vocab = weights.shape
    full = vocab // block * block
    masses = [weights[:, :full].reshape(rows, -1, block).sum(-1)] if full else []
    if full < vocab:
        masses.append(weights[:, full:].sum(-1, keepdim=True))
    block_cdf = torch.cat(masses, dim=-1).double().cumsum(dim=-1)  # [B, ceil(V / block)]
    target = uniforms.to(block_cdf)[:, None] * block_cdf[:, -1:]
    last_block = (block_cdf < block_cdf[:, -1:]).sum(-1, keepdim=True)  # the last block with mass
    which = torch.searchsorted(block_cdf, target, right=True).clamp(max=last_block)
    ids = which * block + torch.arange(block, device=weights.device)  # [B, block]
    inside = weights.gather(-1, ids.clamp(max=vocab - 1)).masked_fill(ids >= vocab, 0.0).double()
    if block == 1:
        return ids.squeeze(-1)
    exp_noise = torch.stack([torch.rand(block, generator=torch.Generator().manual_seed(int(k)), dtype=torch.float64)
                             for k in keys.tolist()]).to(inside.device).log().neg()  # E_i = -log U_i
    pick = (inside / exp_noise).argmax(dim=-1, keepdim=True)  # = argmax(log w_i - log E_i), without the logs
    return ids.gather(-1, pick).squeeze(-1)


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None, uniforms: torch.Tensor | None = None,
                keys: torch.Tensor | None = None, block: int = CDF_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return it with its SGLang-style log-prob.

    logits: [B, V] (any float dtype; computed in fp32), temperature: [B], top_p: [B],
    uniforms: [B] in [0, 1) (float64) and keys: [B] int64, the row's randomness for this token
    (``sample_ids``); drawn from ``generator`` when None.
    Row b keeps every id when top_p[b] == 1, else its top-p nucleus (``nucleus_mask``), and samples
    from the kept probabilities with ``sample_ids`` (``block`` = 1: plain inverse CDF in vocabulary order).
    Returns (tokens [B] int64, logprobs [B] fp32) with logprobs = log_softmax(logits / T)[token]
    (T == 0 rows: argmax and log_softmax(logits)[token]).
    """
    logits = logits.float()
    greedy = temperature < GREEDY_EPS
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    scaled = logits if bool((scale == 1).all()) else logits / scale[:, None]
    probs = torch.softmax(scaled, dim=-1)
    kept = probs
    nucleus = (top_p < 1) & ~greedy
    if bool(nucleus.any()):
        rows = nucleus.nonzero().squeeze(-1)
        kept = probs.clone()
        kept[rows] = probs[rows] * nucleus_mask(probs[rows], top_p[rows].float())
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64,
                              device=generator.device if generator is not None else None)
    if keys is None:
        keys = torch.randint(0, 2**62, (logits.shape[0],), generator=generator,
                             device=generator.device if generator is not None else None)
    tokens = sample_ids(kept, uniforms.to(logits.device), keys, block)
    if bool(greedy.any()):
        rows = greedy.nonzero().squeeze(-1)
        tokens[rows] = logits[rows].argmax(dim=-1)
    # log of the softmax: exact to fp32 rounding (a sampled id never has zero probability;
    # a greedy id has the largest), without a second pass over [B, V] for log_softmax
    picked = scaled.gather(-1, tokens[:, None]).squeeze(-1)
    logprobs = probs.gather(-1, tokens[:, None]).squeeze(-1).log()
    small = logprobs < -80  # fp32 softmax loses relative precision near underflow: recompute those rows
    if bool(small.any()):
        rows = small.nonzero().squeeze(-1)
        logprobs[rows] = picked[rows] - torch.logsumexp(scaled[rows], dim=-1)
    return tokens, logprobs


def _prompt_logits_to_keep(seqs: list[SequenceRequest]) -> int:
    """How many trailing positions of the (left-padded) prefill need logits: 1 for sampling,
    more for rows that asked for prompt log-probs from ``logprob_start_len``."""
    keep = 1
    for s in seqs:
        if s.logprob_start_len >= 0:
            keep = max(keep, len(s.fill) - max(s.logprob_start_len, 1) + 1)
    return keep


@dataclass
class _Running:
    """The rows being decoded together. mask: [B, L] (1 = a real token; left padding), position: [B, 1]
    of each row's last token, logits: [B, V] for each row's next token, cache: K/V of length L."""

    seqs: list[SequenceRequest]
    cache: object
    mask: torch.Tensor
    position: torch.Tensor
    logits: torch.Tensor

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (finished rows leave the batch), then drop the leading columns that
        are padding for every remaining row."""
        if len(rows) < len(self.seqs):
            index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
            self.seqs = [self.seqs[i] for i in rows]
            self.mask, self.position, self.logits = self.mask[index], self.position[index], self.logits[index]
            for layer in _kv_layers(self.cache):
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            self.mask = self.mask[:, start:]
            for layer in _kv_layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def join(self, other: "_Running") -> None:
        """Append ``other``'s rows: both left-padded (mask 0, K/V 0) to the longer length."""
        length = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            pad = length - t.shape[dim]
            if not pad:
                return t
            shape = list(t.shape)
            shape[dim] = pad
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(_kv_layers(self.cache), _kv_layers(other.cache)):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.position = torch.cat([self.position, other.position])
        self.logits = torch.cat([self.logits, other.logits])
        self.seqs = self.seqs + other.seqs


def _kv_layers(cache) -> list:
    """The cache's per-layer K/V holders ([B, heads, L, head_dim] ``keys``/``values``)."""
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    bad = [type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer]
    if bad:  # a sliding-window layer keeps its own offsets: rows cannot be moved between batches
        raise NotImplementedError(f"generate_batch: cache layers {sorted(set(bad))} cannot join or leave a batch")
    return layers


def _prefill(model, seqs: list[SequenceRequest], pad_token_id: int, device: torch.device) -> _Running:
    """The prefill of ``seqs`` over their ``fill`` ids (the prompt, plus the tokens a retracted row
    already has; left padding, explicit position ids); fills their input_logprobs (prompt tokens only)."""
    from transformers import DynamicCache

    batch = len(seqs)
    fills = [s.fill for s in seqs]
    width = max(len(f) for f in fills)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, f in enumerate(fills):
        ids[i, width - len(f):] = torch.tensor(f, dtype=torch.long)
        mask[i, width - len(f):] = 1
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = _prompt_logits_to_keep(seqs)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=DynamicCache(),
                use_cache=True, logits_to_keep=keep)
    for i, s in enumerate(seqs):
        if s.logprob_start_len >= 0:  # prompt log-probs, [None] for the first prompt token as SGLang does
            pad = width - len(fills[i])
            first = pad + max(s.logprob_start_len, 1) - 1  # predicts the first asked token
            last = pad + len(s.prompt) - 1                  # predicts the token after the prompt (not asked)
            lo, hi = first - (width - keep), last - (width - keep)  # their rows in out.logits[:, -keep:]
            logp = torch.log_softmax(out.logits[i, lo:hi].float(), dim=-1)
            given = logp.gather(-1, ids[i, first + 1:last + 1, None]).squeeze(-1).tolist()
            s.input_logprobs = ([None] if s.logprob_start_len == 0 else []) + given
    return _Running(list(seqs), out.past_key_values, mask, position[:, -1:], out.logits[:, -1])


@torch.no_grad()
def generate_batch(model, seqs: list[SequenceRequest], *, pad_token_id: int, eos_token_ids: frozenset[int],
                   generator: torch.Generator | None, device: torch.device,
                   admit: Callable[[int], list[SequenceRequest]] | None = None,
                   on_finish: Callable[[SequenceRequest], None] | None = None,
                   pause: Callable[[list[SequenceRequest]], bool] | None = None) -> list[SequenceRequest]:
    """Sample every sequence of ``seqs`` in place (output_ids, output_logprobs, finish, input_logprobs).

    Rows with a ``seed`` draw their randomness from their own ``random.Random(seed)`` (``rng``, kept on
    the row), the others from ``generator``. A row that already has output tokens (a retracted one)
    is prefilled over its prompt and those tokens and continues from there.
    A sequence stops at its ``max_new_tokens`` (finish ("length", n)), or after emitting a token in
    ``stop_token_ids`` or ``eos_token_ids`` unless ``ignore_eos`` (finish ("stop", token); the token is
    kept, as in SGLang: ``Req._check_token_based_finish`` returns early under ignore_eos), or once
    ``cancelled`` is set (finish ("abort", "cancelled"), checked after every decode step: a client
    that left frees its rows within one step), or after the first token made once ``abort_message``
    is set (finish ("abort", message)); it then leaves the batch and ``on_finish(seq)`` is called.
    Between decode steps ``pause(rows)`` is called with the rows about to be fed their last token
    (it may block; True stops the batch: see the module doc), then ``admit(step)`` may return more
    sequences: they are prefilled and join the running batch (so a burst of requests that reached
    the server while a batch started still shares its decode steps).
    Returns when every sequence, admitted ones included, has finished (then []), or the unfinished
    rows when ``pause`` stopped the batch.
    """
    for s in seqs:
        if s.seed is not None and s.rng is None:
            s.rng = random.Random(s.seed)
    running = _prefill(model, seqs, pad_token_id, device)
    draw_on = generator.device if generator is not None else None  # a generator draws on its own device
    step = 0

    def finished(s: SequenceRequest) -> bool:
        if on_finish is not None:
            on_finish(s)
        return True

    for s in seqs:
        if s.max_new_tokens <= 0:
            s.finish = ("length", 0)
    running.select([i for i, s in enumerate(running.seqs) if s.max_new_tokens > 0 or not finished(s)])
    while running.seqs:
        rows = running.seqs
        temperature = torch.tensor([s.temperature for s in rows], device=device)
        top_p = torch.tensor([s.top_p for s in rows], device=device)
        uniforms = torch.rand(len(rows), generator=generator, dtype=torch.float64, device=draw_on).cpu()
        keys = torch.randint(0, 2**62, (len(rows),), generator=generator, device=draw_on).cpu()
        for i, s in enumerate(rows):
            if s.rng is not None:
                uniforms[i], keys[i] = s.rng.random(), s.rng.getrandbits(62)
        tokens, logps = sample_next(running.logits, temperature, top_p, generator, uniforms.to(device), keys)
        tokens_l, logps_l = tokens.tolist(), logps.tolist()
        alive = []
        for i, s in enumerate(rows):
            s.output_ids.append(tokens_l[i])
            s.output_logprobs.append(logps_l[i])
            if s.cancelled:
                s.finish = ("abort", "cancelled")
                finished(s)
            elif s.abort_message is not None:
                s.finish = ("abort", s.abort_message)
                finished(s)
            elif not s.ignore_eos and (tokens_l[i] in s.stop_token_ids or tokens_l[i] in eos_token_ids):
                s.finish = ("stop", tokens_l[i])
                finished(s)
            elif len(s.output_ids) >= s.max_new_tokens:
                s.finish = ("length", s.max_new_tokens)
                finished(s)
            else:
                alive.append(i)
        step += 1
        if alive:
            running.select(alive)
            if pause is not None and pause(running.seqs):
                return running.seqs
            running.mask = torch.cat([running.mask, running.mask.new_ones((len(alive), 1))], dim=1)
            running.position = running.position + 1
            out = model(input_ids=tokens[alive][:, None], attention_mask=running.mask, position_ids=running.position,
                        past_key_values=running.cache, use_cache=True, logits_to_keep=1)
            running.cache, running.logits = out.past_key_values, out.logits[:, -1]
        else:
            running.seqs = []
        joining = admit(step) if admit is not None else []
        if joining:
            for s in joining:
                if s.seed is not None and s.rng is None:
                    s.rng = random.Random(s.seed)
                if s.max_new_tokens <= 0:
                    s.finish = ("length", 0)
            new = _prefill(model, joining, pad_token_id, device)
            new.select([i for i, s in enumerate(new.seqs) if s.max_new_tokens > 0 or not finished(s)])
            if not new.seqs:
                continue
            if running.seqs:
                running.join(new)
            else:
                running = new
    return []
