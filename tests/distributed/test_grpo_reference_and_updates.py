"""GRPO's k3 KL to a frozen reference (algorithm.grpo.beta_kl) and several optimizer steps per rollout
batch (train.updates_per_rollout) in the megatron trainer: one gloo process, a tiny Qwen2, CPU.

* beta_kl = 0.04: at update 1 the policy IS the reference, so the KL is 0; after it the KL of
  update 2 equals a float64 k3 token mean computed from HF models (the initial checkpoint and the
  weights after update 1), and loss = pg + 0.04 kl. beta_kl = 0: no reference kept or run, KL 0.
* updates_per_rollout = 2 (the loop's sequence: ``batch``, ``reference_pass`` once, then per update
  ``target_pass``, ``policy_step``, ``update_ema``): equals two ``train_step`` calls on the same
  samples, differs from one (the weights after its first update); the behaviour policy of update 2 is still the sampler's: rollouts
  sampled on-policy have rho = 1 at update 1 and rho = exp(logp_1 - logp_0) != 1 at update 2. The
  reference pass runs once for both updates (the reference is frozen: the same log-probs).
"""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.test_train_step import full_weights, make_cfg, make_samples
from tests.multiprocess import run_world

BETA_KL = 0.04
EPS_LOW, EPS_HIGH = 0.2, 0.28   # make_cfg's clip range


def _on_policy(trainer, samples):
    """The samples with old_logp = the initial policy's log-probs (the reference pass's, before any
    step): rollouts as if the sampler ran the initial weights."""
    from popo_mega.train.batch import RolloutSample

    mbs = trainer.pack(samples)
    trainer.reference_pass(mbs)
    by_uid = {}
    for mb in mbs:
        ref, mask, cu = mb.extras["ref_logp"], mb.mask, mb.cu_seqlens
        for b, uid in enumerate(mb.uids.tolist()):
            lo, hi = int(cu[b]), int(cu[b + 1])
            by_uid[uid] = ref[lo:hi][mask[lo:hi] > 0].clone()
    return [RolloutSample(**{**s.__dict__, "old_logp": by_uid[s.uid]}) for s in samples]


def _run(rank, world_size, path):
    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize
    from popo_mega.train.step import PolicyTrainer

    rt = initialize(1, 1, seed=0, device="cpu")

    def trainer(beta):
        cfg = make_cfg(path, {"algorithm.name": "grpo", "algorithm.grpo.beta_kl": beta})
        return PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))

    out = {}
    a = trainer(BETA_KL)
    out["init"] = full_weights(a)
    samples = _on_policy(a, make_samples())
    out["old_logp"] = {s.uid: s.old_logp for s in samples}
    a.tokens_seen = 0
    out["a_first"], out["weights_1"], out["a_last"] = _updates_on_one_batch(a, samples)
    out["a"] = full_weights(a)
    out["a_tokens_seen"] = a.tokens_seen
    with torch.no_grad(), a.reference.swapped_into(a.model):
        out["a_reference"] = full_weights(a)            # the reference after two updates
    out["a_after_swap"] = full_weights(a)              # and the policy restored after the swap

    b = trainer(BETA_KL)                                # two plain train_step calls
    out["b_stats"] = [b.train_step(samples) for _ in range(2)]
    out["b"] = full_weights(b)
    d = trainer(0.0)                                    # no KL: no reference kept or run
    out["d_reference"] = d.reference
    d.tokens_seen = 0
    out["d_stats"] = [d.train_step(samples) for _ in range(2)]
    out["d_tokens_seen"] = d.tokens_seen
    out["d"] = full_weights(d)

    def a3po():   # shaping scale 2.0 at step 0, 1.5 at step 1: update 2 must re-prepare the advantages
        cfg = make_cfg(path, {"algorithm.name": "a3po", "algorithm.grpo.beta_kl": BETA_KL, "algorithm.a3po.alpha": 0.5})
        return PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))

    e = a3po()
    e_first, _, e_last = _updates_on_one_batch(e, samples)
    out["e_stats"], out["e"] = [e_first, e_last], full_weights(e)
    f = a3po()
    out["f_stats"] = [f.train_step(samples) for _ in range(2)]
    out["f"] = full_weights(f)
    return out


def _updates_on_one_batch(trainer, samples):
    """Two updates on one rollout batch as ``loop.run`` sequences them; (stats 1, weights after 1, stats 2)."""
    batch = trainer.batch(samples)
    trainer.reference_pass(batch)                      # once per batch
    seen = []
    for _ in range(2):
        trainer.target_pass(batch)
        stats = trainer.policy_step(batch)
        trainer.update_ema(stats)
        seen += [stats, full_weights(trainer)]
    return seen[0], seen[1], seen[2]


@pytest.fixture(scope="module")
def run(hf_path):
    return run_world(_run, 1, hf_path)[0]


def _hf_logp(path, samples, weights=None):
    """float64 log-probs of each rollout's response tokens under the HF model (optionally with
    ``weights``, HF-named), computed unpacked over the real vocabulary."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    if weights is not None:
        missing, unexpected = model.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    out = []
    with torch.no_grad():
        for s in samples:
            logq = F.log_softmax(model(s.tokens[None]).logits[0], -1)
            P, L = s.prompt_len, s.tokens.numel()
            out.append(logq[P - 1:L - 1].gather(1, s.tokens[P:, None])[:, 0])
    return out


def _max_diff(x, y):
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_kl_is_zero_at_the_reference_and_matches_float64_after_an_update(hf_path, run):
    samples = make_samples()
    n_tok = sum(s.tokens.numel() - s.prompt_len for s in samples)
    s1, s2 = run["a_first"], run["a_last"]
    print(f"beta_kl {BETA_KL}: kl_ref at update 1 = {s1['kl']:.3e}, at update 2 = {s2['kl']:.6e}; "
          f"beta_kl 0: {run['d_stats'][0]['kl']}, {run['d_stats'][1]['kl']}")
    assert abs(s1["kl"]) < 1e-10                       # the policy is the reference
    assert s1["token_count"] == n_tok

    ref = _hf_logp(hf_path, samples)                   # theta_0 = the reference
    cur = _hf_logp(hf_path, samples, run["weights_1"])  # theta_1, the policy of update 2
    k3 = torch.cat([torch.exp(r - c) - (r - c) - 1 for r, c in zip(ref, cur)])
    expected_kl = k3.sum().item() / n_tok              # token_mean: global response-token count
    print(f"update-2 kl_ref: trainer {s2['kl']:.8e}, float64 HF {expected_kl:.8e}")
    assert expected_kl > 1e-6                          # the update moved the policy away
    assert s2["kl"] == pytest.approx(expected_kl, rel=1e-3)
    assert s2["loss"] == pytest.approx(s2["pg"] + BETA_KL * s2["kl"], abs=1e-7)   # fp32 sums

    # Behaviour policy of update 2 = the sampler (old_logp = theta_0's), not theta_1
    rho_2 = sum(torch.exp(c - run["old_logp"][s.uid].double()).sum().item() for s, c in zip(samples, cur))
    assert s1["rho_sum"] == pytest.approx(n_tok, abs=1e-4)
    assert s2["rho_sum"] == pytest.approx(rho_2, abs=1e-4) and abs(rho_2 - n_tok) > 1e-3
    adv = [torch.full_like(c, s.advantage) for s, c in zip(samples, cur)]
    pg = 0.0
    for s, c, a in zip(samples, cur, adv):
        rho = torch.exp(c - run["old_logp"][s.uid].double())
        pg -= torch.minimum(rho * a, rho.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * a).sum().item()
    assert s2["pg"] == pytest.approx(pg / n_tok, abs=1e-6)

    # beta_kl = 0: the KL is neither computed nor kept, and no reference forward runs
    d = run["d_stats"]
    assert run["d_reference"] is None and d[0]["kl"] == 0.0 and d[1]["kl"] == 0.0
    tokens = sum(s.tokens.numel() for s in samples)
    assert run["d_tokens_seen"] == 2 * tokens
    assert run["a_tokens_seen"] == 3 * tokens          # one reference pass for the batch + two policy passes
    # the KL gradient changed update 2: beta 0.04 and beta 0 end apart (update 1's k3 gradient is 0)
    assert _max_diff(run["a"], run["d"]) > 1e-6


def test_reference_stays_the_initial_policy(run):
    assert _max_diff(run["a_reference"], run["init"]) == 0.0
    assert _max_diff(run["a_after_swap"], run["a"]) == 0.0
    assert _max_diff(run["a"], run["init"]) > 1e-3


def test_two_updates_per_rollout_equal_two_train_steps_and_differ_from_one(run):
    assert _max_diff(run["a"], run["b"]) == 0.0
    for got, want in zip((run["a_first"], run["a_last"]), run["b_stats"]):
        for key in ("loss", "pg", "kl", "rho_sum", "grad_norm", "lr", "step"):
            assert got[key] == want[key], key
    assert run["a_first"]["step"] == 1.0 and run["a_last"]["step"] == 2.0
    assert _max_diff(run["weights_1"], run["a"]) > 1e-4   # one update (weights after the first) differs


def test_a3po_updates_reprepare_the_advantages_and_keep_the_reference_log_probs(run):
    """A3PO's shaped advantages decay with the step: update 2 of one batch re-packs them at step 1,
    carrying the batch's reference log-probs over; it equals a second train_step (which re-runs
    the reference pass) exactly."""
    assert _max_diff(run["e"], run["f"]) == 0.0
    for got, want in zip(run["e_stats"], run["f_stats"]):
        for key in ("loss", "pg", "kl", "rho_sum", "grad_norm", "step"):
            assert got[key] == want[key], key
    assert run["e_stats"][1]["kl"] > 0


def test_crossed_intervals():
    from popo_mega.train.run_setup import crossed as _crossed

    # one update per batch: exactly step % interval == 0
    assert [s for s in range(1, 13) if _crossed(s - 1, s, 4)] == [4, 8, 12]
    # three updates per batch (steps 0 -> 3 -> 6 -> 9 -> 12): interval 4 is due after 6, 9 and 12
    assert [s for s in (3, 6, 9, 12) if _crossed(s - 3, s, 4)] == [6, 9, 12]
    assert not _crossed(0, 12, 0)
