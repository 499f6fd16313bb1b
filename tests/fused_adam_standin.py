"""A CPU stand-in for Transformer Engine's FusedAdam, to test megatron-core's TE code paths here
(TE needs a CUDA torch to build and CUDA to run: ../shared/design/environment.md).

    from tests.fused_adam_standin import FusedAdamStandIn, megatron_with_fused_adam_standin
    with megatron_with_fused_adam_standin():   # megatron "has TE": its optimizer is the stand-in
        trainer = PolicyTrainer(...)            # build, step, save and load all inside the block

What it keeps of TE's FusedAdam (transformer_engine/pytorch/optimizers/fused_adam.py), and it is
at least as strict about each:

* the step counter is ONE python int per param group, ``group["step"]``: set to 1 at a non-empty
  group's first step(), incremented at every later one, whether or not a parameter has a gradient;
  there is no per-parameter ``step``;
* the per-parameter state is exp_avg and exp_avg_sq (TE adds master_param only with
  ``master_weights``, which megatron sets for its precision-aware optimizer only; refused here),
  created as zeros in step() for a parameter with empty state;
* state_dict() and load_state_dict() accept no other per-parameter key: TE maps every key through
  ``name_to_dtype_map`` (get_unscaled_state, set_scaled_state), so e.g. a ``step`` added to a
  parameter's state raises KeyError('step'); here too, on save and on load;
* the update: Adam with bias correction from the group step; ``adam_w_mode`` True (megatron's
  default, decoupled_weight_decay) decays the weights like torch.optim.AdamW, False adds L2 to the
  gradient like torch.optim.Adam. tests/unit/test_fused_adam_standin.py checks both against torch.

Written from TE's documented behaviour and the layout of its source; no TE code is copied.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["FusedAdamStandIn", "megatron_with_fused_adam_standin"]

STATE_NAMES = ("exp_avg", "exp_avg_sq")


def _check_state_names(state: dict) -> None:
    for per_param in state.values():
        for name in per_param:
            if name not in STATE_NAMES:
                raise KeyError(name)   # as TE's name_to_dtype_map[name] lookup does


class FusedAdamStandIn(torch.optim.Optimizer):
    """Same constructor as TE's FusedAdam for the arguments megatron-core passes (params, lr, betas,
    eps, weight_decay, adam_w_mode, bias_correction); options this stand-in does not model
    (amsgrad, capturable, master weights, low-precision states) raise."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 bias_correction=True, adam_w_mode=True, capturable=False, master_weights=False, **other):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        if capturable or master_weights or other:
            raise NotImplementedError(f"FusedAdamStandIn models the default FusedAdam only, got "
                                      f"capturable={capturable} master_weights={master_weights} {sorted(other)}")
        super().__init__(params, {"lr": lr, "bias_correction": bias_correction, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.adam_w_mode = 1 if adam_w_mode else 0

    def state_dict(self):
        sd = super().state_dict()
        _check_state_names(sd["state"])
        return sd

    def load_state_dict(self, state_dict):
        _check_state_names(state_dict["state"])
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if len(group["params"]) == 0:
                continue
            group["step"] = group["step"] + 1 if "step" in group else 1
            t = group["step"]
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            c1, c2 = (1 - beta1 ** t, 1 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
            for p in group["params"]:
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if p.grad is None:
                    continue
                g = p.grad.float()
                w = p.float()
                if not self.adam_w_mode and wd:
                    g = g + wd * w
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / c1) / ((v / c2).sqrt() + eps)
                if self.adam_w_mode and wd:
                    update = update + wd * w
                p.copy_(w - lr * update)
        return loss


@contextlib.contextmanager
def megatron_with_fused_adam_standin():
    """Inside the block, megatron-core 0.16.1 in THIS process behaves as if Transformer Engine were
    installed, with the stand-in as TE's FusedAdam: the import-time choices of
    megatron/core/optimizer/__init__.py (lines 12-16: ``Adam`` = TE FusedAdam,
    ``USING_PYTORCH_OPTIMIZER = False``) and of optimizer/distrib_optimizer.py (lines 21-27:
    ``Adam``, ``HAVE_APEX_OR_TE``, ``USING_TE_OPTIMIZER``). megatron reads the flags again in every
    state_dict() / load_state_dict() (distrib_optimizer.py:639-682, 817-836), so build, step, save
    and load inside the block. Restored on exit. For spawned test processes."""
    import megatron.core.optimizer as mo
    import megatron.core.optimizer.distrib_optimizer as do

    patch = [(mo, "Adam", FusedAdamStandIn), (mo, "USING_PYTORCH_OPTIMIZER", False), (do, "Adam", FusedAdamStandIn),
             (do, "HAVE_APEX_OR_TE", True), (do, "USING_TE_OPTIMIZER", True), (do, "USING_APEX_OPTIMIZER", False)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patch]
    try:
        for mod, name, value in patch:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
