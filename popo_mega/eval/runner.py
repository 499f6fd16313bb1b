"""Evaluate a RolloutEngine on a list of problems: prompts -> n samples each -> grades -> metrics.

Written against the ``RolloutEngine`` protocol (``popo_mega/rollout/engine.py``): any engine works,
the HTTP client of SGLang / embedded servers or a test double. Text is the caller's business: the
runner renders prompts with a template, encodes them with the tokenizer, and decodes responses with
``skip_special_tokens=True`` before grading.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from popo_mega.data.datasets import Example
from popo_mega.data.templates import encode_prompts
from popo_mega.eval.metrics import summarize
from popo_mega.rollout.engine import RolloutEngine, SamplingParams


@dataclass
class ProblemResult:
    index: int
    id: str | None
    gold: str
    n: int
    correct: int
    scores: list[float]
    response_tokens: list[int]
    finish_reasons: list[str]
    responses: list[str] = field(default_factory=list)  # the first ``keep_responses`` decoded responses


@dataclass
class BenchmarkResult:
    name: str
    n_problems: int
    n_samples: int
    metrics: dict[str, float]
    mean_response_tokens: float
    truncated_fraction: float
    wall_s: float
    grading: dict = field(default_factory=dict)  # counts from the grader (timeouts, no_answer, ...)
    problems: list[ProblemResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS plus the end-of-turn markers a chat model stops on, where the tokenizer has them."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        if marker in vocab and vocab[marker] not in ids:
            ids.append(int(vocab[marker]))
    return tuple(ids)


def evaluate(engine: RolloutEngine, tokenizer, examples: Sequence[Example], *, name: str, template: str,
             n: int, ks: Sequence[int], sampling: SamplingParams, score_fn: Callable[[list[str], list[str]], list[float]],
             batch_size: int = 64, keep_responses: int = 1, system_prompt: str | None = None,
             grading_stats: Callable[[], dict] | None = None,
             progress: Callable[[int], None] | None = None) -> BenchmarkResult:
    """Sample ``n`` responses per example, grade them with ``score_fn(responses, golds)``, and report
    pass@1, avg@n and pass@k for ``ks`` (each k <= n). ``batch_size`` prompts go to the engine at once.
    ``grading_stats`` (optional) returns the grader's counts for this benchmark, stored in ``grading``.
    ``progress`` (optional) is called with the number of problems graded so far after each batch."""
    if n < 1:
        raise ValueError(f"evaluate: n must be >= 1, got {n}")
    too_big = [k for k in ks if not 1 <= k <= n]
    if too_big:
        raise ValueError(f"evaluate: pass@k needs 1 <= k <= n={n} samples per problem, got k={too_big}")
    if not examples:
        raise ValueError(f"evaluate: benchmark {name!r} has no problems")
    t0 = time.monotonic()
    prompts = encode_prompts([e.question for e in examples], template, tokenizer, system_prompt)
    problems: list[ProblemResult] = []
    for start in range(0, len(examples), batch_size):
        chunk = prompts[start:start + batch_size]
        out = engine.generate(chunk, sampling, n=n)
        if len(out) != len(chunk) or any(len(group) != n for group in out):
            raise RuntimeError(f"evaluate: engine returned {[len(g) for g in out]} completions for "
                               f"{len(chunk)} prompts x n={n}")
        texts = [tokenizer.decode(c.output_ids, skip_special_tokens=True) for group in out for c in group]
        golds = [examples[start + i].answer for i in range(len(chunk)) for _ in range(n)]
        scores = list(score_fn(texts, golds))
        if len(scores) != len(texts):
            raise RuntimeError(f"evaluate: score_fn returned {len(scores)} scores for {len(texts)} responses")
        for i, group in enumerate(out):
            ex = examples[start + i]
            s = [float(x) for x in scores[i * n:(i + 1) * n]]
            problems.append(ProblemResult(
                index=start + i, id=ex.id, gold=ex.answer, n=n, correct=sum(1 for x in s if x > 0), scores=s,
                response_tokens=[len(c.output_ids) for c in group], finish_reasons=[c.finish_reason for c in group],
                responses=texts[i * n:i * n + keep_responses]))
        if progress is not None:
            progress(len(problems))
    counts = [(p.n, p.correct) for p in problems]
    lengths = [t for p in problems for t in p.response_tokens]
    reasons = [r for p in problems for r in p.finish_reasons]
    return BenchmarkResult(
        name=name, n_problems=len(problems), n_samples=n, metrics=summarize(counts, ks),
        mean_response_tokens=sum(lengths) / len(lengths), truncated_fraction=reasons.count("length") / len(reasons),
        wall_s=time.monotonic() - t0, grading=grading_stats() if grading_stats else {}, problems=problems)


def format_table(results: Sequence[BenchmarkResult]) -> str:
    """A plain-text table: one row per benchmark, metrics in percent."""
    metric_names: list[str] = []
    for r in results:
        for m in r.metrics:
            if m not in metric_names:
                metric_names.append(m)
    header = ["benchmark", "problems", "n"] + metric_names + ["resp tokens", "truncated %"]
    rows = [header]
    for r in results:
        rows.append([r.name, str(r.n_problems), str(r.n_samples)]
                    + [f"{100 * r.metrics[m]:.1f}" if m in r.metrics else "-" for m in metric_names]
                    + [f"{r.mean_response_tokens:.0f}", f"{100 * r.truncated_fraction:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
