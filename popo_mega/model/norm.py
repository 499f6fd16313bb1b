"""RMSNorm for megatron-core's local layer spec that also runs under sequence parallelism.

megatron-core 0.16.1's local spec without apex builds its norms with ``WrappedTorchNorm``, which
refuses ``sequence_parallel`` ("sequence parallel not supported by torch LayerNorm"); apex's
``FusedLayerNorm`` and TE's norms support it. What sequence parallelism asks of a norm is only
this: each TP rank normalises its own slice of the sequence ([s/tp, b, h]) with the same
(replicated) weight, so each rank's weight gradient covers its slice only and the full gradient
is their SUM over TP. ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``)
sums exactly the parameters that carry ``sequence_parallel=True`` when the config has it on --
the attribute apex's ``FusedLayerNorm`` sets on its weight -- so this module sets it too.

State-dict names are ``torch.nn.RMSNorm``'s (``weight``), so HF conversion and megatron
checkpoints see the same keys as with ``WrappedTorchNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor; x [s, b, h] -> [s, b, h].

    The weight is created in ``config.params_dtype`` and marked ``sequence_parallel`` when the
    config has sequence parallelism on (its gradient is then summed over TP by megatron).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm":
            raise ValueError(f"popo_mega RMSNorm built for normalization={config.normalization!r}")
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("popo_mega RMSNorm does not support zero-centered gamma")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)
