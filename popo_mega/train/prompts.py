"""The training prompt stream: examples from data.train, templated and tokenized, with a cursor.

Sources in ``data.train``: ``synthetic`` (the quickstart task, its train split), a named set of
``popo_mega.data.benchmarks`` (math_train, aime_train, gsm8k_train, ...) or a file path (JSONL, JSON,
Parquet). Order: a seeded shuffle per epoch; the cursor (epoch, position) is checkpointed so a
resumed run sees exactly the prompts an uninterrupted run would. Prompts longer than
``data.max_prompt_tokens`` are left out at encode time and counted per source file (``Encoded``):
the loop reports them at start-up and in the metrics of its first step.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from popo_mega.config import DataConfig
from popo_mega.data.datasets import BadRecord, Example, count_by_source, location_kind


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


@dataclass
class Encoded:
    """The prompts of ``encode`` and the examples it left out for being too long.

    too_long: one BadRecord per example whose prompt exceeds data.max_prompt_tokens (file and line).
    """

    prompts: list[Prompt]
    too_long: list[BadRecord]

    def too_long_by_source(self) -> dict[str, int]:
        return count_by_source(self.too_long)


def encode(examples: list[Example], cfg: DataConfig, tokenizer) -> Encoded:
    """Template and tokenize. A prompt longer than data.max_prompt_tokens is left out and counted per
    source file (``Encoded.too_long``), never fatal: one long problem among thousands must not stop
    a run (issue 11; the shipped math_train_rllm.json has a few). Only when every prompt is too long
    is it an error, naming the key and the shortest prompt."""
    from popo_mega.config import ConfigError
    from popo_mega.data.templates import render_prompt

    if cfg.template == "chat" and cfg.train != ("synthetic",) and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"key 'data.template' is 'chat', but the tokenizer of model.hf_path "
                          f"({getattr(tokenizer, 'name_or_path', '?')}) has no chat_template (a base model's has "
                          "none): use data.template qwen-math or plain, or a model whose tokenizer has one")
    texts = [e.question if cfg.train == ("synthetic",) else render_prompt(e.question, cfg.template, tokenizer)
             for e in examples]
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, too_long = [], []
    for e, ids in zip(examples, all_ids):
        if len(ids) > cfg.max_prompt_tokens:
            too_long.append(BadRecord(e.source, e.line, f"prompt has {len(ids)} tokens > data.max_prompt_tokens="
                                      f"{cfg.max_prompt_tokens}", location_kind(e.source)))
            continue
        out.append(Prompt(ids=list(ids), gold=e.answer, question=e.question))
    if examples and not out:
        shortest = min(len(ids) for ids in all_ids)
        raise ValueError(f"all {len(examples)} prompts are longer than data.max_prompt_tokens="
                         f"{cfg.max_prompt_tokens} (the shortest has {shortest} tokens; first: {too_long[0]})")
    return Encoded(out, too_long)


def describe_too_long(encoded: Encoded, max_prompt_tokens: int) -> str:
    """For the start-up log line, e.g. "7 prompts over data.max_prompt_tokens=1024 left out
    (math_train_rllm.json: 7)"."""
    counts = encoded.too_long_by_source()
    text = f"{sum(counts.values())} prompts over data.max_prompt_tokens={max_prompt_tokens} left out"
    if counts:
        text += " (" + ", ".join(f"{os.path.basename(src) or src}: {n}" for src, n in counts.items()) + ")"
    return text


def too_long_metrics(encoded: Encoded) -> dict[str, float]:
    """Start-up metrics: ``prompts_too_long`` and ``prompts_too_long/<file name>`` per source."""
    out = {"prompts_too_long": float(len(encoded.too_long))}
    for src, n in encoded.too_long_by_source().items():
        key = f"prompts_too_long/{os.path.basename(src) or src}"
        out[key] = out.get(key, 0.0) + n
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
