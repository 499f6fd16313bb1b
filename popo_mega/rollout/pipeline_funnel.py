"""Bring every pipeline stage's HF tensors to the one trainer rank that talks to the rollout servers.

``popo_mega.model.hf.iter_hf_tensors`` yields one stage's (HF name, full tensor) pairs on every TP
rank of that stage (it gathers TP shards). The weight-update group has a single sender (rank 0 of
``WeightUpdateGroup``: the first stage's TP rank 0), so with PP > 1 the later stages' tensors are
sent to it point-to-point over the pipeline group, one tensor at a time (no stage is ever held in
memory whole):

    tensors = iter_hf_tensors(model, arch, layout, tp_group)          # collective over TP
    tensors = funnel_pipeline_stages(tensors, pp_group=pp, tp_rank=tp_rank)
    if is_sender: engine.sync_weights(tensors, version)                # PP rank 0, TP rank 0
    else: drain(tensors)                                               # everyone else, in step

Order: stage 0's tensors, then stage 1's, ... Every rank must iterate its result to the end.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist


def funnel_pipeline_stages(named_tensors: Iterable[tuple[str, torch.Tensor]], *, pp_group,
                           tp_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """On PP rank 0 / TP rank 0: all stages' (name, tensor) in stage order; elsewhere: nothing.

    TP ranks other than 0 only consume their iterator (its TP gathers need them); later stages'
    TP rank 0 send each tensor to PP rank 0 (metadata with ``send_object_list``, data with ``send``).
    ``pp_group`` must be the pipeline group that contains this rank (with TP rank 0's members for
    the senders); a None group or a single stage passes the tensors through.
    """
    stages = dist.get_world_size(pp_group) if pp_group is not None and dist.is_initialized() else 1
    if tp_rank != 0:
        for _ in named_tensors:
            pass
        return
    if stages == 1:
        yield from named_tensors
        return
    me = dist.get_rank(pp_group)
    if me == 0:
        yield from named_tensors
        for stage in range(1, stages):
            src = dist.get_global_rank(pp_group, stage)
            while True:
                meta = [None]
                dist.recv_object_list(meta, src=src, group=pp_group)
                if meta[0] is None:
                    break
                name, shape, dtype, device_type = meta[0]
                device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
                tensor = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(tensor, src=src, group=pp_group)
                yield name, tensor
    else:
        dst = dist.get_global_rank(pp_group, 0)
        for name, tensor in named_tensors:
            t = tensor.detach().contiguous()
            dist.send_object_list([(name, tuple(t.shape), t.dtype, t.device.type)], dst=dst, group=pp_group)
            dist.send(t, dst=dst, group=pp_group)
        dist.send_object_list([None], dst=dst, group=pp_group)
