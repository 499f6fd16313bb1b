"""The implicit negative gradient where it can fail: negatives that share a prefix with the positive.

POPO trains on positives only; the paper's claim (seed 000) is that this still pushes negatives down,
because raising log pi(y+) takes probability from every other continuation. tests/unit/test_popo.py
(test_implicit_negative_gradient_lowers_held_out_negatives) shows it for negatives that share nothing
with the positives, on a tabular policy. A negative that shares a long prefix with a positive is the
case where it can fail: the positive-only gradient raises the shared prefix's log-probs, which are
part of the negative's log-prob too, and only the diverging tokens are pushed down.

Measured on the quickstart's task and model (runs/quickstart/base, the warm-started tiny Qwen2; built
as the quickstart builds it when missing). Per seed (1-5):
  - 32 train problems and 64 held-out problems drawn with the seed;
  - negatives of each problem, never in any loss: the gold answer with exactly one digit changed,
    at position k = 0, 1 or 2 of its 3 digits (9 each), followed by <eos>: they share k digits of the
    gold answer's prefix (k = 2: all but the last digit; k = 0: no prefix, the case the unit test has);
  - 5 POPO steps on the 32 train problems: each samples 8 rollouts per problem from the current
    policy at temperature 1 (4 tokens), keeps the positives (exactly gold + <eos>), weights them by P1
    (softmax of the mean token log-prob), and takes the policy term and entropy term of P5 with their
    global normalisers (``popo_mega.algorithms.popo.popo_loss``, importance ratio none, as the online
    policy sampled them), Adam at the quickstart's lr 2e-3 and at 2e-4, gradient clip 1.0. No similarity term
    (alpha = 0): it needs the EMA target and predictor, and it acts on features, not on which tokens
    are pushed down; the unit test leaves it out too;
  - the mean sequence log-prob (3 digits + <eos>) of the negatives before and after, per k, on the
    train problems (trained on, negatives held out) and on the held-out problems (nothing seen);
    and the same for the gold answers.

    python benchmarks/implicit_negative.py          # ~a minute on 1 CPU thread

Writes benchmarks/results/implicit_negative_cpu.json (per seed and the mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "implicit_negative_cpu.json")
STEPS, GROUP, N_TRAIN, N_HELDOUT, BETA = 5, 8, 32, 64, 0.01
LRS = (2e-3, 2e-4)   # the quickstart's lr, and a tenth of it (small steps: the first-order regime)


def negatives(gold: str, k: int) -> list[str]:
    """The 9 answers that equal ``gold`` except at digit ``k`` (they share its first k digits)."""
    return [gold[:k] + d + gold[k + 1:] for d in "0123456789" if d != gold[k]]


def response_logps(model, prompt_ids: list[int], responses: list[list[int]]):
    """(logp [B, L], entropy [B, L]) of each response token (all responses of length L) after its prompt
    (all prompts of the same length P); prompt_ids: [B] lists. Tokens at T = 1."""
    ids = torch.tensor([p + r for p, r in zip(prompt_ids, responses)])
    plen = len(prompt_ids[0])
    logits = model(input_ids=ids).logits[:, plen - 1:-1].float()     # [B, L, V] predicting the response
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs.gather(-1, ids[:, plen:, None])[..., 0]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], n_tokens: int, gen: torch.Generator) -> list[list[int]]:
    """Temperature-1 samples of exactly n_tokens tokens (no early stop), one per prompt."""
    ids = torch.tensor(prompt_ids)
    for _ in range(n_tokens):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
    return ids[:, len(prompt_ids[0]):].tolist()


@torch.no_grad()
def mean_token_logps(model, enc, problems, answers_of) -> list[float]:
    """[4]: mean over problems and their answers of log pi(answer token t), t = 3 digits + <eos>;
    their sum is the mean sequence log-prob."""
    prompts, responses = [], []
    for p in problems:
        for a in answers_of(p):
            prompts.append(enc(p.prompt))
            responses.append(enc(a) + [enc.eos])
    logp, _ = response_logps(model, prompts, responses)
    return logp.mean(0).tolist()


def popo_steps(model, enc, problems, *, seed: int, lr: float) -> list[dict]:
    """STEPS positive-only POPO steps (policy + entropy terms of P5) on ``problems``; per-step stats."""
    from popo_mega.algorithms.popo import popo_loss, positive_weights

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(STEPS):
        prompts = [enc(p.prompt) for p in problems for _ in range(GROUP)]
        responses = sample(model, prompts, 4, gen)
        golds = [enc(p.gold) + [enc.eos] for p in problems for _ in range(GROUP)]
        positive = torch.tensor([r == g for r, g in zip(responses, golds)])
        logp, entropy = response_logps(model, prompts, responses)      # [B, 4]
        with torch.no_grad():
            w = positive_weights(logp.mean(1), positive, group_size=GROUP)
        mask = torch.ones_like(logp).reshape(-1)
        cu = torch.arange(0, logp.numel() + 1, logp.shape[1])
        n_pos_tokens = float(positive.sum() * logp.shape[1])
        total, _ = popo_loss(logp.reshape(-1), mask, cu, w, positive, num_positive_tokens=max(n_pos_tokens, 1.0),
                             is_correction="none", entropy=entropy.reshape(-1),
                             entropy_token_count=max(n_pos_tokens, 1.0), entropy_on="positive", beta=BETA)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        stats.append({"positive_rate": positive.float().mean().item(), "loss": total.item()})
    return stats


class _Enc:
    def __init__(self, tokenizer):
        self.tok, self.eos = tokenizer, tokenizer.eos_token_id

    def __call__(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def measure(base: str, seed: int, lr: float) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from popo_mega.rewards.synthetic import SyntheticTask

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    enc = _Enc(AutoTokenizer.from_pretrained(base))
    train, heldout = SyntheticTask().splits()
    rng = random.Random(seed)
    sets = {"train": rng.sample(train, N_TRAIN), "heldout": rng.sample(heldout, N_HELDOUT)}

    def snapshot():
        out = {}
        for name, probs in sets.items():
            out[f"{name}/gold"] = sum(mean_token_logps(model, enc, probs, lambda p: [p.gold]))
            for k in range(3):
                t = mean_token_logps(model, enc, probs, lambda p, k=k: negatives(p.gold, k))
                out[f"{name}/neg_prefix{k}"] = sum(t)
                if k:  # the part the negative shares with the gold answer, and the rest
                    out[f"{name}/neg_prefix{k}/shared"] = sum(t[:k])
                    out[f"{name}/neg_prefix{k}/rest"] = sum(t[k:])
        return out

    before = snapshot()
    steps = popo_steps(model, enc, sets["train"], seed=seed, lr=lr)
    after = snapshot()
    return {"seed": seed, "lr": lr, "before": before, "after": after, "delta": {k: after[k] - before[k] for k in before},
            "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(REPO, "runs", "quickstart", "base"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, REPO)
    from benchmarks.fidelity_study import ensure_base

    ensure_base(args.base)
    t0 = time.time()
    by_lr = []
    for lr in LRS:
        per_seed = [measure(args.base, s, lr) for s in args.seeds]
        keys = list(per_seed[0]["delta"])
        mean_before = {k: sum(r["before"][k] for r in per_seed) / len(per_seed) for k in keys}
        mean = {k: sum(r["delta"][k] for r in per_seed) / len(per_seed) for k in keys}
        lowered = {k: sum(r["delta"][k] < 0 for r in per_seed) for k in keys}
        by_lr.append({"lr": lr, "mean_before": mean_before, "mean_delta": mean, "seeds_lowered": lowered,
                      "n_seeds": len(per_seed), "per_seed": per_seed})
        print(f"lr {lr:g}: {'answers':24s} {'before':>8s} {'after':>8s} {'delta':>8s}  seeds lowered")
        for k in keys:
            print(f"{'':10s}{k:24s} {mean_before[k]:8.3f} {mean_before[k] + mean[k]:8.3f} {mean[k]:+8.3f}  "
                  f"{lowered[k]}/{len(per_seed)}")
    out = {"device": f"CPU ({platform.processor() or platform.machine()}), 1 thread", "dtype": "float32",
           "model": "runs/quickstart/base (tiny Qwen2, hidden 128, 2 layers, warm-started)",
           "setting": {"steps": STEPS, "group_size": GROUP, "train_problems": N_TRAIN, "heldout_problems": N_HELDOUT,
                       "optimizer": "Adam (betas 0.9, 0.999), grad clip 1.0", "beta": BETA, "alpha": 0.0,
                       "is_correction": "none", "entropy_on": "positive", "weights": "softmax (P1)"},
           "metric": "mean sequence log-prob (3 digits + <eos>) of answers; neg_prefixK: gold with digit K changed "
                     "(shares the first K digits); /shared: the log-prob of those K shared tokens, /rest: of the others; "
                     "delta = after - before",
           "wall_s": round(time.time() - t0, 1), "by_lr": by_lr}
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.results} ({out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
