"""Evaluate several benchmarks in a row: the one path shared by ``popo-eval`` and the training loop's
periodic benchmark evaluation (``popo_mega/train/benchmark_eval.py``), so that a number logged
during training means what the same number from ``popo-eval`` means.

    sets = [load_benchmark(name, limit=4) for name in ("aime2025", "math500")]
    results = evaluate_benchmarks(engine, tokenizer, sets, n=8, ks=[8], sampling=sampling, verifier=verifier)
    flat = flat_metrics(results, prefix="eval")   # {"eval/aime2025/avg@8": ..., "eval/aime2025/pass@8": ...}

Math benchmarks (``popo_mega.data.benchmarks.BENCHMARKS``) are graded with math-verify through a
:class:`~popo_mega.rewards.math.MathVerifier` (a process pool: math-verify's timeouts need a main
thread); ``synthetic`` (the quickstart task's held-out split) by exact match.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from popo_mega.data.datasets import Example

if TYPE_CHECKING:  # the runner needs torch; config.py checks eval.benchmarks with benchmark_names() without it
    from popo_mega.eval.runner import BenchmarkResult
    from popo_mega.rollout.engine import RolloutEngine, SamplingParams

SYNTHETIC = "synthetic"


def benchmark_names() -> tuple[str, ...]:
    """Every name ``load_benchmark`` accepts: the math benchmarks of the shared data, then ``synthetic``."""
    from popo_mega.data.benchmarks import BENCHMARKS

    return tuple(BENCHMARKS) + (SYNTHETIC,)


@dataclass(frozen=True)
class Benchmark:
    name: str
    examples: list[Example]
    n_skipped: int = 0          # bad records left out by the loader
    first_skipped: str = ""     # where the first of them is (file:line and why)


def load_benchmark(name: str, *, limit: int | None = None, data_dir: str | None = None,
                   synthetic_task=None) -> Benchmark:
    """The first ``limit`` problems (all when None) of benchmark ``name``.

    ``synthetic``: the held-out split of ``synthetic_task`` (default: ``SyntheticTask()``, as popo-eval);
    other names: ``popo_mega.data.benchmarks.load_math_set`` from the shared data directory (or
    ``data_dir``), bad records skipped and counted."""
    if name == SYNTHETIC:
        from popo_mega.rewards.synthetic import SyntheticTask

        examples = (synthetic_task or SyntheticTask()).examples("heldout")
        return Benchmark(name, list(examples[:limit] if limit else examples))
    from popo_mega.data.benchmarks import BENCHMARKS, load_math_set

    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}")
    res = load_math_set(name, data_dir=data_dir, limit=limit)
    return Benchmark(name, list(res.examples), res.n_skipped, str(res.skipped[0]) if res.n_skipped else "")


def default_template(name: str) -> str:
    """The prompt template a benchmark is evaluated with when none is given: ``plain`` for the synthetic
    task (its questions are the prompts), ``qwen-math`` for the math sets."""
    return "plain" if name == SYNTHETIC else "qwen-math"


def _template_for(name: str, template: str | Mapping[str, str] | None) -> str:
    if isinstance(template, Mapping):
        template = template.get(name)
    return template or default_template(name)


def evaluate_benchmarks(engine: RolloutEngine, tokenizer, benchmarks: Sequence[Benchmark], *, n: int,
                        ks: Sequence[int], sampling: SamplingParams, verifier=None,
                        template: str | Mapping[str, str] | None = None,
                        system_prompt: str | None = None, batch_size: int = 64, keep_responses: int = 1,
                        log: Callable[[str], None] | None = None) -> list[BenchmarkResult]:
    """Sample ``n`` responses per problem of each benchmark and grade them; one
    :class:`~popo_mega.eval.runner.BenchmarkResult` per benchmark, in order (avg@n, pass@1, pass@k for ks).

    ``verifier``: a ``MathVerifier`` (needed when a math benchmark is in ``benchmarks``); its counts for
    each benchmark go to ``BenchmarkResult.grading``. ``template``: one for all benchmarks, or one per
    benchmark name; :func:`default_template` where none is given. ``log`` (default: stderr) gets a
    line as each benchmark starts, after each batch of ``batch_size`` problems when there are
    several, and with each benchmark's metrics."""
    from popo_mega.eval.runner import evaluate
    from popo_mega.rewards import synthetic

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    results = []
    for bench in benchmarks:
        if bench.name == SYNTHETIC:
            score_fn, stats_fn = synthetic.score_batch, None
        else:
            if verifier is None:
                raise ValueError(f"evaluate_benchmarks: {bench.name} is graded by math-verify: pass a MathVerifier")
            before = verifier.stats.as_dict()
            score_fn = verifier.score_batch
            stats_fn = lambda before=before: {  # noqa: E731  this benchmark's share of the verifier's counts
                k: v - before[k] for k, v in verifier.stats.as_dict().items()}
        total, t0 = len(bench.examples), time.monotonic()
        log(f"{bench.name}: sampling {total} problems x {n} (max_new_tokens {sampling.max_new_tokens}, "
            f"temperature {sampling.temperature})")
        progress = lambda done, name=bench.name, total=total, t0=t0: log(  # noqa: E731
            f"{name}: {done}/{total} problems graded ({time.monotonic() - t0:.0f} s)")
        r = evaluate(engine, tokenizer, bench.examples, name=bench.name,
                     template=_template_for(bench.name, template), n=n, ks=ks, sampling=sampling,
                     score_fn=score_fn, batch_size=batch_size, keep_responses=keep_responses,
                     system_prompt=system_prompt, grading_stats=stats_fn,
                     progress=progress if total > batch_size else None)
        log(f"{r.name}: {summary_line(r)}")
        results.append(r)
    return results


def summary_line(r: BenchmarkResult) -> str:
    """e.g. ``avg@8 12.5% | pass@8 30.0% | 30 problems x 8 | 812 resp tokens | 3.3% truncated | 41.0 s``"""
    metrics = " | ".join(f"{k} {100 * v:.1f}%" for k, v in r.metrics.items() if k != "pass@1")
    return (f"{metrics} | {r.n_problems} problems x {r.n_samples} | {r.mean_response_tokens:.0f} resp tokens | "
            f"{100 * r.truncated_fraction:.1f}% truncated | {r.wall_s:.1f} s")


def flat_metrics(results: Sequence[BenchmarkResult], prefix: str = "eval") -> dict[str, float]:
    """Scalar metrics ``<prefix>/<benchmark>/<name>`` for metrics.jsonl and TensorBoard: avg@n and each
    pass@k (k > 1) of ``BenchmarkResult.metrics`` -- pass@1 is left out, it equals avg@n by definition
    (eval/metrics.py) -- ``response_length`` (mean tokens) and ``truncated_fraction`` (stopped by the
    length limit)."""
    out = {}
    for r in results:
        base = f"{prefix}/{r.name}/"
        for k, v in r.metrics.items():
            if k != "pass@1":
                out[base + k] = float(v)
        out[base + "response_length"] = float(r.mean_response_tokens)
        out[base + "truncated_fraction"] = float(r.truncated_fraction)
    return out
