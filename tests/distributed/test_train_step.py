"""The POPO policy step through megatron-core (popo_mega.train.step.PolicyTrainer).

* TP=1: the target pass (EMA = initial weights) gives the HF model's log-probs and pooled final-norm
  features of every rollout (computed unpacked, one rollout at a time, over the real vocabulary);
  the step-1 loss equals a float64 re-computation of Eq. P2-P5 from the HF logits.
* TP=2 and PP=2 give the same losses, updated weights, EMA and predictor as TP=1 over two steps.
* entropy_on=positive feeds only the positives to the model (tokens counted by a hook on the model
  input); entropy_on=all feeds all; a NaN loss skips the update and leaves the weights untouched.

All Megatron work runs in spawned processes (tests.multiprocess.run_world); 2 processes at most.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.multiprocess import run_world

WEIGHTS = {0: .3, 2: .7, 3: .6, 5: .4}   # POPO w_i of the positives (groups of 3: i % 3 != 1 positive)
ALPHA, BETA, EPS_LOW, EPS_HIGH = 0.1, 0.01, 0.2, 0.28


def make_samples(n=6, seed=0, vocab=251):
    from popo_mega.train.batch import RolloutSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(2, 5, (1,), generator=g))
        R = int(torch.randint(2, 7, (1,), generator=g))
        toks = torch.randint(1, vocab, (P + R,), generator=g)
        out.append(RolloutSample(toks, P, old_logp=-torch.rand(R, generator=g) * 3, weight=WEIGHTS.get(i, 0.0),
                                 advantage=float(i % 3) - 1, positive=i in WEIGHTS, uid=i))
    return out


def make_cfg(path, over=None, **parallel):
    from popo_mega.config import config_from_dict

    raw = {"model": {"hf_path": path, "dtype": "float32"},
           "parallel": {"tensor": 1, "pipeline": 1, **parallel},
           "train": {"lr": 1e-3, "micro_batch_tokens": 24, "steps": 10, "grad_clip": 1.0, "seed": 3},
           "algorithm": {"eps_low": EPS_LOW, "eps_high": EPS_HIGH,
                         "popo": {"predictor_hidden": 32, "tau": 0.9, "alpha": ALPHA, "beta": BETA,
                                  "noise_std": 0.0, "is_correction": "token"}}}
    for key, value in (over or {}).items():
        node = raw
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    return config_from_dict(raw)


def full_weights(trainer):
    """HF-named full tensors of this stage (TP shards gathered)."""
    from megatron.core import parallel_state as ps

    from popo_mega.model.hf import iter_hf_tensors

    group = ps.get_tensor_model_parallel_group()
    return {k: v.clone() for k, v in iter_hf_tensors(trainer.model, trainer.arch, trainer.layout, group)}


def snapshot(trainer):
    out = {"weights": full_weights(trainer), "predictor": None, "ema": None}
    if trainer.ema is not None:
        with torch.no_grad(), trainer.ema.swapped_into(trainer.model):
            out["ema"] = full_weights(trainer)
    if trainer.predictor is not None:
        out["predictor"] = {k: v.detach().clone() for k, v in trainer.predictor.state_dict().items()}
    return out


def _steps(rank, world_size, tp, pp, path, n_steps, then_dp2=False):
    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize
    from popo_mega.train.step import PolicyTrainer

    cfg = make_cfg(path, tensor=tp, pipeline=pp)
    rt = initialize(tp, pp, seed=0, device="cpu")
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
    samples = make_samples()
    init = snapshot(trainer)
    out = {"init_predictor": init["predictor"], "init_weights": init["weights"]}
    mbs = trainer.pack([s for s in samples if s.positive])
    trainer.target_pass(mbs)
    out["target"] = [(mb.uids, mb.extras.get("target_logp"), mb.extras.get("target_features"), mb.mask,
                      mb.cu_seqlens) for mb in mbs]
    trainer.tokens_seen = 0
    out["stats"] = [trainer.train_step(samples) for _ in range(n_steps)]
    out["tokens_seen"] = trainer.tokens_seen
    out.update(snapshot(trainer))
    if tp == pp == 1:
        out["step3"] = {"stats": [trainer.train_step(samples)], **snapshot(trainer)}
        out["entropy_all_and_nan"] = _entropy_all_and_nan(rt, path)
        out["grpo"] = _grpo_step(rt, path)
        out["a3po"] = _grpo_step(rt, path, "a3po")
        out["kernels"] = _kernel_paths(rt, path)
    if then_dp2:   # same processes, re-initialised as TP=1 x DP=2 (saves a process start)
        out["dp2"] = _dp2_steps(path, n_steps)
    return out


def _dp2_steps(path, n_steps):
    """Two DP ranks, each with its share of the positives (negatives are never fed anyway)."""
    from megatron.core import parallel_state

    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize
    from popo_mega.train.batch import shard_for_data_parallel
    from popo_mega.train.step import PolicyTrainer

    parallel_state.destroy_model_parallel()
    cfg = make_cfg(path)
    rt = initialize(1, 1, seed=0, device="cpu")
    assert rt.dp == 2
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
    share = shard_for_data_parallel([s for s in make_samples() if s.positive], rt.dp, rt.dp_rank)
    stats = [trainer.train_step(share) for _ in range(n_steps)]
    out = {"stats": stats, "share": [s.uid for s in share], **snapshot(trainer)}
    # Step 3: every rollout on DP rank 0, none on rank 1 (it runs an all-masked dummy micro-batch).
    pos = [s for s in make_samples() if s.positive]
    s3 = trainer.train_step(pos if rt.dp_rank == 0 else [])
    out["step3"] = {"stats": [s3], **snapshot(trainer)}
    return out


def _grpo_step(rt, path, name="grpo"):
    """A GRPO / A3PO trainer (token_mean, eps 0.2/0.28) in the TP=1 process: one step on all 6 rollouts."""
    from popo_mega.model.loader import build_from_hf
    from popo_mega.train.step import PolicyTrainer

    cfg = make_cfg(path, {"algorithm.name": name})
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
    assert trainer.ema is None and trainer.predictor is None
    trainer.tokens_seen = 0
    stats = trainer.train_step(make_samples())
    return {"stats": stats, "tokens_seen": trainer.tokens_seen}


def _kernel_paths(rt, path):
    """One POPO step and one GRPO step with train.kernels=extension and =reference (fresh trainers)."""
    from popo_mega.model.loader import build_from_hf
    from popo_mega.ops import _extension
    from popo_mega.train.step import PolicyTrainer

    out = {"built": _extension.load()}
    for name in ("popo", "grpo"):
        for impl in ("extension", "reference"):
            cfg = make_cfg(path, {"algorithm.name": name, "train.kernels": impl})
            trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
            samples = make_samples() if name == "grpo" else [s for s in make_samples() if s.positive]
            out[name, impl] = {"stats": trainer.train_step(samples), "weights": full_weights(trainer)}
    return out


@pytest.fixture(scope="module")
def tp1(hf_path):
    return run_world(_steps, 1, 1, 1, hf_path, 2)[0]


@pytest.fixture(scope="module")
def tp2(hf_path):
    return run_world(_steps, 2, 2, 1, hf_path, 2, True)


def _hf_reference(path, samples):
    """Per rollout (unpacked): float64 log-softmax over the real vocabulary and final-norm features."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    captured = {}
    model.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("h", o))
    ref = []
    with torch.no_grad():
        for s in samples:
            logits = model(s.tokens[None]).logits[0]                    # [L, 251]
            logq = F.log_softmax(logits, -1)
            P, L = s.prompt_len, s.tokens.numel()
            logp = logq[P - 1:L - 1].gather(1, s.tokens[P:, None])[:, 0]  # response tokens
            ent = -(logq.exp() * logq).sum(-1)[P - 1:L - 1]
            feat = captured["h"][0, P:L].mean(0)
            ref.append({"logp": logp, "ent": ent, "feat": feat})
    return ref


def test_target_pass_and_loss_match_hf_float64(hf_path, tp1):
    samples = make_samples()
    ref = _hf_reference(hf_path, samples)
    for idx, logp, feats, mask, cu in tp1["target"]:
        for b, i in enumerate(idx.tolist()):
            s = samples[i]
            lo, hi = int(cu[b]), int(cu[b + 1])
            got = logp[lo:hi][mask[lo:hi] > 0]
            assert torch.allclose(got.double(), ref[i]["logp"], atol=2e-5), (i, got, ref[i]["logp"])
            assert torch.allclose(feats[b].double(), ref[i]["feat"], atol=2e-5)
            assert s.positive
    # Eq. P2 (token IS correction, A = w), P3 (predictor at init, no noise), P4 (positives), P5.
    from popo_mega.algorithms.predictor import Predictor

    pred_net = Predictor(64, 32, 2).double()
    pred_net.load_state_dict({k: v.double() for k, v in tp1["init_predictor"].items()})
    pos = [i for i in WEIGHTS]
    n_pos = sum(samples[i].tokens.numel() - samples[i].prompt_len for i in pos)
    pg = 0.0
    sim_num = 0.0
    ent = 0.0
    for i in pos:
        w = WEIGHTS[i]
        rho = torch.exp(ref[i]["logp"] - samples[i].old_logp.double())
        pg += -torch.minimum(rho * w, rho.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * w).sum().item()
        with torch.no_grad():
            p = pred_net(ref[i]["feat"][None])[0]
        sim_num += w * F.cosine_similarity(p, ref[i]["feat"], dim=0).item()
        ent += ref[i]["ent"].sum().item()
    expected = pg / n_pos - ALPHA * sim_num / sum(WEIGHTS.values()) - BETA * ent / n_pos
    got = tp1["stats"][0]["loss"]
    print(f"step-1 POPO loss: megatron {got:.8f}, float64 HF reference {expected:.8f}")
    assert abs(got - expected) < 1e-5
    assert tp1["stats"][0]["skipped"] == 0.0 and tp1["stats"][0]["num_microbatches"] == 2.0


def test_entropy_on_positive_feeds_only_positives(tp1):
    samples = make_samples()
    pos_tokens = sum(s.tokens.numel() for s in samples if s.positive)
    assert pos_tokens < sum(s.tokens.numel() for s in samples)
    # 2 steps x (target pass + policy forward), counted at the model's input
    assert tp1["tokens_seen"] == 2 * 2 * pos_tokens
    assert tp1["stats"][0]["tokens_fed"] == pos_tokens and tp1["stats"][0]["rollouts_fed"] == 4


def _compare(a, b, what, init=None, tol=2e-4, rel_tol=2e-3):
    """Adam divides by sqrt(v): an element with a near-zero gradient moves by O(lr) whatever the
    gradient's rounding, so single elements agree to a fraction of lr (1e-3 x 2 steps); the whole
    update (weights - initial weights) must agree to rel_tol in L2 norm."""
    for key in ("weights", "ema"):
        assert a[key].keys() == b[key].keys()
        errs = {name: (a[key][name] - b[key][name]).abs().max().item() for name in a[key]}
        worst = max(errs, key=errs.get)
        print(f"{what}: {key} max |diff| = {errs[worst]:.2e} ({worst})")
        assert errs[worst] < tol, f"{what}: {key} {worst} differs by {errs[worst]}"
        if init is not None:
            da = torch.cat([(a[key][n] - init[n]).flatten() for n in init])
            db = torch.cat([(b[key][n] - init[n]).flatten() for n in init])
            rel = ((da - db).norm() / db.norm()).item()
            print(f"{what}: {key} relative L2 difference of the update = {rel:.2e}")
            assert rel < rel_tol, f"{what}: {key} updates differ by {rel} (relative L2)"
    for name in a["predictor"]:
        err = (a["predictor"][name] - b["predictor"][name]).abs().max().item()
        assert err < tol, f"{what}: predictor {name} differs by {err}"
    for sa, sb in zip(a["stats"], b["stats"]):
        for k in ("loss", "pg", "sim", "ent", "grad_norm"):
            assert abs(sa[k] - sb[k]) < 1e-5, f"{what}: {k} {sa[k]} vs {sb[k]}"


def _merge(results):
    """One view of a PP/TP run: weights of all stages, predictor and stats of the last rank."""
    out = {"weights": {}, "ema": {}, "predictor": results[-1]["predictor"], "stats": results[-1]["stats"]}
    for r in results:
        out["weights"].update(r["weights"])
        out["ema"].update(r["ema"])
    return out


def _check_parallel(results, tp1, what):
    ref = _merge([tp1])
    got = _merge(results)
    # the weights moved by far more than the tolerance, so equality is not vacuous
    moved = max((ref["weights"][k] - tp1["init_weights"][k]).abs().max().item() for k in tp1["init_weights"])
    assert moved > 1e-3
    _compare(got, ref, what, tp1["init_weights"])
    assert results[0]["stats"] == results[1]["stats"]   # every rank reports the same stats
    assert got["stats"][1]["loss"] != got["stats"][0]["loss"]


def test_tp2_step_equals_tp1(tp1, tp2):
    _check_parallel(tp2, tp1, "tp=2")


def test_dp2_step_equals_tp1(tp1, tp2):
    dp = [r["dp2"] for r in tp2]
    assert sorted(dp[0]["share"] + dp[1]["share"]) == sorted(WEIGHTS) and dp[0]["share"] and dp[1]["share"]
    for r in dp:  # at TP=1 every DP rank holds the full weights: both must equal TP=1 x DP=1
        _check_parallel([r, r], tp1, "dp=2")
    assert dp[0]["stats"][0]["tokens_fed"] == tp1["stats"][0]["tokens_fed"]   # summed over DP
    # a DP rank with no rollout joins with an empty micro-batch; the step equals TP=1's third step
    ref3 = {**tp1["step3"], "predictor": tp1["step3"]["predictor"]}
    for r in dp:
        _compare(r["step3"], ref3, "dp=2, rank 1 empty", tp1["weights"])
    assert dp[0]["step3"]["stats"][0]["rollouts_fed"] == 4


def test_pp2_step_equals_tp1(hf_path, tp1):
    _check_parallel(run_world(_steps, 2, 1, 2, hf_path, 2), tp1, "pp=2")


@pytest.mark.parametrize("name", ["grpo", "a3po"])
def test_grpo_a3po_loss_matches_hf_float64(hf_path, tp1, name):
    from popo_mega.algorithms.a3po import shape_advantages

    samples = make_samples()
    ref = _hf_reference(hf_path, samples)
    R = max(r["logp"].numel() for r in ref)
    old = torch.zeros(len(samples), R, dtype=torch.float64)
    mask = torch.zeros(len(samples), R, dtype=torch.float64)
    for b, s in enumerate(samples):
        old[b, :s.old_logp.numel()] = s.old_logp.double()
        mask[b, :s.old_logp.numel()] = 1
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float64)
    # A3PO (section 4, step 0, defaults ratio 0.2, rho 2, alpha 0.005); GRPO: A_i on every token
    shaped = shape_advantages(adv, old, mask, 0) if name == "a3po" else adv[:, None] * mask
    num, count = 0.0, 0
    for b, (s, r) in enumerate(zip(samples, ref)):
        rho = torch.exp(r["logp"] - s.old_logp.double())
        a = shaped[b, :rho.numel()]
        num += -torch.minimum(rho * a, rho.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a).sum().item()
        count += r["logp"].numel()
    got = tp1[name]["stats"]["loss"]
    print(f"{name} step-1 loss: megatron {got:.8f}, float64 HF reference {num / count:.8f}")
    assert abs(got - num / count) < 1e-5
    assert tp1[name]["tokens_seen"] == sum(s.tokens.numel() for s in samples)  # negatives fed, no target pass
    if name == "a3po":
        assert not torch.equal(shaped, adv[:, None] * mask)   # the shaping changed something


@pytest.mark.parametrize("name", ["popo", "grpo"])
def test_fused_kernels_in_the_step_equal_the_reference(tp1, name):
    """train.kernels=extension routes the log-probs, the clipped surrogate and (POPO) the pooling and
    cosine penalty through the csrc/ kernels; the step must equal the pure-PyTorch reference's."""
    k = tp1["kernels"]
    assert k["built"], "the compiled extension is not built (bash launch/test.sh builds it)"
    ext, ref = k[name, "extension"], k[name, "reference"]
    for key in ("loss", "pg", "clip_low_count", "clip_high_count", "rho_sum", "grad_norm"):
        if key in ref["stats"]:
            assert ext["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5, abs=1e-6), key
    if name == "popo":
        assert ext["stats"]["weighted_cos_sum"] == pytest.approx(ref["stats"]["weighted_cos_sum"], rel=1e-5)
    # Adam's first step moves a near-zero-gradient element by O(lr) whatever its rounding (see
    # _compare): single elements agree to a fraction of lr, the whole update to 2e-3 relative L2
    init = tp1["init_weights"]
    diff = max((ext["weights"][n] - ref["weights"][n]).abs().max().item() for n in ref["weights"])
    assert diff < 2e-4, diff
    da = torch.cat([(ext["weights"][n] - init[n]).flatten() for n in init])
    db = torch.cat([(ref["weights"][n] - init[n]).flatten() for n in init])
    assert ((da - db).norm() / db.norm()).item() < 2e-3


def _entropy_all_and_nan(rt, path):
    """A second trainer in the TP=1 process (saves a process start): entropy_on=all, then a NaN batch."""
    from popo_mega.model.loader import build_from_hf
    from popo_mega.train.step import PolicyTrainer

    cfg = make_cfg(path, {"algorithm.popo.entropy_on": "all"})
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
    samples = make_samples()
    before = full_weights(trainer)
    bad = [s for s in samples]
    bad[0] = type(bad[0])(**{**bad[0].__dict__, "old_logp": torch.full_like(bad[0].old_logp, float("nan"))})
    nan_stats = trainer.train_step(bad)
    after_nan = full_weights(trainer)
    trainer.tokens_seen = 0
    ok_stats = trainer.train_step(samples)
    after_ok = full_weights(trainer)
    return {"nan": nan_stats, "ok": ok_stats, "tokens_seen": trainer.tokens_seen,
            "unchanged": max((before[k] - after_nan[k]).abs().max().item() for k in before),
            "moved": max((before[k] - after_ok[k]).abs().max().item() for k in before)}


def test_entropy_on_all_feeds_negatives_and_nan_skips(tp1):
    r = tp1["entropy_all_and_nan"]
    samples = make_samples()
    assert r["tokens_seen"] == 2 * sum(s.tokens.numel() for s in samples)
    assert r["ok"]["rollouts_fed"] == 6
    assert r["nan"]["skipped"] == 1.0 and r["nan"]["nonfinite_loss"] == 1.0
    assert r["unchanged"] == 0.0
    assert r["ok"]["skipped"] == 0.0 and r["moved"] > 1e-4
