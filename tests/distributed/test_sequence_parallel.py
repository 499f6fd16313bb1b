"""Sequence parallelism in the POPO policy step: TP=2 with SP must equal TP=1 (float32, gloo).

Under SP each TP rank holds a slice [T/2, 1, H] of the hidden states between the row- and
column-parallel linears, so three things must be right for the step to be unchanged:
* the norms' weight gradients (each rank sees only its slice) are summed over TP -- our RMSNorm
  marks its weight ``sequence_parallel`` for megatron's finalize_model_grads;
* the P3 features are pooled from the all-gathered final-norm hidden state, and the gather's
  backward gives each rank its slice of the (already full) gradient, not tp times it;
* micro-batches are padded to a multiple of tp, and the padding enters no loss term.

The comparison runs POPO with the predictor (alpha != 0), so the pooling path is in the loss, over
two steps (the second uses the EMA target and the weights the first step produced): the target
pass, the losses and gradient norms, every step-1 gradient, and the weights, EMA and predictor.
"""

import pytest
import torch

from tests.distributed.test_train_step import make_cfg, make_samples, snapshot
from tests.multiprocess import run_world
from tests.tiny_models import qwen2_config, save_tiny

STATS = ("loss", "pg", "sim", "ent", "grad_norm", "weighted_cos_sum", "entropy_sum")


def _grads(trainer):
    """HF-named full gradients of the step just taken: megatron's main_grad (left in the DDP buffers
    after the step; no clipping at these norms), TP shards gathered like the weights; the predictor's too."""
    from megatron.core import parallel_state as ps

    from popo_mega.model.hf import iter_hf_tensors

    class Grads:   # iter_hf_tensors reads model.state_dict(keep_vars=True)
        def state_dict(self, keep_vars=False):
            return {k: getattr(v, "main_grad", v) for k, v in trainer.model.state_dict(keep_vars=True).items()}

    group = ps.get_tensor_model_parallel_group()
    out = {k: v.clone() for k, v in iter_hf_tensors(Grads(), trainer.arch, trainer.layout, group)}
    out.update({f"predictor.{k}": p.main_grad.clone() for k, p in trainer.predictor.named_parameters()})
    return out


def _run(rank, world_size, path, sp):
    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize
    from popo_mega.train.step import PolicyTrainer

    # train.kernels=reference: this test is about the parallel layout, not the fused kernels
    cfg = make_cfg(path, {"train.kernels": "reference"}, tensor=world_size, sequence_parallel=sp)
    rt = initialize(world_size, 1, seed=0, device="cpu")
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt, sequence_parallel=sp))
    assert trainer.model.config.sequence_parallel == sp
    norms = [p for n, p in trainer.model.named_parameters() if "layernorm" in n]
    assert len(norms) == 2 * 2 + 1 and all(getattr(p, "sequence_parallel", None) == sp for p in norms)
    samples = make_samples()
    init = snapshot(trainer)
    mbs = trainer.pack([s for s in samples if s.positive])
    trainer.target_pass(mbs)
    target = {}   # uid -> (pooled features [H], EMA log-probs of its response tokens)
    for mb in mbs:
        for b in range(mb.num_sequences):
            lo, hi = int(mb.cu_seqlens[b]), int(mb.cu_seqlens[b + 1])
            on = mb.mask[lo:hi] > 0
            target[int(mb.uids[b])] = (mb.extras["target_features"][b], mb.extras["target_logp"][lo:hi][on])
    out = {"init": init, "target": target, "lengths": [(mb.num_tokens, mb.padded_tokens) for mb in mbs],
           "stats": [trainer.train_step(samples)]}
    out["step1"] = {**snapshot(trainer), "grads": _grads(trainer)}
    out["stats"].append(trainer.train_step(samples))
    out.update(snapshot(trainer))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    save_tiny(qwen2_config(), path)
    tp1 = run_world(_run, 1, str(path), False)[0]
    sp = run_world(_run, 2, str(path), True)
    return tp1, sp


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    errs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def test_micro_batches_are_padded_to_a_multiple_of_tp(runs):
    tp1, sp = runs
    assert [t for t, _ in sp[0]["lengths"]] == [t for t, _ in tp1["lengths"]]       # same real tokens
    assert all(p % 2 == 0 and 0 <= p - t < 2 for t, p in sp[0]["lengths"])
    assert any(p > t for t, p in sp[0]["lengths"]), "no micro-batch needed padding: the test would not cover it"
    assert all(p == t for t, p in tp1["lengths"])


def test_target_pass_under_sp_equals_tp1(runs):
    tp1, sp = runs
    assert sp[0]["target"].keys() == tp1["target"].keys() and len(tp1["target"]) == 4
    feat = max((sp[0]["target"][u][0] - tp1["target"][u][0]).abs().max().item() for u in tp1["target"])
    logp = max((sp[0]["target"][u][1] - tp1["target"][u][1]).abs().max().item() for u in tp1["target"])
    print(f"SP target pass: features max |diff| {feat:.2e}, log-probs max |diff| {logp:.2e}")
    assert feat < 1e-5 and logp < 1e-5


def test_sp_step_equals_tp1(runs):
    tp1, sp = runs
    assert sp[0]["stats"] == sp[1]["stats"]                # every rank reports the same numbers
    for step, (a, b) in enumerate(zip(sp[0]["stats"], tp1["stats"])):
        assert a["skipped"] == b["skipped"] == 0.0
        for k in STATS:
            print(f"step {step + 1} {k}: tp=2+SP {a[k]:.9f}, tp=1 {b[k]:.9f}, |diff| {abs(a[k] - b[k]):.2e}")
            assert abs(a[k] - b[k]) <= 2e-6 * max(1.0, abs(b[k])), (step, k, a[k], b[k])
    # The step-1 gradients (norm layers, embedding, predictor: every parameter) agree to fp32 rounding.
    assert tp1["stats"][0]["grad_norm"] < 1.0                 # train.grad_clip did not scale them
    for r in sp:
        want, got = tp1["step1"]["grads"], r["step1"]["grads"]
        err, worst = _max_diff(got, want)
        scale = max(g.abs().max().item() for g in want.values())
        print(f"step-1 gradients: max |tp=2+SP - tp=1| = {err:.2e} ({worst}); largest |gradient| {scale:.2e}")
        assert err < 2e-6 * scale, (worst, err)
        assert min(want[k].abs().max().item() for k in want if "norm" in k) > 1e-4   # norm grads are not ~0
    # the step moved the weights by far more than the tolerance, so equality is not vacuous
    moved, _ = _max_diff(tp1["weights"], tp1["init"]["weights"])
    assert moved > 1e-3
    # Adam moves an element with a near-zero gradient by O(lr) whatever the gradient's rounding, so
    # single elements agree to a fraction of lr (1e-3); the whole update to 5e-4 relative L2.
    for when in ("step1", "step2"):
        for key in ("weights", "ema", "predictor"):
            init = tp1["init"][key]
            want = (tp1["step1"] if when == "step1" else tp1)[key]
            ref = torch.cat([(want[n] - init[n]).flatten() for n in init])
            for r in sp:
                got = (r["step1"] if when == "step1" else r)[key]
                err, worst = _max_diff(got, want)
                rel = (torch.cat([(got[n] - init[n]).flatten() for n in init]) - ref).norm() / ref.norm()
                print(f"{key} after {when}: max |tp=2+SP - tp=1| = {err:.2e} ({worst}), "
                      f"relative L2 difference of the update {rel:.2e}")
                assert err < 1e-4 and rel < 5e-4, (when, key, worst, err, rel)
