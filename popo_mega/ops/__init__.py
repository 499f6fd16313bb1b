"""Python face of the csrc/ kernels: each op beside its pure-PyTorch ``*_ref`` twin.

    logprob_entropy      kernel 1: vocab-parallel token log-prob + entropy (TP all-reduces in Python)
    clipped_surrogate    kernel 2: clipped importance-weighted policy loss + statistics
    masked_mean_pool     kernel 3a: masked mean of packed hidden states per response
    cosine_penalty       kernel 3b: weighted negative cosine similarity (Eq. P3)

Every op takes ``impl: "auto" | "extension" | "reference"`` (the ``kernels`` config switch, see
``_extension``). The compiled ops live in ``torch.ops.popo_mega`` (schemas in csrc/bindings.cpp;
fake impls and autograd registered by these modules), so they trace under ``torch.compile``.
"""

from popo_mega.ops._extension import BUILD_COMMAND, IMPLS
from popo_mega.ops.clipped_surrogate import clipped_surrogate, clipped_surrogate_ref
from popo_mega.ops.cosine_penalty import cosine_penalty, cosine_penalty_ref
from popo_mega.ops.logprob_entropy import logprob_entropy, logprob_entropy_ref
from popo_mega.ops.masked_mean_pool import masked_mean_pool, masked_mean_pool_ref

__all__ = ["BUILD_COMMAND", "IMPLS", "logprob_entropy", "logprob_entropy_ref", "clipped_surrogate",
           "clipped_surrogate_ref", "masked_mean_pool", "masked_mean_pool_ref", "cosine_penalty",
           "cosine_penalty_ref"]
