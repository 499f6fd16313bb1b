"""Data parallelism (2 gloo processes): each rank computes its rollouts' loss with the all-reduced
GLOBAL normalisers; the SUM of the ranks' gradients equals the full-batch gradient (POPO with all
terms, GRPO token_mean and seq_mean_token_mean)."""

import torch
import torch.distributed as dist

from tests.multiprocess import run_world
from tests.unit.test_microbatch import (grads, grpo_microbatch_loss, make_batch, make_models,
                                        popo_local_normalisers, popo_microbatch_loss)


def _all_reduce_grads(modules):
    for m in modules:
        for p in m.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def _dp_worker(rank, world_size):
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    batch = make_batch()
    full = list(range(12))
    my_rows = full[rank * 6:(rank + 1) * 6]
    micro = [my_rows[:4], my_rows[4:]]                 # gradient accumulation inside each rank too
    errors = {}

    # POPO: local normalisers summed over micro-batches, all-reduced over ranks.
    model, pred = make_models()
    full_norms = popo_local_normalisers(batch, full)
    popo_microbatch_loss(model, pred, batch, full, full_norms).backward()
    g_full = grads([model, pred])
    model.zero_grad(); pred.zero_grad()
    local = [popo_local_normalisers(batch, c) for c in micro]
    norms = {k: sum(p[k] for p in local).clone() for k in local[0]}
    for v in norms.values():
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
    for c in micro:
        popo_microbatch_loss(model, pred, batch, c, norms).backward()
    _all_reduce_grads([model, pred])
    errors["popo"] = max((a - b).abs().max().item() for a, b in zip(grads([model, pred]), g_full))
    errors["popo_norms"] = max(abs(norms[k].item() - full_norms[k].item()) for k in norms)

    for agg in ("token_mean", "seq_mean_token_mean"):
        model, _ = make_models()
        if agg == "token_mean":
            count = torch.tensor(float(sum(batch["masks"][i].sum() for i in my_rows)), dtype=torch.float64)
        else:
            count = torch.tensor(float(len(my_rows)), dtype=torch.float64)
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        full_count = float(sum(m.sum() for m in batch["masks"])) if agg == "token_mean" else 12.0
        grpo_microbatch_loss(model, batch, full, full_count, agg).backward()
        g_full = grads([model])
        model.zero_grad()
        for c in micro:
            grpo_microbatch_loss(model, batch, c, count, agg).backward()
        _all_reduce_grads([model])
        errors[agg] = max((a - b).abs().max().item() for a, b in zip(grads([model]), g_full))
    return errors


def test_dp_gradient_equals_full_batch_on_gloo():
    results = run_world(_dp_worker, 2, timeout=120)
    for rank, errors in enumerate(results):
        for name, err in errors.items():
            assert err < 1e-13, f"rank {rank} {name}: max |grad_dp - grad_full| = {err}"
