"""Benchmark evaluation during training (popo_mega/train/benchmark_eval.py) and the path it shares with
popo-eval (popo_mega/eval/suite.py): a scripted engine returns fixed responses, the real math-verify
pool grades them, and avg@n / pass@k are checked against numbers worked out by hand. CPU; ~5 s."""

import pytest

from popo_mega.config import ConfigError, DataConfig, EvalConfig, SyntheticTaskConfig, config_from_dict
from popo_mega.data.benchmarks import load_math_set
from popo_mega.data.templates import encode_prompts
from popo_mega.eval.suite import evaluate_benchmarks, flat_metrics, load_benchmark
from popo_mega.rewards.math import MathVerifier
from popo_mega.rewards.synthetic import SyntheticTask, load_tokenizer
from popo_mega.rollout.engine import Completion, SamplingParams
from popo_mega.train.benchmark_eval import BenchmarkEval, benchmark_eval_due


class ScriptedEngine:
    """Answers prompt p with the fixed texts script[p] (one per sample); a prompt it was not given
    (wrong template, wrong problem) is a KeyError. ``truncated``: (prompt, sample) pairs that end by
    the length limit instead of EOS."""

    def __init__(self, script: dict, truncated=()):
        self.tok = load_tokenizer()
        self.script = script
        self.truncated = set(truncated)
        self.calls = []

    def generate(self, prompts, sampling, n=1):
        self.calls.append((len(prompts), sampling, n))
        out = []
        for ids in prompts:
            texts = self.script[tuple(ids)]
            assert len(texts) == n
            group = []
            for j, text in enumerate(texts):
                ids_out = self.tok.encode(text, add_special_tokens=False)
                cut = (tuple(ids), j) in self.truncated
                group.append(Completion(ids_out + ([] if cut else [self.tok.eos_token_id]), [0.0] * len(ids_out),
                                        "length" if cut else "stop"))
            out.append(group)
        return out


def _script(questions, template, answers_per_problem):
    tok = load_tokenizer()
    return {tuple(ids): answers for ids, answers in zip(encode_prompts(questions, template, tok), answers_per_problem)}


# math500's first three golds: (3, pi/2), p - q, 14/3; gsm8k's first two: 18, 3.
MATH500 = [
    [r"\boxed{(3,\pi/2)}", r"so \boxed{\left(3, \frac{\pi}{2}\right)}", r"\boxed{(3, \pi)}", "no box here"],  # c = 2
    [r"\boxed{-q + p}", r"\boxed{q - p}", r"\boxed{p + q}", r"\boxed{0}"],                                  # c = 1
    [r"\boxed{\dfrac{14}{3}}", r"\boxed{14/3}", r"\boxed{\frac{28}{6}}", r"\boxed{\frac{14}{3}}"],          # c = 4
]
GSM8K = [
    [r"\boxed{19}", r"\boxed{17}", "I do not know", r"\boxed{180}"],                                        # c = 0
    [r"\boxed{3}", r"\boxed{3.0}", r"The answer is \boxed{3}.", r"\boxed{4}"],                              # c = 3
]


def test_avg_and_pass_at_k_of_fixed_responses_graded_by_math_verify():
    """n = 4. By hand, unbiased pass@k per problem = 1 - C(n-c, k) / C(n, k):
    math500 c = (2, 1, 4): avg@4 = (2/4 + 1/4 + 4/4) / 3 = 7/12;
        pass@2 = ((1 - 1/6) + (1 - 3/6) + 1) / 3 = 7/9; pass@4 = 1.
    gsm8k c = (0, 3): avg@4 = (0 + 3/4) / 2 = 3/8; pass@2 = (0 + 1) / 2 = 1/2; pass@4 = 1/2."""
    tok = load_tokenizer()
    sets = [load_benchmark("math500", limit=3), load_benchmark("gsm8k", limit=2)]
    assert [len(b.examples) for b in sets] == [3, 2]
    script = {**_script([e.question for e in sets[0].examples], "qwen-math", MATH500),
              **_script([e.question for e in sets[1].examples], "qwen-math", GSM8K)}
    first = next(iter(script))
    engine = ScriptedEngine(script, truncated={(first, 3)})  # one of math500's 12 responses hits the limit
    sampling = SamplingParams(temperature=0.6, max_new_tokens=64, stop_token_ids=(tok.eos_token_id,))
    lines = []
    with MathVerifier(num_workers=1) as verifier:
        results = evaluate_benchmarks(engine, tok, sets, n=4, ks=[2, 4], sampling=sampling, verifier=verifier,
                                      batch_size=2, log=lines.append)
    math500, gsm8k = results
    assert [p.correct for p in math500.problems] == [2, 1, 4] and [p.correct for p in gsm8k.problems] == [0, 3]
    assert math500.metrics["avg@4"] == pytest.approx(7 / 12)
    assert math500.metrics["pass@2"] == pytest.approx(7 / 9)
    assert math500.metrics["pass@4"] == pytest.approx(1.0)
    assert gsm8k.metrics["avg@4"] == pytest.approx(3 / 8)
    assert gsm8k.metrics["pass@2"] == pytest.approx(1 / 2) and gsm8k.metrics["pass@4"] == pytest.approx(1 / 2)
    assert math500.truncated_fraction == pytest.approx(1 / 12) and gsm8k.truncated_fraction == 0.0
    assert math500.grading["n"] == 12 and gsm8k.grading["n"] == 8  # the verifier's counts, per benchmark
    assert [c[0] for c in engine.calls] == [2, 1, 2]  # batch_size prompts per generate call
    assert any(line.startswith("math500: 2/3 problems graded") for line in lines)  # progress, long benchmarks

    flat = flat_metrics(results, prefix="eval")
    assert {k: v for k, v in flat.items() if "@" in k} == pytest.approx({
        "eval/math500/avg@4": 7 / 12, "eval/math500/pass@2": 7 / 9, "eval/math500/pass@4": 1.0,
        "eval/gsm8k/avg@4": 3 / 8, "eval/gsm8k/pass@2": 1 / 2, "eval/gsm8k/pass@4": 1 / 2})
    assert flat["eval/math500/truncated_fraction"] == pytest.approx(1 / 12)
    lengths = [len(tok.encode(t, add_special_tokens=False)) + 1 for t in sum(GSM8K, [])]  # + EOS
    assert flat["eval/gsm8k/response_length"] == pytest.approx(sum(lengths) / 8)


def test_training_evaluation_reads_the_eval_keys():
    """BenchmarkEval (the loop's side): eval.limit problems, eval.n samples at eval.temperature and
    eval.max_new_tokens, math prompts in data.template (chat here), the synthetic task's plain; by hand:
    gsm8k c = (2, 1) of 2: avg@2 = 3/4, pass@2 = 1; synthetic c = (2, 0): avg@2 = 1/2, pass@2 = 1/2."""
    tok = load_tokenizer()
    e = EvalConfig(interval=5, benchmarks=("gsm8k", "synthetic"), n=2, temperature=0.7, max_new_tokens=16, limit=2)
    d = DataConfig(template="chat", synthetic=SyntheticTaskConfig(max_operand=3, n_heldout=4))
    gsm = load_math_set("gsm8k", limit=2).examples
    held = SyntheticTask(max_operand=3, n_heldout=4).examples("heldout")[:2]
    script = {**_script([x.question for x in gsm], "chat", [[r"\boxed{18}", "18 eggs... \\boxed{18}"],
                                                             [r"\boxed{2}", r"\boxed{3}"]]),
              **_script([x.question for x in held], "plain", [[held[0].answer] * 2, ["x", "y"]])}
    engine = ScriptedEngine(script)
    lines = []
    bench = BenchmarkEval(e, d, tok, seed=7, log=lines.append)
    try:
        m = bench.run(engine, step=5, weights="online policy")
    finally:
        bench.close()
    assert bench.verifier is not None and bench._own_verifier is None  # its own pool, closed
    assert {k: v for k, v in m.items() if "@" in k} == pytest.approx({
        "eval/gsm8k/avg@2": 3 / 4, "eval/gsm8k/pass@2": 1.0, "eval/synthetic/avg@2": 1 / 2,
        "eval/synthetic/pass@2": 1 / 2})
    assert m["eval_s"] >= 0.0
    assert [(c[0], c[2]) for c in engine.calls] == [(2, 2), (2, 2)]  # eval.limit prompts x eval.n samples
    s = engine.calls[0][1]
    assert (s.temperature, s.top_p, s.max_new_tokens, s.seed, s.stop_token_ids) == (0.7, 1.0, 16, 7, (2,))
    assert lines[0] == "[popo-train] step 5: evaluating the online policy on gsm8k (2), synthetic (2) x 2 samples"
    assert any("step 5 eval gsm8k: avg@2 75.0% | pass@2 100.0%" in line for line in lines)


def test_a_dead_server_during_evaluation_gives_no_metrics():
    from popo_mega.rollout.http_engine import RolloutServerError

    class Dead:
        def generate(self, prompts, sampling, n=1):
            raise RolloutServerError("http://127.0.0.1:1 died")

    lines = []
    bench = BenchmarkEval(EvalConfig(benchmarks=("synthetic",), limit=1), DataConfig(), load_tokenizer(), seed=0,
                          log=lines.append)
    assert bench.verifier is None  # the synthetic task needs no math-verify pool
    assert bench.run(Dead(), step=3, weights="served EMA") == {}
    assert "benchmark evaluation failed (http://127.0.0.1:1 died)" in lines[-1]


@pytest.mark.parametrize("interval,total,due", [
    (2, 5, [2, 4, 5]),      # every interval steps and after the last
    (0, 5, [5]),            # no periodic evaluation: the end only
    (5, 5, [5]),            # the last step is an interval step: once
])
def test_when_benchmarks_are_evaluated(interval, total, due):
    e = EvalConfig(interval=interval, benchmarks=("gsm8k",))
    assert [s for s in range(1, total + 1) if benchmark_eval_due(e, s, total)] == due
    assert not any(benchmark_eval_due(EvalConfig(interval=1), s, total) for s in range(1, total + 1))


@pytest.mark.parametrize("override,message", [
    ("eval.benchmarks=[aime2025, math5000]", r"key 'eval.benchmarks\[1\]' is 'math5000', not a benchmark "
                                             r"\(did you mean 'math500'\?\)"),
    ("eval.benchmarks=[gsm8k, gsm8k]", "key 'eval.benchmarks' lists gsm8k more than once"),
    ("eval.n=0", "key 'eval.n' must be >= 1, got 0"),
    ("eval.limit=0", "key 'eval.limit' must be >= 1"),
    ("eval.max_new_tokens=0", "key 'eval.max_new_tokens' must be >= 1"),
    ("eval.temperature=-0.5", "key 'eval.temperature' must be >= 0"),
    ("eval.interval=-1", "key 'eval.interval' must be >= 0"),
])
def test_bad_eval_keys_are_errors_at_load(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({}, source="run.yaml", overrides=[override])
    assert str(err.value).startswith("run.yaml: ")


def test_every_shipped_config_names_known_benchmarks():
    import glob
    import os

    from popo_mega.config import load_config
    from popo_mega.data.paths import REPO_ROOT

    files = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.yaml")))
    assert files
    for path in files:
        load_config(path)  # raises on an unknown benchmark
