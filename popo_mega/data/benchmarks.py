"""The named math sets in the shared data directory (see its PROVENANCE.md): evaluation benchmarks
and training sets, with the field map each file needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from popo_mega.data.datasets import LoadResult, load_examples
from popo_mega.data.paths import shared_math_dir


@dataclass(frozen=True)
class MathSet:
    file: str
    question_key: str
    answer_key: str = "answer"
    id_key: str | None = None


BENCHMARKS = {
    "aime2025": MathSet("aime2025.jsonl", "problem", id_key="id"),
    "aime2024": MathSet("aime2024.jsonl", "problem", id_key="id"),
    "amc23": MathSet("amc23.jsonl", "problem", id_key="id"),   # answers are floats (27.0)
    "math500": MathSet("math500.jsonl", "problem", id_key="unique_id"),
    "gsm8k": MathSet("gsm8k_test.jsonl", "question"),        # answers are solutions ending in '#### N'
}

TRAIN_SETS = {
    "math_train": MathSet("math_train_rllm.json", "problem"),      # 2 records with an empty answer: skipped
    "aime_train": MathSet("aime_1983_2023_train_rllm.json", "problem"),
    "gsm8k_train": MathSet("gsm8k_train.jsonl", "question"),
}


def load_math_set(name: str, *, data_dir: str | None = None, on_bad: str = "skip", limit: int | None = None) -> LoadResult:
    """Load a benchmark or training set by name from the shared data directory (or ``data_dir``)."""
    spec = BENCHMARKS.get(name) or TRAIN_SETS.get(name)
    if spec is None:
        raise KeyError(f"unknown math set {name!r}; known: {', '.join(sorted(BENCHMARKS) + sorted(TRAIN_SETS))}")
    path = os.path.join(shared_math_dir(data_dir), spec.file)
    return load_examples(path, question_key=spec.question_key, answer_key=spec.answer_key, id_key=spec.id_key,
                         on_bad=on_bad, limit=limit)
