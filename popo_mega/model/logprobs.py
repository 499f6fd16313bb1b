"""Token log-probs and per-token entropy from vocab-parallel logits (the reference path).

Each tensor-parallel rank holds a shard ``logits: [T, V/tp]`` of the vocabulary (columns
``vocab_start .. vocab_start + V/tp``). For each token t with target id y_t:

    logZ_t = log sum_v exp(z_tv)                       (over the FULL vocabulary)
    logp_t = z_{t, y_t} - logZ_t
    H_t    = -sum_v p_tv log p_tv = logZ_t - sum_v p_tv z_tv

(Eq. P2 uses logp_t, Eq. P4 uses H_t, both in docs/algorithms.md.) The full vocabulary is never
gathered: each rank computes, per token, four numbers over its shard relative to the shard's own
maximum m_r (max, sum-exp s_r, sum e^(z-m_r)(z-m_r) = q_r, and the target logit when the target
falls in the shard); the group then all-reduces the max (MAX) and the rescaled sums (SUM):

    M = max_r m_r,  a_r = exp(m_r - M),  S = sum_r a_r s_r,  Q = sum_r a_r q_r + (a_r (m_r - M)) s_r
    logZ = M + log S,   H = log S - Q / S.

Backward needs no communication: with p = exp(z - logZ),

    d logp / dz_v = 1[v = y] - p_v,        dH / dz_v = -p_v (z_v - logZ + H)

so d(logits) = g_lp * (onehot - p) - g_ent * p * (z - logZ + H), computed per chunk of tokens
in fp32 and written once into one buffer of the logits' dtype. No fp32 copy of the whole shard
is made: work is chunked over T (``chunk_tokens``). The input is never modified (unlike
megatron-core's ``vocab_parallel_cross_entropy``, which overwrites fp32 logits in place).

Padded vocabulary. megatron pads the vocabulary to a multiple of 128*tp columns (151,665 real
ids of Qwen2.5 -> 151,936 columns); the padding columns hold output-layer rows too and must not
enter the softmax. ``vocab_size`` (the number of real ids) makes every function here skip the
columns whose global id is >= vocab_size: they are never read, their gradient is 0, a shard may
even be all padding (its max is -inf and it adds nothing). Masking them with a huge negative
value instead is fragile: in bf16 finfo.min/2 = -1.7e38, and any product d * s of such a
difference with a count overflows to -inf, where 0 * -inf = NaN (defect 11: NaN entropies from
the CUDA kernel). The rescaling below is written a*q + (a*d)*s for the same reason.

Simplifications: real logits must be finite; every target must lie in exactly one shard and below
vocab_size (checked with an asynchronous assert). Outputs are fp32 whatever the input dtype,
since log-probs feed importance ratios.

The fused C++/CUDA kernel of issue 6 (``popo_mega.ops.logprob_entropy``) reuses
:func:`combine_shard_stats` and has :func:`local_shard_stats` / :func:`grad_logits` as its
reference twins.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# A chunk of rows is upcast to fp32 at a time; this bounds that temporary to ~16 MiB.
_CHUNK_ELEMENTS = 1 << 22


def default_chunk_tokens(vocab_shard: int) -> int:
    """Rows per fp32 chunk so that a chunk holds about 4M elements (16 MiB)."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_shard))


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, V/tp], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be [T] with T={logits.shape[0]}, got shape {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")


def _tp_info(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def real_columns(shard_columns: int, vocab_start: int, vocab_size: int | None) -> int:
    """How many leading columns of a shard [T, shard_columns] starting at global id ``vocab_start``
    are real vocabulary ids (< vocab_size); the rest is padding. ``vocab_size=None``: all of them."""
    if vocab_size is None:
        return shard_columns
    return max(0, min(shard_columns, vocab_size - vocab_start))


def check_vocab_size(vocab_size: int | None) -> None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int (the number of real vocabulary ids) or None, "
                         f"got {vocab_size!r}")


def resolve_vocab_start(logits: torch.Tensor, group, vocab_start: int | None) -> int:
    """First vocab id of this shard: ``vocab_start`` if given, else ``rank * V/tp``."""
    rank, _ = _tp_info(group)
    if vocab_start is None:
        return rank * logits.shape[1]
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return int(vocab_start)


@torch.no_grad()
def local_shard_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                      chunk_tokens: int | None = None, vocab_size: int | None = None):
    """Per-token statistics of one vocab shard, relative to the shard's own max (reference twin).

    logits: [T, Vs] (any float dtype, not modified); target: [T] int64 global vocab ids;
    vocab_size: real ids (columns from global id vocab_size on are padding, skipped; None: none).
    With R = real_columns(Vs, vocab_start, vocab_size), returns four fp32 [T] tensors and a mask:
      m  = max_{v < R} z_v                (-inf when R = 0)
      s  = sum_{v < R} exp(z_v - m)
      q  = sum_{v < R} exp(z_v - m) * (z_v - m)
      zt = z_{target} if vocab_start <= target < vocab_start + R else 0
      in_shard [T] bool: whether the target is a real column of this shard
    """
    T = logits.shape[0]
    Vs = real_columns(logits.shape[1], vocab_start, vocab_size)
    logits = logits[:, :Vs]
    m = logits.amax(dim=1).float() if Vs > 0 else logits.new_full((T,), float("-inf"), dtype=torch.float32)
    s = torch.empty(T, dtype=torch.float32, device=logits.device)
    q = torch.empty_like(s)
    chunk = chunk_tokens or default_chunk_tokens(Vs)
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        zc = logits[r0:r1].float() - m[r0:r1, None]    # the only fp32 temporary: [chunk, Vs]
        e = zc.exp()
        s[r0:r1] = e.sum(dim=1)
        q[r0:r1] = (e * zc).sum(dim=1)
    local = target - vocab_start
    in_shard = (local >= 0) & (local < Vs)
    idx = torch.where(in_shard, local, torch.zeros_like(local))
    zt = logits.gather(1, idx[:, None]).squeeze(1).float() if Vs > 0 else s.new_zeros(T)
    zt = torch.where(in_shard, zt, torch.zeros_like(zt))
    return m, s, q, zt, in_shard


@torch.no_grad()
def combine_shard_stats(m, s, q, zt, in_shard, group=None):
    """All-reduce the shard statistics across the TP group -> (logp [T], entropy [T], logZ [T]).

    One MAX all-reduce of m, one SUM all-reduce of a [4, T] stack (rescaled s, q, zt and the
    in-shard count, which must be exactly 1 for every token).
    """
    M = m.clone()
    if group is not None:
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    a = torch.exp(m - M)
    # (a*d)*s, not a*(d*s): d*s may overflow when a underflows to 0; d = 0 for an all-padding shard
    d = torch.where(m > float("-inf"), m - M, torch.zeros_like(m))
    stacked = torch.stack([a * s, a * q + (a * d) * s, zt, in_shard.to(torch.float32)])
    if group is not None:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    S, Q, ZT, count = stacked.unbind(0)
    if count.numel() > 0:
        torch._assert_async(torch.all(count == 1),
                            "vocab_parallel_logprob_entropy: a target id lies in no vocab shard "
                            "(out of range, or a padding id >= vocab_size) or in several (overlapping vocab_start)")
    log_s = S.log()
    logz = M + log_s
    logp = (ZT - M) - log_s     # not ZT - logz: keeps fp32 precision when |logits| is large
    entropy = log_s - Q / S
    return logp, entropy, logz


@torch.no_grad()
def grad_logits(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, logz: torch.Tensor,
                entropy: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor,
                chunk_tokens: int | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """d(logits) [T, Vs] in logits' dtype (reference twin of the backward kernel).

    grad = g_lp * (onehot(target) - p) - g_ent * p * (z - logZ + H),  p = exp(z - logZ), on the
    real columns; 0 on padding columns (global id >= vocab_size);
    logz, entropy, grad_logp, grad_entropy: [T] fp32.
    """
    T = logits.shape[0]
    Vs = real_columns(logits.shape[1], vocab_start, vocab_size)
    out = torch.zeros_like(logits, memory_format=torch.contiguous_format)
    logits = logits[:, :Vs]
    chunk = chunk_tokens or default_chunk_tokens(Vs)
    local = target - vocab_start
    in_shard = (local >= 0) & (local < Vs)
    for r0 in range(0, T, chunk):
        r1 = min(T, r0 + chunk)
        logp_all = logits[r0:r1].float() - logz[r0:r1, None]          # log p, fp32 [chunk, Vs]
        p = logp_all.exp()
        # p times each term first: with p = 0, g_ent * log p alone may overflow (log p ~ -1.7e38)
        g = -(p * grad_logp[r0:r1, None] + (p * grad_entropy[r0:r1, None]) * (logp_all + entropy[r0:r1, None]))
        rows = torch.nonzero(in_shard[r0:r1]).squeeze(1)
        g[rows, local[r0:r1][rows]] += grad_logp[r0:r1][rows]
        out[r0:r1, :Vs] = g
    return out


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, chunk_tokens, vocab_size):
        m, s, q, zt, in_shard = local_shard_stats(logits, target, vocab_start, chunk_tokens, vocab_size)
        logp, entropy, logz = combine_shard_stats(m, s, q, zt, in_shard, group)
        ctx.save_for_backward(logits, target, logz, entropy)
        ctx.vocab_start, ctx.chunk_tokens, ctx.vocab_size = vocab_start, chunk_tokens, vocab_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, target, logz, entropy = ctx.saved_tensors
        grad = grad_logits(logits, target, ctx.vocab_start, logz, entropy,
                           grad_logp.float(), grad_entropy.float(), ctx.chunk_tokens, ctx.vocab_size)
        return grad, None, None, None, None, None


def vocab_parallel_logprob_entropy(logits: torch.Tensor, target: torch.Tensor, group=None,
                                   vocab_start: int | None = None, chunk_tokens: int | None = None, *,
                                   vocab_size: int | None = None):
    """Token log-probs and entropies from a vocab shard, with gradients for both.

    logits: [T, V/tp] (fp32 or bf16/fp16; not modified); target: [T] int64 global vocab ids;
    group: the tensor-parallel process group (None = TP 1, the whole vocabulary is local);
    vocab_start: first vocab id of this shard (default ``rank_in_group * V/tp``);
    chunk_tokens: rows upcast to fp32 at a time (default: ~4M elements per chunk);
    vocab_size: the number of real vocabulary ids; columns of global id >= vocab_size are padding,
    skipped (not read, gradient 0). None: every column is real.
    Returns (logp [T] fp32, entropy [T] fp32). Every rank of the group gets the same values and
    must call this collectively.
    """
    _check_inputs(logits, target)
    start = resolve_vocab_start(logits, group, vocab_start)
    check_vocab_size(vocab_size)
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _VocabParallelLogprobEntropy.apply(logits, target, group, start, chunk_tokens, vocab_size)
