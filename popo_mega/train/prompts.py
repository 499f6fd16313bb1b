"""The training prompt stream: examples from data.train, templated and tokenized, with a cursor.

Sources in ``data.train``: ``synthetic`` (the quickstart task, its train split), a named set of
``popo_mega.data.benchmarks`` (math_train, aime_train, gsm8k_train, ...) or a file path (JSONL, JSON,
Parquet). Order: a seeded shuffle per epoch; the cursor (epoch, position) is checkpointed so a
resumed run sees exactly the prompts an uninterrupted run would.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from popo_mega.config import DataConfig
from popo_mega.data.datasets import Example


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    gold: str
    question: str


def load_train_examples(cfg: DataConfig) -> tuple[list[Example], int]:
    """(examples, number of bad records skipped) for ``cfg.train``; errors name the entry."""
    from popo_mega.data.benchmarks import TRAIN_SETS, BENCHMARKS, load_math_set
    from popo_mega.data.datasets import load_examples

    if not cfg.train:
        raise ValueError("data.train is empty: name 'synthetic', a set (math_train, gsm8k_train, ...) or a file")
    examples: list[Example] = []
    skipped = 0
    for entry in cfg.train:
        if entry == "synthetic":
            examples += synthetic_task(cfg).examples("train")
            continue
        if entry in TRAIN_SETS or entry in BENCHMARKS:
            res = load_math_set(entry, on_bad=cfg.bad_records)
        elif os.path.isfile(entry):
            res = load_examples(entry, question_key=cfg.prompt_key, answer_key=cfg.answer_key, on_bad=cfg.bad_records)
        else:
            raise ValueError(f"data.train entry {entry!r} is neither 'synthetic', a known set "
                             f"({', '.join(sorted(TRAIN_SETS))}) nor an existing file")
        examples += res.examples
        skipped += res.n_skipped
    return examples, skipped


def synthetic_task(cfg: DataConfig):
    from popo_mega.rewards.synthetic import SyntheticTask

    s = cfg.synthetic
    return SyntheticTask(max_operand=s.max_operand, ops=tuple(s.ops), n_heldout=s.n_heldout, seed=s.seed,
                         fixed_width=s.fixed_width)


def encode(examples: list[Example], cfg: DataConfig, tokenizer) -> list[Prompt]:
    """Template and tokenize; a prompt longer than data.max_prompt_tokens is an error naming its source."""
    from popo_mega.data.templates import render_prompt

    out = []
    for e in examples:
        text = e.question if cfg.train == ("synthetic",) else render_prompt(e.question, cfg.template, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            raise ValueError(f"{e.source}:{e.line}: prompt has {len(ids)} tokens > data.max_prompt_tokens="
                             f"{cfg.max_prompt_tokens}")
        out.append(Prompt(ids=ids, gold=e.answer, question=e.question))
    return out


class PromptStream:
    """Deterministic batches of prompts over epochs of a seeded shuffle."""

    def __init__(self, prompts: list[Prompt], seed: int):
        if not prompts:
            raise ValueError("PromptStream: no prompts")
        self.prompts, self.seed = prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.prompts) or state["seed"] != self.seed:
            raise ValueError(f"PromptStream: checkpoint cursor is for {state['size']} prompts / seed {state['seed']}, "
                             f"this run has {len(self.prompts)} / seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)
