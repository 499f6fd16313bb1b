"""The synthetic verifiable task of the CPU quickstart: small-integer arithmetic.

A problem is ``a op b`` with ``a, b`` in ``[0, max_operand]`` and ``op`` in ``ops``; its prompt is the
text ``"23+45="`` and its gold answer ``"68"`` (``"-22"`` for ``23-45``). The response is correct when
its first line, stripped, is exactly that integer (``score``; no math-verify, no process pool).
The model sees characters: the tokenizer shipped in ``popo_mega/assets/synthetic_tokenizer`` (one
token per character, ``<eos>`` id 2), so a prompt is 4-6 tokens and an answer 1-3 tokens plus ``<eos>``.

Why this size (the quickstart must go from <= 60% to >= 90% held-out accuracy with POPO in under
10 minutes on 2 CPU cores, see issue 5):
  - Short sequences (<= 11 tokens with the stop token) keep generation and the policy step cheap: a
    batch of hundreds of rollouts costs what one 256-token sequence costs a language model.
  - Two-digit addition/subtraction is learnable by a ~1-10M-parameter transformer; the answer needs a
    carry/borrow, so accuracy climbs gradually rather than jumping, and a short supervised warm start
    (``sft_pairs`` on the train split) can be stopped anywhere between chance and mastery: a base with
    a 20-60% held-out accuracy gives G=8 rollouts a positive on most prompts, which POPO needs (it
    learns from positives only).
  - 2 x 100 x 100 = 20,000 distinct problems: the held-out split (default 500, chosen by seed) is
    never trained on, so held-out accuracy measures the rule learnt, not memorisation.
  - Exact-match grading leaves no partial credit to game; answers are short, so a wrong one is
    unambiguous. ``max_operand`` and ``ops`` make it harder (e.g. ``ops=("+", "-", "*")``) or easier
    (``max_operand=9``) if the quickstart's budget changes.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

from popo_mega.data.datasets import Example

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "synthetic_tokenizer")

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_INT_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        """The prompt text, e.g. "23+45=" (no spaces: one character is one token)."""
        return f"{self.a}{self.op}{self.b}="

    @property
    def gold(self) -> str:
        """The answer as text, e.g. "68" or "-22"."""
        return str(_OPS[self.op](self.a, self.b))


@dataclass(frozen=True)
class SyntheticTask:
    """All problems ``a op b`` (a, b in [0, max_operand], op in ops), split by ``seed`` into a train
    split and a held-out split of ``n_heldout`` problems (disjoint; the same for the same arguments)."""

    max_operand: int = 99
    ops: tuple[str, ...] = ("+", "-")
    n_heldout: int = 500
    seed: int = 0

    def __post_init__(self):
        bad = [op for op in self.ops if op not in _OPS]
        if bad or not self.ops:
            raise ValueError(f"SyntheticTask: ops must be a non-empty subset of {sorted(_OPS)}, got {self.ops}")
        if self.max_operand < 1:
            raise ValueError(f"SyntheticTask: max_operand must be >= 1, got {self.max_operand}")
        total = len(self.ops) * (self.max_operand + 1) ** 2
        if not 0 < self.n_heldout < total:
            raise ValueError(f"SyntheticTask: n_heldout must be in 1..{total - 1} for {total} problems, got {self.n_heldout}")

    def all_problems(self) -> list[Problem]:
        """Every problem in a fixed order (op, a, b)."""
        r = range(self.max_operand + 1)
        return [Problem(a, op, b) for op in self.ops for a in r for b in r]

    def splits(self) -> tuple[list[Problem], list[Problem]]:
        """(train, held-out): a seeded shuffle of ``all_problems``; the first ``n_heldout`` are held out."""
        problems = self.all_problems()
        random.Random(self.seed).shuffle(problems)
        return problems[self.n_heldout:], problems[:self.n_heldout]

    def examples(self, split: str) -> list[Example]:
        """The split ("train" or "heldout") as data Examples: question = prompt text, answer = gold."""
        if split not in ("train", "heldout"):
            raise ValueError(f"SyntheticTask.examples: split must be 'train' or 'heldout', got {split!r}")
        train, heldout = self.splits()
        chosen = train if split == "train" else heldout
        return [Example(question=p.prompt, answer=p.gold, source=f"synthetic:{split}", line=i + 1)
                for i, p in enumerate(chosen)]

    def sft_pairs(self, split: str = "train") -> list[tuple[str, str]]:
        """(prompt, completion) texts for a supervised warm start; append the tokenizer's EOS to the completion."""
        return [(e.question, e.answer) for e in self.examples(split)]


def parse_answer(response: str) -> int | None:
    """The integer a response states: its first line (text before any "<eos>"), stripped, if that is
    exactly an integer; else None."""
    text = response.split("<eos>", 1)[0].split("\n", 1)[0].strip()
    return int(text) if _INT_RE.fullmatch(text) else None


def score(response: str, gold: str) -> float:
    """1.0 when the response's first line is exactly the gold integer, else 0.0."""
    got = parse_answer(response)
    try:
        want = int(str(gold).strip())
    except ValueError as e:
        raise ValueError(f"synthetic.score: gold must be an integer string, got {gold!r}") from e
    return 1.0 if got is not None and got == want else 0.0


def score_batch(responses, golds) -> list[float]:
    """``score`` over pairs (no pool needed: exact integer match is instant)."""
    if len(responses) != len(golds):
        raise ValueError(f"synthetic.score_batch: {len(responses)} responses but {len(golds)} golds")
    return [score(r, g) for r, g in zip(responses, golds)]


def load_tokenizer(path: str = TOKENIZER_DIR):
    """The shipped character tokenizer (transformers ``AutoTokenizer``, offline)."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"synthetic tokenizer not found in {path}; regenerate it with "
                                "`python -m popo_mega.assets.build_synthetic_tokenizer`")
    return AutoTokenizer.from_pretrained(path)
