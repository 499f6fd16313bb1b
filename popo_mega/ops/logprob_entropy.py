"""Kernel 1: vocab-parallel token log-prob + entropy, fused (csrc/*/logprob_entropy_*).

The maths and the reference twin are in :mod:`popo_mega.model.logprobs` (docs there): one pass of
the kernel gives per-token (max, sum-exp, sum e*(z-m), target logit) of the shard, the TP
all-reduces happen here in Python between the kernel phases (``combine_shard_stats``), and the
backward kernel writes d(logits) = g_lp*(onehot - p) - g_ent*p*(z - logZ + H) into one buffer of
the logits' dtype without an fp32 softmax of the shard. ``vocab_size`` makes both kernels skip the
padding columns of a padded vocabulary (gradient 0 there) instead of relying on a huge negative
mask value, which overflowed to NaN entropies in bf16 (defect 11; see popo_mega.model.logprobs).
"""

from __future__ import annotations

import torch

from popo_mega.model import logprobs as _lp
from popo_mega.ops import _extension

__all__ = ["logprob_entropy", "logprob_entropy_ref"]

logprob_entropy_ref = _lp.vocab_parallel_logprob_entropy


@_extension.on_load
def _register():
    @torch.library.register_fake("popo_mega::logprob_entropy_stats")
    def _(logits, target, vocab_start, vocab_size):
        return logits.new_empty((4, logits.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("popo_mega::logprob_entropy_grad")
    def _(logits, target, vocab_start, vocab_size, logz, entropy, grad_logp, grad_entropy):
        return torch.empty_like(logits)


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, vocab_size):
        stats = torch.ops.popo_mega.logprob_entropy_stats(logits, target, vocab_start, vocab_size)
        local = target - vocab_start
        in_shard = (local >= 0) & (local < _lp.real_columns(logits.shape[1], vocab_start, vocab_size))
        logp, entropy, logz = _lp.combine_shard_stats(*stats.unbind(0), in_shard, group)
        ctx.save_for_backward(logits, target, logz, entropy)
        ctx.vocab_start, ctx.vocab_size = vocab_start, vocab_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, target, logz, entropy = ctx.saved_tensors
        grad = torch.ops.popo_mega.logprob_entropy_grad(
            logits, target, ctx.vocab_start, ctx.vocab_size, logz, entropy,
            grad_logp.float().contiguous(), grad_entropy.float().contiguous())
        return grad, None, None, None, None


def logprob_entropy(logits: torch.Tensor, target: torch.Tensor, group=None, vocab_start: int | None = None,
                    impl: str = "auto", *, vocab_size: int | None = None):
    """Token log-probs and entropies from a vocab shard (fused kernel; see ``logprob_entropy_ref``).

    logits: [T, V/tp] float32 or bfloat16 (not modified); target: [T] int64 global vocab ids;
    group: TP process group or None (TP 1); vocab_start: first vocab id of this shard
    (default rank * V/tp); impl: "auto" | "extension" | "reference"; vocab_size: the number of
    real vocabulary ids (columns of global id >= vocab_size are padding: skipped, gradient 0;
    None: every column is real).
    Returns (logp [T] fp32, entropy [T] fp32), differentiable with respect to logits.
    """
    if not _extension.use_extension(impl, "logprob_entropy_stats", logits):
        return logprob_entropy_ref(logits, target, group=group, vocab_start=vocab_start, vocab_size=vocab_size)
    _lp._check_inputs(logits, target)
    start = _lp.resolve_vocab_start(logits, group, vocab_start)
    _lp.check_vocab_size(vocab_size)
    # the op takes the real-id count; None means this shard's columns are all real
    size = vocab_size if vocab_size is not None else max(1, start + logits.shape[1])
    return _FusedLogprobEntropy.apply(logits.contiguous(), target.contiguous(), group, start, size)
