"""The synthetic verifiable task of the CPU quickstart: two-digit addition, fixed width.

A problem is ``a op b`` with ``a, b`` in ``[0, max_operand]`` and ``op`` in ``ops`` (default: ``+``
on 0..99, 10,000 problems). Its prompt is the text ``"07+45="`` and its gold answer ``"052"``:
operands and answers zero-padded to a fixed width (``fixed_width=False`` writes ``"7+45="`` /
``"52"``). A response is correct when it is exactly the gold text, whitespace around it aside (``score``:
"052" counts, "52" and "052\n7" do not; no math-verify, no process pool).
The model sees characters: the tokenizer shipped in ``popo_mega/assets/synthetic_tokenizer`` (one
token per character, ``<eos>`` id 2), so a prompt is 6 tokens and an answer 3 tokens plus ``<eos>``.

Why this task and this size (the quickstart must go from <= 60% to >= 90% held-out accuracy with
POPO in under 10 minutes on 2 CPU cores, issue 5):
  - Short sequences (10 tokens with the stop token) keep generation and the policy step cheap: a
    batch of hundreds of rollouts costs what one 256-token sequence costs a language model.
  - Held-out accuracy measures a rule, not memory: the held-out split (default 500 problems, chosen
    by seed) is never trained on, and answering it needs digit-wise addition with a carry.
  - It admits a supervised warm start (``sft_pairs``) whose held-out accuracy can be stopped low.
    Measured (a 0.5M-parameter Qwen2: hidden 128, 2 layers, 4 heads; AdamW lr 3e-3, 64 pairs per
    step; 1 CPU thread; /tmp probe, not committed): held-out accuracy stays near 5-13% for about
    1,200 steps (~2 min), then jumps within ~50 steps (0.10 -> 0.33 -> 0.59). So stop the warm start
    by held-out accuracy checked often (e.g. the first check >= 30%), not at a fixed step.
    A second seed jumped at ~600 steps instead (0.18 -> 0.34 in 50 steps).
    Plain positive-only fine-tuning (8 samples for each of 32 train prompts at temperature 1, NLL on
    the correct ones, fresh AdamW lr 1e-3; a simplification of POPO without the EMA target and
    similarity term) from such bases: seed 0 went 59% -> 73% in 72 s and 80% in 170 s; seed 1 went
    34% -> 50% in ~150 s, then COLLAPSED (held-out 0.42 -> 0.06 -> 0.00 within ~80 steps, samples
    "000"/"111"); at lr 3e-4 the same seed went 37% -> 54% in 1,170 steps (480 s) without
    collapsing. So the task is learnable by RL, but a naive positive-only learner is either unstable
    or slow on it: reaching 90% in the quickstart's budget rests on POPO's stabilisers (EMA target,
    similarity term) or a stronger warm start, not on this simplification.
  - Why fixed-width addition only: the same model on unpadded ``+``/``-`` (``fixed_width=False``,
    answers of varying length and sign) stayed below 8% held-out after 1,450 steps. (Width and the
    second op changed together, so this does not say which one mattered.)
  - Exact-match grading leaves no partial credit to game. ``ops=("+", "-")``, ``"*"`` or a larger
    ``max_operand`` make the task harder if a larger budget allows.
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
    """``a op b``. With ``width`` > 0 the text is fixed-width: operands zero-padded to ``width`` digits
    and the answer to ``answer_width(op, width)`` digits (a "-" in front when negative); with
    ``width`` = 0 numbers are written as usual."""

    a: int
    op: str
    b: int
    width: int = 0

    @property
    def prompt(self) -> str:
        """The prompt text, e.g. "07+45=" (width 2) or "7+45=" (width 0); one character is one token."""
        w = self.width
        return f"{self.a:0{w}d}{self.op}{self.b:0{w}d}=" if w else f"{self.a}{self.op}{self.b}="

    @property
    def value(self) -> int:
        return _OPS[self.op](self.a, self.b)

    @property
    def gold(self) -> str:
        """The answer as text, e.g. "052" (width 2) or "52"; "-22" / "-22" for 23-45."""
        v = self.value
        if not self.width:
            return str(v)
        digits = f"{abs(v):0{answer_width(self.op, self.width)}d}"
        return "-" + digits if v < 0 else digits


def answer_width(op: str, width: int) -> int:
    """Digits of the largest answer of ``op`` on ``width``-digit operands: + -> width+1, - -> width, * -> 2*width."""
    return {"+": width + 1, "-": width, "*": 2 * width}[op]


@dataclass(frozen=True)
class SyntheticTask:
    """All problems ``a op b`` (a, b in [0, max_operand], op in ops), split by ``seed`` into a train
    split and a held-out split of ``n_heldout`` problems (disjoint; the same for the same arguments).
    ``fixed_width`` writes zero-padded operands and answers (the default; see the module docstring)."""

    max_operand: int = 99
    ops: tuple[str, ...] = ("+",)
    n_heldout: int = 500
    seed: int = 0
    fixed_width: bool = True

    @property
    def width(self) -> int:
        """Operand digits when ``fixed_width`` (2 for max_operand 99), else 0 (plain numbers)."""
        return len(str(self.max_operand)) if self.fixed_width else 0

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
        return [Problem(a, op, b, self.width) for op in self.ops for a in r for b in r]

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


def parse_answer(response: str) -> str | None:
    """The answer a response states: the whole text before any "<eos>", surrounding whitespace
    removed, when it is an integer written as digits (optionally "-"); else None."""
    text = response.split("<eos>", 1)[0].strip()
    return text if _INT_RE.fullmatch(text) else None


def score(response: str, gold: str) -> float:
    """1.0 when the response is exactly the gold answer text (whitespace around it aside), else 0.0.

    Strict on purpose: the format (zero padding, nothing after the answer) is part of the task; a
    lenient integer match ("52" for "052", "052\n7") would reward other formats, and a learner
    trained on its own positives would then be taught them."""
    gold = str(gold).strip()
    if not _INT_RE.fullmatch(gold):
        raise ValueError(f"synthetic.score: gold must be an integer string, got {gold!r}")
    return 1.0 if parse_answer(response) == gold else 0.0


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
