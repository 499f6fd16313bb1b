"""Checkpoints (popo_mega.train.checkpoint): save after step 1, load into a FRESH trainer, run step 2;
it must equal the uninterrupted run's step 2 (loss, weights, EMA, predictor).

* TP=2 -> TP=2: bit-identical (same layout: RNG states restored too).
* TP=2 -> TP=1 x DP=2 (re-sharded load, same two processes re-initialised): equal to tolerance.
* Without giving each Adam state its own ``step`` (megatron-core 0.16.1 shares one tensor after
  load) step 2 is wrong: the same comparison then fails, so this test catches that pitfall.
* A checkpoint directory without the completion marker (a crash mid-save) is never loaded.
"""

import os

import pytest
import torch

from tests.distributed.test_train_step import _compare, make_cfg, make_samples, snapshot
from tests.multiprocess import run_world
from tests.tiny_models import qwen2_config, save_tiny

OVER = {"algorithm.popo.noise_std": 0.02, "train.warmup_steps": 2}


def _fresh(cfg, rt):
    from popo_mega.model.loader import build_from_hf
    from popo_mega.train.step import PolicyTrainer

    return PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))


def _save_and_resume(rank, world_size, tp, path, root):
    import torch.distributed as dist

    from popo_mega.runtime import initialize
    from popo_mega.train import checkpoint as ckpt

    cfg = make_cfg(path, OVER, tensor=tp)
    rt = initialize(tp, 1, seed=0, device="cpu")
    samples = make_samples()
    a = _fresh(cfg, rt)
    first = a.train_step(samples)
    saved = ckpt.save_checkpoint(a, root, extra={"data_cursor": 6}, keep_last=2)
    after1 = snapshot(a)["weights"]
    uninterrupted = {"stats": [first, a.train_step(samples)], **snapshot(a)}
    ckpt.export_hf(a, root + "_hf_ema", "ema")
    torch.manual_seed(1234)  # disturb the RNG: the load must restore it

    # A crash while writing step 9: the directory exists, the marker does not.
    if rank == 0:
        os.makedirs(os.path.join(root, "step_00000009"))
        os.makedirs(os.path.join(root, ".tmp_step_00000010"))
    dist.barrier()
    b = _fresh(cfg, rt)
    info = ckpt.load_checkpoint(b, root)
    resumed = {"stats": [first, b.train_step(samples)], **snapshot(b)}
    with pytest.raises(FileNotFoundError, match="not completely written"):
        ckpt.load_checkpoint(b, os.path.join(root, "step_00000009"))  # raises before touching b

    # Negative control: the same resume without un-sharing Adam's step tensor.
    c = _fresh(cfg, rt)
    real = ckpt._unshare_adam_steps
    ckpt._unshare_adam_steps = lambda opt: 0
    try:
        ckpt.load_checkpoint(c, root)
    finally:
        ckpt._unshare_adam_steps = real
    shared = {"stats": [first, c.train_step(samples)], **snapshot(c)}
    resharded = _load_at_tp1_dp2(path, root)
    bf16 = _bf16_resume(path, root + "_bf16")
    return {"bf16": bf16, "saved": saved, "after1": after1, "resharded": resharded, "info": info, "uninterrupted": uninterrupted, "resumed": resumed, "shared": shared,
            "listed": [s for s, _ in ckpt.list_checkpoints(root)]}


def _load_at_tp1_dp2(path, root):
    """The same processes re-initialised as TP=1 x DP=2: load the TP=2 checkpoint (re-sharded), run
    step 2 with each DP rank's share of the rollouts."""
    from megatron.core import parallel_state

    from popo_mega.runtime import initialize
    from popo_mega.train import checkpoint as ckpt
    from popo_mega.train.batch import shard_for_data_parallel

    parallel_state.destroy_model_parallel()
    cfg = make_cfg(path, OVER, tensor=1)
    rt = initialize(1, 1, seed=0, device="cpu")
    assert rt.dp == 2
    t = _fresh(cfg, rt)
    info = ckpt.load_checkpoint(t, root)
    share = shard_for_data_parallel([s for s in make_samples() if s.positive], rt.dp, rt.dp_rank)
    return {"info": info, "stats": [None, t.train_step(share)], **snapshot(t)}


def _bf16_resume(path, root):
    """bf16 model (fp32 main params in the distributed optimizer) at TP=1 x DP=2: save after step 1,
    resume in a fresh trainer; step 2 must be bit-identical."""
    from popo_mega.train import checkpoint as ckpt
    from popo_mega.runtime import initialize
    from popo_mega.train.batch import shard_for_data_parallel

    cfg = make_cfg(path, {**OVER, "model.dtype": "bfloat16"}, tensor=1)
    rt = initialize(1, 1, seed=0, device="cpu")   # already initialised by _load_at_tp1_dp2: reuses it
    share = shard_for_data_parallel([s for s in make_samples() if s.positive], rt.dp, rt.dp_rank)
    a = _fresh(cfg, rt)
    assert all(p.dtype == torch.bfloat16 for p in a.model.parameters())
    a.train_step(share)
    ckpt.save_checkpoint(a, root)
    ua = a.train_step(share)
    b = _fresh(cfg, rt)
    ckpt.load_checkpoint(b, root)
    ub = b.train_step(share)
    os.makedirs(os.path.join(root, ".tmp_step_00000007"), exist_ok=True)   # stale, from a crash
    ckpt.save_checkpoint(b, root, keep_last=1)
    kept = sorted(os.listdir(root))
    shadow = lambda t: {k: v.clone() for k, v in t.ema.named_tensors()}  # noqa: E731  fp32 EMA itself
    return {"a": {"stats": ua, "shadow": shadow(a), **snapshot(a)}, "b": {"stats": ub, "shadow": shadow(b), **snapshot(b)},
            "kept": kept}


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    save_tiny(qwen2_config(), base / "qwen2")
    root = str(base / "checkpoints")
    results = run_world(_save_and_resume, 2, 2, str(base / "qwen2"), root)
    return {"path": str(base / "qwen2"), "root": root, "results": results}


def test_resume_same_layout_is_exact(tp2_run):
    for r in tp2_run["results"]:
        assert r["info"]["step"] == 1 and r["info"]["extra"] == {"data_cursor": 6}
        assert r["info"]["rng_restored"] and r["info"]["shared_adam_steps_fixed"] > 0
        assert r["info"]["path"].endswith("step_00000001")   # step_00000009 has no marker
        assert r["listed"] == [1]
        u, s = r["uninterrupted"], r["resumed"]
        assert u["stats"][1]["loss"] == s["stats"][1]["loss"]
        # train.lr 1e-3 with 2 warm-up steps: step 1 uses 5e-4, step 2 1e-3, also after the resume
        assert u["stats"][0]["lr"] == pytest.approx(5e-4) and u["stats"][1]["lr"] == pytest.approx(1e-3)
        assert s["stats"][1]["lr"] == pytest.approx(1e-3)
        for key in ("weights", "ema", "predictor"):
            for name in u[key]:
                assert torch.equal(u[key][name], s[key][name]), f"{key} {name} differs after resume"


def test_bf16_resume_is_exact(tp2_run):
    for r in tp2_run["results"]:
        a, b = r["bf16"]["a"], r["bf16"]["b"]
        assert a["stats"]["loss"] == b["stats"]["loss"] and a["stats"]["skipped"] == 0.0
        for key in ("weights", "ema", "predictor", "shadow"):
            for name in a[key]:
                assert torch.equal(a[key][name], b[key][name]), f"bf16 {key} {name} differs after resume"
        assert all(t.dtype == torch.float32 for t in a["shadow"].values())
        assert r["bf16"]["kept"] == ["step_00000002"]   # keep_last=1 pruned step 1 and the stale tmp dir
        assert a["ema"]["model.norm.weight"].dtype == torch.bfloat16  # exported in the model dtype


def test_export_ema_as_hf(tp2_run):
    from transformers import AutoModelForCausalLM

    u = tp2_run["results"][0]["uninterrupted"]
    model = AutoModelForCausalLM.from_pretrained(tp2_run["root"] + "_hf_ema", dtype=torch.float32)
    state = model.state_dict()
    for name, t in u["ema"].items():
        assert torch.equal(state[name], t), name
    assert not torch.equal(u["ema"]["model.norm.weight"], u["weights"]["model.norm.weight"])


def test_shared_adam_step_would_be_caught(tp2_run):
    r = tp2_run["results"][0]
    u, c = r["uninterrupted"], r["shared"]
    init = r["after1"]
    du = torch.cat([(u["weights"][n] - init[n]).flatten() for n in init])
    dc = torch.cat([(c["weights"][n] - init[n]).flatten() for n in init])
    rel = ((dc - du).norm() / du.norm()).item()
    print(f"step-2 update with one shared Adam step tensor: relative L2 error {rel:.3f}")
    assert rel > 0.05   # 25x the tolerance of the layout comparisons (2e-3)
    with pytest.raises(AssertionError):
        _compare(c, u, "shared Adam step", init=init)


def test_resume_tp2_checkpoint_at_tp1_dp2(tp2_run):
    u = tp2_run["results"][0]["uninterrupted"]
    for res in tp2_run["results"]:
        r = res["resharded"]
        assert r["info"]["step"] == 1 and not r["info"]["rng_restored"]
        _compare({**r, "stats": [u["stats"][0], r["stats"][1]]}, u, "tp2 -> tp1 x dp2",
                 init=tp2_run["results"][0]["after1"])
