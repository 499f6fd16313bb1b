"""Benchmark evaluation during training (issue 11): every ``eval.interval`` steps and after the last
step, the benchmarks of ``eval.benchmarks`` are sampled from the rollout engine and graded through
the same function as ``popo-eval`` (``popo_mega.eval.suite.evaluate_benchmarks``), and logged as

    eval/<benchmark>/avg@<n>              mean accuracy of the n samples per problem
    eval/<benchmark>/pass@<n>             unbiased pass@n (n > 1; eval/metrics.py)
    eval/<benchmark>/response_length      mean response tokens
    eval/<benchmark>/truncated_fraction   responses stopped by eval.max_new_tokens
    eval_s                                seconds the evaluation took

Keys: ``eval.benchmarks`` (names of ``popo_mega.eval.suite.benchmark_names``, checked at config load),
``eval.n`` samples per problem at ``eval.temperature`` (top_p 1: the config has no eval top_p) and
``eval.max_new_tokens``, the first ``eval.limit`` problems of each. Which weights are evaluated
(``eval.model``) is the loop's business: with ``policy`` and an EMA-serving engine it syncs the
online policy into the engine first and the EMA back after (``loop.run``'s ``evaluate``).

Prompts: the math sets use ``data.template`` (the template the policy is trained with), the
synthetic task its plain questions, as in training. Stop tokens: EOS and the end-of-turn markers
(``runner.stop_token_ids``, as popo-eval). Every evaluation samples with the same seed
(``train.seed``), so two evaluations differ by the weights, not by the sampling noise (the embedded
server always honours seeds, SGLang with ``rollout.deterministic``).

Math answers are graded by math-verify in a process pool (``MathVerifier``; its timeouts need a main
thread): the loop's own verifier when it has one (math runs), else one started here and closed by
``close()``. Runs on rank 0, which owns the engine.
"""

from __future__ import annotations

import time
from typing import Callable

from popo_mega.config import DataConfig, EvalConfig

EVAL_SECONDS = "eval_s"


def benchmark_eval_due(eval_cfg: EvalConfig, step: int, total_steps: int) -> bool:
    """Whether benchmarks are evaluated after step ``step`` (1-based): every ``eval.interval`` steps
    (0: never periodically) and after the last step. Same answer on every rank (the weight swap
    around the evaluation is collective)."""
    if not eval_cfg.benchmarks:
        return False
    return step == total_steps or bool(eval_cfg.interval and step % eval_cfg.interval == 0)


class BenchmarkEval:
    """Rank 0: the benchmarks of ``eval.benchmarks``, loaded when the run starts (a missing data file
    stops the run before training, not at the first evaluation)."""

    def __init__(self, eval_cfg: EvalConfig, data_cfg: DataConfig, tokenizer, *, seed: int, verifier=None,
                 data_dir: str | None = None, log: Callable[[str], None] = print):
        from popo_mega.eval.runner import stop_token_ids
        from popo_mega.eval.suite import SYNTHETIC, load_benchmark
        from popo_mega.rollout.engine import SamplingParams
        from popo_mega.train.prompts import synthetic_task

        self.cfg = eval_cfg
        self.tokenizer = tokenizer
        self.log = log
        self.benchmarks = [load_benchmark(name, limit=eval_cfg.limit, data_dir=data_dir,
                                          synthetic_task=synthetic_task(data_cfg))
                           for name in eval_cfg.benchmarks]
        for b in self.benchmarks:
            if b.n_skipped:
                log(f"[popo-train] eval.benchmarks {b.name}: skipped {b.n_skipped} bad records "
                    f"(first: {b.first_skipped})")
        self.templates = {b.name: ("plain" if b.name == SYNTHETIC else data_cfg.template) for b in self.benchmarks}
        self.ks = (eval_cfg.n,)
        self.sampling = SamplingParams(temperature=eval_cfg.temperature, top_p=1.0,
                                       max_new_tokens=eval_cfg.max_new_tokens,
                                       stop_token_ids=stop_token_ids(tokenizer), seed=seed)
        self._own_verifier = None
        if verifier is None and any(b.name != SYNTHETIC for b in self.benchmarks):
            from popo_mega.rewards.math import MathVerifier

            # forkserver: workers and their replacements never fork the threaded trainer
            verifier = self._own_verifier = MathVerifier(num_workers=2, start_method="forkserver")
        self.verifier = verifier

    def describe(self) -> str:
        """For the start-up line, e.g. "aime2025 (30), math500 (500) x 8 samples every 20 steps"."""
        every = f"every {self.cfg.interval} steps and " if self.cfg.interval else ""
        sets = ", ".join(f"{b.name} ({len(b.examples)})" for b in self.benchmarks)
        return f"{sets} x {self.cfg.n} samples, {every}after the last step"

    def run(self, engine, step: int, weights: str) -> dict[str, float]:
        """Evaluate what ``engine`` serves now (``weights`` names it for the console); the metrics to
        log at ``step``. A rollout server that dies meanwhile is reported and gives no metrics (the
        loop's next weight sync relaunches it)."""
        from popo_mega.eval.suite import evaluate_benchmarks, flat_metrics
        from popo_mega.rollout.http_engine import RolloutServerError

        t0 = time.monotonic()
        sets = ", ".join(f"{b.name} ({len(b.examples)})" for b in self.benchmarks)
        self.log(f"[popo-train] step {step}: evaluating the {weights} on {sets} x {self.cfg.n} samples")
        try:
            results = evaluate_benchmarks(engine, self.tokenizer, self.benchmarks, n=self.cfg.n, ks=self.ks,
                                          sampling=self.sampling, verifier=self.verifier, template=self.templates,
                                          log=lambda line: self.log(f"[popo-train] step {step} eval {line}"))
        except RolloutServerError as exc:
            self.log(f"[popo-train] step {step}: benchmark evaluation failed ({exc})")
            return {}
        return {**flat_metrics(results, prefix="eval"), EVAL_SECONDS: time.monotonic() - t0}

    def close(self) -> None:
        if self._own_verifier is not None:
            self._own_verifier.close()
            self._own_verifier = None
