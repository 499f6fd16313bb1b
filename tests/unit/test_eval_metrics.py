"""popo_mega.eval.metrics (unbiased pass@k vs brute-force subset enumeration) and eval.runner with a
fake RolloutEngine written here. CPU; ~2 s."""

import itertools
import math
import random

import pytest

from popo_mega.eval.metrics import avg_at_n, mean_pass_at_k, pass_at_k, summarize
from popo_mega.eval.runner import evaluate, format_table, stop_token_ids
from popo_mega.rewards import synthetic
from popo_mega.rewards.synthetic import SyntheticTask
from popo_mega.rollout.engine import Completion, RolloutEngine, SamplingParams


def brute_pass_at_k(flags, k):
    """Fraction of the size-k subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            flags = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_matches_exact_binomials():
    for n, c, k in [(64, 3, 8), (100, 1, 50), (200, 37, 10), (32, 0, 32), (32, 32, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)


def test_pass_at_k_argument_errors():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k([], 1)


def test_avg_and_summary_by_hand():
    counts = [(4, 1), (4, 4), (4, 0)]  # accuracies 1/4, 1, 0
    assert avg_at_n(counts) == pytest.approx((0.25 + 1 + 0) / 3)
    s = summarize(counts, ks=[2, 4])
    # pass@2 by hand: problem 1: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5; problem 2: 1; problem 3: 0
    assert s["pass@2"] == pytest.approx(1.5 / 3)
    assert s["pass@4"] == pytest.approx(2 / 3)
    assert s["pass@1"] == pytest.approx(s["avg@4"])
    with pytest.raises(ValueError, match="different sample counts"):
        summarize([(4, 1), (3, 1)], ks=[1])


# ---------------------------------------------------------------- runner with a fake engine

class ScriptedEngine:
    """Answers prompt p's j-th sample correctly iff plan[p][j]; knows prompts by their token ids."""

    def __init__(self, tok, examples, plan, template_prompts):
        self.tok, self.plan = tok, plan
        self.index = {tuple(ids): i for i, ids in enumerate(template_prompts)}
        self.examples = examples
        self.calls = []

    def generate(self, prompts, sampling, n=1):
        self.calls.append((len(prompts), n, sampling))
        out = []
        for ids in prompts:
            i = self.index[tuple(ids)]
            gold = self.examples[i].answer
            group = []
            for j in range(n):
                text = gold if self.plan[i][j] else str(int(gold) + 1)
                ids_out = self.tok.encode(text, add_special_tokens=False)
                stopped = (i + j) % 3 != 0
                group.append(Completion(output_ids=ids_out + ([2] if stopped else []), output_logprobs=[0.0] * (len(ids_out) + stopped),
                                        finish_reason="stop" if stopped else "length"))
            out.append(group)
        return out

    def sync_weights(self, named_tensors, version):
        pass

    def weight_version(self):
        return None

    def close(self):
        pass


def test_runner_metrics_match_brute_force():
    tok = synthetic.load_tokenizer()
    examples = SyntheticTask(seed=1).examples("heldout")[:13]
    n = 5
    rng = random.Random(0)
    plan = [[rng.random() < p for _ in range(n)] for p in [0.0, 0.2, 0.5, 0.9, 1.0] * 2 + [0.3, 0.6, 0.1]]
    prompts = [tok.encode(e.question, add_special_tokens=False) for e in examples]
    engine = ScriptedEngine(tok, examples, plan, prompts)
    assert isinstance(engine, RolloutEngine)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=4, stop_token_ids=stop_token_ids(tok))
    res = evaluate(engine, tok, examples, name="synthetic", template="plain", n=n, ks=[1, 2, 5], sampling=sampling,
                   score_fn=synthetic.score_batch, batch_size=4, keep_responses=2)
    assert [c[0] for c in engine.calls] == [4, 4, 4, 1] and all(c[1] == n for c in engine.calls)
    assert sampling.stop_token_ids == (2,)
    for k in (1, 2, 5):
        expected = sum(brute_pass_at_k(flags, k) for flags in plan) / len(plan)
        assert res.metrics[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert res.metrics["avg@5"] == pytest.approx(sum(sum(f) for f in plan) / (len(plan) * n))
    assert [p.correct for p in res.problems] == [sum(f) for f in plan]
    assert res.problems[0].responses == [str(int(examples[0].answer) + 1)] * 2
    assert res.truncated_fraction == pytest.approx(sum((i + j) % 3 == 0 for i in range(13) for j in range(n)) / (13 * n))
    table = format_table([res])
    assert table.splitlines()[0].split()[:4] == ["benchmark", "problems", "n", "pass@1"]
    assert "synthetic" in table.splitlines()[2]


def test_runner_rejects_bad_arguments_and_bad_engines():
    tok = synthetic.load_tokenizer()
    examples = SyntheticTask().examples("heldout")[:2]
    sp = SamplingParams()
    with pytest.raises(ValueError, match="1 <= k <= n=2"):
        evaluate(None, tok, examples, name="x", template="plain", n=2, ks=[4], sampling=sp, score_fn=synthetic.score_batch)

    class Short:
        def generate(self, prompts, sampling, n=1):
            return [[Completion([5], [0.0], "stop")] for _ in prompts]  # 1 sample instead of n

    with pytest.raises(RuntimeError, match="engine returned"):
        evaluate(Short(), tok, examples, name="x", template="plain", n=2, ks=[1], sampling=sp, score_fn=synthetic.score_batch)
