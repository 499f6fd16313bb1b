"""Question/answer records from JSONL, JSON arrays and Parquet, with field maps and a bad-record policy.

``load_examples(path)`` reads one file into ``Example``s (question, answer as a string, where it came
from). Fields: the question is the first present of ``question_key`` or ("problem", "question",
"prompt"); the answer of ``answer_key`` or ("answer", "final_answer", "gold"). Answers are normalised:
a GSM8K solution keeps what follows ``####`` (thousands separators removed), a float with an integer
value becomes an integer string (AMC's ``27.0`` -> ``"27"``), other numbers ``str()``.

A bad record (not an object, a missing or empty field, a line that is not JSON) is reported with
its file and line (Parquet: row): ``on_bad="error"`` raises ``DataError`` at the first one,
``on_bad="skip"`` skips it and counts it in ``LoadResult.skipped``. A file that cannot be read as a
whole (a broken JSON array, an unknown extension) always raises.
"""

from __future__ import annotations

import collections
import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable

from popo_mega.rewards.extract import gsm8k_answer

QUESTION_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "gold")


class DataError(ValueError):
    """A bad record or file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One question with its gold answer. ``source``/``line``: file and 1-based line (row for Parquet)."""

    question: str
    answer: str
    source: str = ""
    line: int = 0
    id: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class BadRecord:
    source: str
    line: int
    reason: str
    where: str = "line"  # "row" for Parquet

    def __str__(self) -> str:
        loc = f"{self.source}:{self.line}" if self.where == "line" else f"{self.source}: row {self.line}"
        return f"{loc}: {self.reason}"


def location_kind(path: str) -> str:
    """How a record of ``path`` is located in messages: "row" for Parquet, "line" otherwise."""
    return "row" if path.lower().endswith((".parquet", ".pq")) else "line"


def count_by_source(records: Iterable[BadRecord]) -> dict[str, int]:
    """{source file: number of records}, in the order the sources first appear."""
    return dict(collections.Counter(r.source for r in records))


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: list[BadRecord]

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def normalize_answer(value) -> str | None:
    """A gold answer as a string, or None when it is missing/empty/not a scalar."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if "####" in text:
        text = gsm8k_answer(text) or ""
    return text or None


def _iter_jsonl(path: str):
    """(line, record or None, error) per non-blank line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"


def _iter_json_array(path: str):
    """(line where the element starts, element, None) for a top-level JSON array."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    dec = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}: a .json file must hold a JSON array of records (JSONL: use .jsonl)")
    i = _skip_ws(text, i + 1)
    line, counted_to = 1, 0
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        line += text.count("\n", counted_to, i)
        counted_to = i
        yield line, obj, None
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            lineno = text.count("\n", 0, i) + 1
            raise DataError(f"{path}:{lineno}: expected ',' or ']' in the JSON array")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _iter_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from e
    for row, rec in enumerate(pq.read_table(path).to_pylist(), 1):
        yield row, rec, None


def _records(path: str):
    ext = os.path.splitext(path)[1].lower()
    if ext in (".jsonl", ".ndjson"):
        return _iter_jsonl(path)
    if ext == ".json":
        return _iter_json_array(path)
    if ext in (".parquet", ".pq"):
        return _iter_parquet(path)
    raise DataError(f"{path}: unknown data file type {ext!r} (expected .jsonl, .json or .parquet)")


def _pick(rec: dict, key: str | None, defaults: tuple[str, ...]):
    """(key used, value); with an explicit key only that key is looked at."""
    for k in ((key,) if key else defaults):
        if k in rec:
            return k, rec[k]
    return None, None


def load_examples(path: str, *, question_key: str | None = None, answer_key: str | None = None,
                  id_key: str | None = None, on_bad: str = "skip", limit: int | None = None) -> LoadResult:
    """Read ``path`` (.jsonl, .json array, .parquet) into Examples; see the module docstring."""
    if on_bad not in ("skip", "error"):
        raise ValueError(f"load_examples: on_bad must be 'skip' or 'error', got {on_bad!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    examples: list[Example] = []
    skipped: list[BadRecord] = []
    where = location_kind(path)
    q_names = question_key or "/".join(QUESTION_KEYS)
    a_names = answer_key or "/".join(ANSWER_KEYS)
    for line, rec, err in _records(path):
        if limit is not None and len(examples) >= limit:
            break
        if err is None and not isinstance(rec, dict):
            err = f"record is a {type(rec).__name__}, not an object"
        if err is None:
            qk, q = _pick(rec, question_key, QUESTION_KEYS)
            ak, a = _pick(rec, answer_key, ANSWER_KEYS)
            answer = normalize_answer(a)
            if qk is None:
                err = f"no question field ({q_names})"
            elif not isinstance(q, str) or not q.strip():
                err = f"empty or non-text question field {qk!r}"
            elif ak is None:
                err = f"no answer field ({a_names})"
            elif answer is None:
                err = f"empty or unusable answer field {ak!r}: {a!r}"
        if err is not None:
            bad = BadRecord(path, line, err, where)
            if on_bad == "error":
                raise DataError(str(bad))
            skipped.append(bad)
            continue
        rid = rec.get(id_key) if id_key else None
        meta = {k: v for k, v in rec.items() if k not in (qk, ak)}
        examples.append(Example(question=q, answer=answer, source=path, line=line,
                                id=None if rid is None else str(rid), meta=meta))
    return LoadResult(examples, skipped)
