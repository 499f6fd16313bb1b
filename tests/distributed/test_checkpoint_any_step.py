"""Checkpoints at any step (popo_mega.train.checkpoint), TP=1 x DP=2, with the distributed optimizer
and without: before the first optimizer step, after a skipped step with no real step before it, and
after a skipped step that follows a real one. Adam has no state before its first real step, and
megatron-core 0.16.1 could not write such a checkpoint (distrib_optimizer.py:641
``assert len(steps) == 1``).

One run (each DP rank gets its share of the positives; a NaN log-prob skips a step):

    save@0, skipped, save@1, real, skipped, save@3, real      (steps counted by trainer.step)

Fresh trainers load step 0, 1 and 3 and run the same remaining steps; each must end bit-identical
(weights, EMA, predictor, loss) to the uninterrupted run, and that run to one that never saved
(saving must not change the run: the Adam state created for the checkpoint is the state the first
real step would create). The expected learning rates come from the schedule by hand.

The same with megatron as with Transformer Engine installed (tests/fused_adam_standin.py: FusedAdam
keeps one int step per param group and raises KeyError('step') on a per-parameter one; the
torch-Adam ``step`` workarounds made every resume fail there, issue 10).
"""

import pytest
import torch

from tests.distributed.test_checkpoint_resume import OVER, _fresh
from tests.distributed.test_train_step import make_cfg, make_samples, snapshot
from tests.multiprocess import run_world
from tests.tiny_models import qwen2_config, save_tiny


def _batches(rt):
    from popo_mega.train.batch import shard_for_data_parallel

    share = shard_for_data_parallel([s for s in make_samples() if s.positive], rt.dp, rt.dp_rank)
    nan = [type(s)(**{**s.__dict__, "old_logp": torch.full_like(s.old_logp, float("nan"))}) for s in share]
    return share, nan


def _run(trainer, batches):
    """train_step over ``batches``; returns the stats and the snapshot at the end."""
    stats = [trainer.train_step(b) for b in batches]
    return {"stats": stats, "step": trainer.step, **snapshot(trainer)}


def _scenario(rt, path, where, distributed):
    from popo_mega.train import checkpoint as ckpt

    share, nan = _batches(rt)
    cfg = make_cfg(path, {**OVER, "parallel.distributed_optimizer": distributed})
    u = _fresh(cfg, rt)
    kinds = {type(o.optimizer).__name__ for o in ckpt._optimizers(u.optimizer)}
    ckpt.save_checkpoint(u, where, keep_last=3)
    first = _run(u, [nan])
    ckpt.save_checkpoint(u, where, keep_last=3)
    at2 = _run(u, [share])
    at3 = _run(u, [nan])
    ckpt.save_checkpoint(u, where, keep_last=3)
    at4 = _run(u, [share])
    never_saved = _run(_fresh(cfg, rt), [nan, share])
    resumed = {}
    for step, rest in ((0, [nan, share]), (1, [share]), (3, [share])):
        t = _fresh(cfg, rt)
        torch.manual_seed(99)   # the load must restore the RNG
        info = ckpt.load_checkpoint(t, f"{where}/step_{step:08d}")
        resumed[step] = {"info": info, **_run(t, rest)}
    subs = ckpt._optimizers(t.optimizer)   # the one resumed from step 3, after its real step
    return {"kinds": kinds, "u": {"first": first, 2: at2, 3: at3, 4: at4}, "never_saved": never_saved,
            "resumed": resumed, "group_steps": [g.get("step") for o in subs for g in o.optimizer.param_groups],
            "param_state_keys": {tuple(sorted(st)) for o in subs for st in o.optimizer.state.values()},
            "param_steps": {float(st["step"]) for o in subs for st in o.optimizer.state.values() if "step" in st}}


def _any_step(rank, world_size, path, root):
    """The scenario with torch Adam (megatron's fallback here) with and without the distributed
    optimizer, then with the FusedAdam stand-in (one process start for all three). A failure is
    kept per case so that each test reports its own."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException   # a BaseException

    from popo_mega.runtime import initialize
    from tests.fused_adam_standin import megatron_with_fused_adam_standin

    rt = initialize(1, 1, seed=0, device="cpu")
    assert rt.dp == 2
    out = {}
    for case, distributed in (("distributed", True), ("plain", False), ("fused_adam", True)):
        try:
            if case == "fused_adam":
                with megatron_with_fused_adam_standin():
                    out[case] = _scenario(rt, path, f"{root}/{case}", distributed)
            else:
                out[case] = _scenario(rt, path, f"{root}/{case}", distributed)
        except (Exception, CheckpointException):
            out[case] = {"error": traceback.format_exc()}
    return out


def _case(results, case):
    for r in results:
        assert "error" not in r[case], r[case].get("error")
    return [r[case] for r in results]


def _same(a, b, what):
    assert a["stats"][-1]["loss"] == b["stats"][-1]["loss"], what
    for key in ("weights", "ema", "predictor"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{what}: {key} {name} differs"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt_any")
    save_tiny(qwen2_config(), base / "qwen2")
    return run_world(_any_step, 2, str(base / "qwen2"), str(base / "checkpoints"))


@pytest.mark.parametrize("mode", ["distributed", "plain"])
def test_checkpoint_before_first_step_and_after_skipped_steps(results, mode):
    for r in _case(results, mode):
        assert r["kinds"] == {"AdamW"}   # megatron-core's torch fallback (no TE, no apex here)
        u = r["u"]
        # the skips happened, and the learning rate only moves on real steps:
        # warm-up of 2 steps to 1e-3 -> the 1st real step uses 5e-4, the 2nd 1e-3
        assert u["first"]["stats"][0]["skipped"] == 1.0 and u[3]["stats"][0]["skipped"] == 1.0
        assert u[2]["stats"][0]["skipped"] == 0.0 and u[4]["stats"][0]["skipped"] == 0.0
        assert u[2]["stats"][0]["lr"] == pytest.approx(5e-4) and u[4]["stats"][0]["lr"] == pytest.approx(1e-3)
        assert not torch.equal(u[2]["weights"]["model.norm.weight"], u["first"]["weights"]["model.norm.weight"])
        _same(r["never_saved"], u[2], f"{mode}: a run that never saved vs one that saved at steps 0 and 1")
        for step, ref in ((0, u[2]), (1, u[2]), (3, u[4])):
            res = r["resumed"][step]
            assert res["info"]["step"] == step and res["info"]["rng_restored"]
            assert res["step"] == ref["step"]
            assert res["stats"][-1]["lr"] == ref["stats"][-1]["lr"]
            _same(res, ref, f"{mode}: resumed from step {step}")
        # torch Adam keeps its step per parameter: after two real steps every state counts 2
        assert r["param_state_keys"] == {("exp_avg", "exp_avg_sq", "step")} and r["param_steps"] == {2.0}


def test_checkpoints_with_te_fused_adam_layout(results):
    """megatron as with Transformer Engine installed: its FusedAdam (here tests/fused_adam_standin.py)
    keeps one int step per param group and raises KeyError('step') on a per-parameter step, which
    the torch-Adam workarounds used to add on every load (issue 10: resume failed)."""
    for r in _case(results, "fused_adam"):
        assert r["kinds"] == {"FusedAdamStandIn"}
        u = r["u"]
        assert u["first"]["stats"][0]["skipped"] == 1.0 and u[4]["stats"][0]["skipped"] == 0.0
        _same(r["never_saved"], u[2], "FusedAdam: a run that never saved vs one that saved at steps 0 and 1")
        for step, ref in ((0, u[2]), (1, u[2]), (3, u[4])):
            res = r["resumed"][step]
            assert res["info"]["step"] == step and res["info"]["shared_adam_steps_fixed"] == 0
            _same(res, ref, f"FusedAdam: resumed from step {step}")
        # two real steps, counted once per non-empty param group; no per-parameter step
        assert set(s for s in r["group_steps"] if s is not None) == {2}
        assert r["param_state_keys"] == {("exp_avg", "exp_avg_sq")} and r["param_steps"] == set()
