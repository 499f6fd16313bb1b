"""Pack selected rollouts into micro-batches of packed (THD) sequences for the policy step.

One rollout i is ``tokens_i = prompt_i ++ response_i`` (length L_i = P_i + R_i). Rollouts are laid
end to end in one token axis of length T (``cu_seqlens`` [B+1], as in popo_mega.algorithms.packing);
the model sees ``tokens [1, T_pad]`` with ``PackedSeqParams`` (each token attends causally within its
own rollout only) and position ids that restart at 0 for every rollout.

Label alignment (next-token prediction): the logits at position t of a rollout predict token t+1, so

    labels[t]        = tokens[t + 1]                         (0 at the rollout's last position)
    mask[t]          = 1  iff  tokens[t + 1] is a response token,  i.e.  P_i - 1 <= t <= L_i - 2
    old_logp[t]      = log mu(tokens[t + 1])  on masked positions, 0 elsewhere
    feature_mask[t]  = 1  iff  tokens[t] is a response token,      i.e.  P_i <= t <= L_i - 1

``mask`` is the response mask m_t of Eq. P2/P4 (docs/algorithms.md); ``feature_mask`` selects the
hidden states that the P3 features f are pooled over (the states AT the response tokens).

Micro-batches: rollouts are taken in the given order and a new micro-batch starts when the next
rollout would push the micro-batch over ``micro_batch_tokens`` (a rollout is never split). At PP > 1
every micro-batch must have the same length, and under sequence parallelism or FP8 a length that is
a multiple of :func:`token_multiple`: ``pad_to`` appends padding tokens as one extra
attention segment (never in ``cu_seqlens``, ``mask`` or ``feature_mask``); ``num_tokens`` is the
unpadded T and every per-token loss tensor has length T.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["RolloutSample", "MicroBatch", "pack_micro_batches", "token_multiple", "shard_for_data_parallel",
           "PAD_TOKEN_ID"]

PAD_TOKEN_ID = 0


@dataclass
class RolloutSample:
    """One selected rollout (input of the packer).

    tokens:     [L] int64, prompt then response, L >= 2.
    prompt_len: P >= 1, number of prompt tokens (the response is tokens[P:], R = L - P >= 1).
    old_logp:   [R] float log-probs of the response tokens under the sampling policy (engine
                output), or None (then 0: only allowed where the loss does not read them).
    weight:     POPO w_i (Eq. P1), 0 for non-positives.
    advantage:  GRPO / A3PO sequence advantage A_i.
    positive:   r_i > tau_r.
    token_advantages: optional [R] per-token advantages (A3PO shaping); overrides ``advantage``.
    uid:        a global id of the rollout (seeds its P3 target noise so that any layout draws
                the same noise); -1 means "its index in the list given to the packer".
    """

    tokens: Tensor
    prompt_len: int
    old_logp: Tensor | None = None
    weight: float = 0.0
    advantage: float = 0.0
    positive: bool = False
    token_advantages: Tensor | None = None
    uid: int = -1

    def check(self, where: str) -> None:
        if not isinstance(self.tokens, Tensor) or self.tokens.dim() != 1 or self.tokens.dtype != torch.int64:
            raise ValueError(f"{where}: tokens must be a 1-D int64 tensor, got "
                             f"{getattr(self.tokens, 'dtype', type(self.tokens).__name__)} "
                             f"shape {tuple(getattr(self.tokens, 'shape', ()))}")
        L = self.tokens.numel()
        if not 1 <= self.prompt_len < L:
            raise ValueError(f"{where}: prompt_len must be in [1, {L - 1}] for {L} tokens "
                             f"(at least one prompt and one response token), got {self.prompt_len}")
        R = L - self.prompt_len
        for name in ("old_logp", "token_advantages"):
            v = getattr(self, name)
            if v is not None and (v.dim() != 1 or v.numel() != R):
                raise ValueError(f"{where}: {name} must be [R]={R} (one per response token), got {tuple(v.shape)}")


@dataclass
class MicroBatch:
    """A packed micro-batch. T = ``num_tokens`` real tokens of B rollouts, T_pad >= T model tokens.

    tokens, position_ids: [1, T_pad] int64 (model inputs; padding id PAD_TOKEN_ID, positions 0..).
    packed_seq_params:    megatron PackedSeqParams (THD; int32 cu_seqlens [B+1], or [B+2] with a
                          padding segment).
    labels:       [T] int64 next-token targets.
    mask:         [T] float32 response mask m_t (label-aligned).
    feature_mask: [T] float32 response-token positions (P3 pooling).
    old_logp:     [T] float32 log mu of the label, 0 off the mask.
    token_advantages: [T] float32 advantage of each position (A_i broadcast or per-token), 0 off mask.
    seq_index:    [T] int64 index b in 0..B-1 of the rollout owning each token.
    cu_seqlens:   [B+1] int64 offsets over the T real tokens.
    weights, advantages: [B] float32; positive: [B] bool; sample_index: [B] int64 positions in the
                  packer's input list; uids: [B] int64.
    """

    tokens: Tensor
    position_ids: Tensor
    packed_seq_params: object
    labels: Tensor
    mask: Tensor
    feature_mask: Tensor
    old_logp: Tensor
    token_advantages: Tensor
    seq_index: Tensor
    cu_seqlens: Tensor
    weights: Tensor
    advantages: Tensor
    positive: Tensor
    sample_index: Tensor
    uids: Tensor
    num_tokens: int
    extras: dict = field(default_factory=dict)   # filled by the trainer (target features, EMA log-probs)

    @property
    def padded_tokens(self) -> int:
        return self.tokens.shape[1]

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def model_inputs(self) -> dict:
        """The keys that popo_mega.model.forward.forward_only passes to the model."""
        return {"tokens": self.tokens, "position_ids": self.position_ids, "packed_seq_params": self.packed_seq_params}

    def to(self, device: torch.device | str) -> "MicroBatch":
        """This micro-batch with every tensor on ``device``: the model inputs, the loss tensors, the
        per-rollout tensors, the ``extras`` and the PackedSeqParams' cu_seqlens (int32, as TE's
        fused attention requires them on the GPU). The packer builds on the CPU (cheap, no sync per
        rollout); the trainer moves each micro-batch once, here, before any pass over the model."""
        memo: dict[int, Tensor] = {}   # cu_seqlens_q and _kv are one tensor: keep them one

        def move(v):
            if not isinstance(v, Tensor):
                return v
            if id(v) not in memo:
                memo[id(v)] = v.to(device)
            return memo[id(v)]

        psp = self.packed_seq_params
        if psp is not None:
            psp = replace(psp, **{f.name: move(getattr(psp, f.name)) for f in fields(psp)
                                  if isinstance(getattr(psp, f.name), Tensor)})
        moved = {f.name: move(getattr(self, f.name)) for f in fields(self)
                 if f.name not in ("packed_seq_params", "extras")}
        return MicroBatch(**moved, packed_seq_params=psp, extras={k: move(v) for k, v in self.extras.items()})


def _packed_seq_params(cu: Tensor, max_len: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu32 = cu.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu32, cu_seqlens_kv=cu32,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def _build(samples: Sequence[RolloutSample], indices: list[int], pad_to: int | None) -> MicroBatch:
    lengths = [samples[i].tokens.numel() for i in indices]
    T = sum(lengths)
    T_pad = T if pad_to is None else pad_to
    if T_pad < T:
        raise ValueError(f"pack_micro_batches: pad_to={pad_to} is shorter than a micro-batch of {T} tokens")
    tokens = torch.full((T_pad,), PAD_TOKEN_ID, dtype=torch.int64)
    position_ids = torch.zeros(T_pad, dtype=torch.int64)
    labels = torch.zeros(T, dtype=torch.int64)
    mask = torch.zeros(T, dtype=torch.float32)
    feature_mask = torch.zeros(T, dtype=torch.float32)
    old_logp = torch.zeros(T, dtype=torch.float32)
    tok_adv = torch.zeros(T, dtype=torch.float32)
    seq_index = torch.zeros(T, dtype=torch.int64)
    cu = [0]
    o = 0
    for b, i in enumerate(indices):
        s = samples[i]
        L, P = lengths[b], s.prompt_len
        tokens[o:o + L] = s.tokens
        position_ids[o:o + L] = torch.arange(L)
        labels[o:o + L - 1] = s.tokens[1:]
        mask[o + P - 1:o + L - 1] = 1.0
        feature_mask[o + P:o + L] = 1.0
        if s.old_logp is not None:
            old_logp[o + P - 1:o + L - 1] = s.old_logp.to(torch.float32)
        if s.token_advantages is not None:
            tok_adv[o + P - 1:o + L - 1] = s.token_advantages.to(torch.float32)
        else:
            tok_adv[o + P - 1:o + L - 1] = float(s.advantage)
        seq_index[o:o + L] = b
        o += L
        cu.append(o)
    cu_t = torch.tensor(cu, dtype=torch.int64)
    attn_cu = cu_t if T_pad == T else torch.cat([cu_t, torch.tensor([T_pad])])
    if T_pad > T:
        position_ids[T:] = torch.arange(T_pad - T)
    max_len = max(lengths + [T_pad - T])
    return MicroBatch(
        tokens=tokens[None], position_ids=position_ids[None], packed_seq_params=_packed_seq_params(attn_cu, max_len),
        labels=labels, mask=mask, feature_mask=feature_mask, old_logp=old_logp, token_advantages=tok_adv,
        seq_index=seq_index, cu_seqlens=cu_t,
        weights=torch.tensor([float(samples[i].weight) for i in indices], dtype=torch.float32),
        advantages=torch.tensor([float(samples[i].advantage) for i in indices], dtype=torch.float32),
        positive=torch.tensor([bool(samples[i].positive) for i in indices], dtype=torch.bool),
        sample_index=torch.tensor(indices, dtype=torch.int64),
        uids=torch.tensor([samples[i].uid if samples[i].uid >= 0 else i for i in indices], dtype=torch.int64),
        num_tokens=T)


def token_multiple(tp: int, sequence_parallel: bool, fp8_recipe: str | None = None) -> int:
    """The multiple every micro-batch's padded token count T_pad must be (``pad_multiple`` below).

    Sequence parallelism splits the token axis over the TP ranks (megatron's embedding scatters
    [T_pad, 1, H] into tp equal slices and asserts "First dimension of the tensor should be
    divisible by tensor parallel size"): a multiple of tp. Transformer Engine's FP8 GEMMs need the
    token dimension of their input divisible by 16 (32 for MXFP8), the padding megatron-core itself
    applies (models/multimodal/context_parallel.py, ``get_padding``). Under sequence parallelism a
    TE norm+linear quantises this rank's slice [T_pad/tp, H] before its all-gather, so every slice
    must be such a multiple: tp * 16. ``fp8_recipe`` is None when FP8 is off.
    """
    if tp < 1:
        raise ValueError(f"token_multiple: tp must be >= 1, got {tp}")
    m = tp if sequence_parallel else 1
    if fp8_recipe is not None:
        m *= 32 if fp8_recipe == "mxfp8" else 16
    return m


def pack_micro_batches(samples: Sequence[RolloutSample], micro_batch_tokens: int, *, common_length: bool = False,
                       pad_multiple: int = 1) -> list[MicroBatch]:
    """Greedy in-order packing into micro-batches of at most ``micro_batch_tokens`` tokens.

    common_length: pad every micro-batch to the longest one (needed at PP > 1, where the pipeline
    schedule communicates tensors of one fixed shape); pad_multiple: round every micro-batch's
    length (or that common length) up to a multiple (see :func:`token_multiple`); the padding is
    one extra attention segment outside ``cu_seqlens`` and every mask, so it enters no loss term.
    A rollout longer than ``micro_batch_tokens`` is an error naming it. An empty ``samples`` gives [].
    """
    if micro_batch_tokens < 2:
        raise ValueError(f"train.micro_batch_tokens must be >= 2, got {micro_batch_tokens}")
    if pad_multiple < 1:
        raise ValueError(f"pack_micro_batches: pad_multiple must be >= 1, got {pad_multiple}")
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, s in enumerate(samples):
        s.check(f"pack_micro_batches: rollout {i}")
        L = s.tokens.numel()
        if L > micro_batch_tokens:
            raise ValueError(f"pack_micro_batches: rollout {i} has {L} tokens, more than train.micro_batch_tokens="
                             f"{micro_batch_tokens}; raise train.micro_batch_tokens or lower rollout.max_new_tokens")
        if current and used + L > micro_batch_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += L
    if current:
        groups.append(current)
    pad_to = None
    if common_length and groups:
        longest = max(sum(samples[i].tokens.numel() for i in g) for g in groups)
        pad_to = -(-longest // pad_multiple) * pad_multiple
    elif pad_multiple > 1:
        return [_build(samples, g, -(-sum(samples[i].tokens.numel() for i in g) // pad_multiple) * pad_multiple)
                for g in groups]
    return [_build(samples, g, pad_to) for g in groups]


def shard_for_data_parallel(samples: Sequence[RolloutSample], dp_size: int, dp_rank: int) -> list[RolloutSample]:
    """This DP rank's share of a batch: rollouts dealt greedily (longest first) to the rank with the
    fewest tokens so far, ties to the lower rank; each share keeps the input order. Deterministic,
    so every rank computes the same split. Samples get ``uid`` = their index in ``samples`` when unset.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"shard_for_data_parallel: dp_rank {dp_rank} not in [0, {dp_size})")
    load = [0] * dp_size
    owner = [0] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: (-samples[i].tokens.numel(), i))
    for i in order:
        r = min(range(dp_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += samples[i].tokens.numel()
    out = []
    for i, s in enumerate(samples):
        if owner[i] == dp_rank:
            if s.uid < 0:
                s = RolloutSample(**{**s.__dict__, "uid": i})
            out.append(s)
    return out
