"""Forward-only passes through megatron-core's pipeline schedule (any TP/PP layout).

The same schedule the trainer uses for forward+backward, with ``forward_only=True``; the last
pipeline stage gets each micro-batch's output (vocab-parallel logits [b, s, V_padded/tp]) through
``collect``; other stages return nothing.
"""

from __future__ import annotations

from typing import Callable

import torch


def forward_only(model, batches: list[dict], collect: Callable[[torch.Tensor, dict], object]) -> list:
    """Run ``model`` on micro-batches ``{"tokens": [b, s], "position_ids": [b, s], ...}`` without grad.

    ``collect(output, batch)`` runs on the last stage for each micro-batch (output: the model's
    output tensor); its results are returned in order on the last stage, ``[]`` elsewhere.
    All micro-batches must have the same [b, s] (pad them) unless PP == 1.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    results: list = []
    it = iter(batches)

    def forward_step(data_iterator, model_chunk):
        batch = next(data_iterator)
        output = model_chunk(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                             packed_seq_params=batch.get("packed_seq_params"))

        def loss_func(out):
            results.append(collect(out, batch))
            return torch.zeros((), device=out.device), {}

        return output, loss_func

    b, s = batches[0]["tokens"].shape
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=it, model=[model], num_microbatches=len(batches),
                seq_length=s, micro_batch_size=b, forward_only=True)
    finally:
        model.train(was_training)
    return results if parallel_state.is_pipeline_last_stage() else []
