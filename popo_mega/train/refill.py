"""DAPO dynamic sampling, refilled: roll out more prompts until the step has ``prompts_per_step``
informative groups, in at most ``algorithm.grpo.max_refill_rounds`` extra rounds (rank 0).

A group whose G rewards are all equal has zero advantage and no gradient; DAPO (Yu et al. 2025,
eq. 11, the constraint 0 < |{o_i correct}| < G, and Algorithm 1) keeps sampling until the batch
holds only groups with mixed rewards. ``select`` drops such groups; this module tops the batch
back up. Simplified from DAPO: each extra round asks for the missing groups divided by the
informative rate seen so far (at most one full batch), instead of a fixed generation batch; and
when the bound is reached the step trains on the groups it has (``informative_shortfall`` says
how many are missing) rather than stopping the run.

Rows follow ``select``: the rollouts of prompt g are rows g*G .. g*G+G-1 of the flat lists.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from popo_mega.rollout.engine import SamplingParams, sample_seed
from popo_mega.train.select import informative_groups


@dataclass
class Rollouts:
    """Graded rollouts of some prompts: prompts [P], completions [P][G], rewards [P*G], and the
    grader's counts (timeouts, ...), summed when rounds are merged."""

    prompts: list
    completions: list
    rewards: list[float]
    counts: dict[str, float] = dataclasses.field(default_factory=dict)


def refill(first: Rollouts, more: Callable[[int, int], Rollouts], *, target: int, group_size: int,
           max_rounds: int) -> tuple[Rollouts, dict[str, float]]:
    """The first ``target`` informative groups of ``first`` and of up to ``max_rounds`` extra
    rounds ``more(round, k)`` (round = 1, 2, ...; k prompts), and the step's statistics.

    Returns (kept, stats): ``kept`` holds at most ``target`` groups, all informative, in the order
    they were sampled; ``stats`` describe every rollout generated in the step (all rounds):
    reward, positive_rate, prompts_with_positive, response_length, rollouts, prompts_skipped
    (uninformative groups dropped), refill_rounds, refill_prompts (prompts of the extra rounds),
    informative_unused (informative groups beyond ``target``, dropped), informative_shortfall
    (target - kept groups), plus the grader's counts summed over rounds.
    """
    if target < 1 or max_rounds < 0:
        raise ValueError(f"refill: target must be >= 1 and max_rounds >= 0, got {target} and {max_rounds}")
    kept = Rollouts([], [], [], {})
    rewards_all: list[float] = []
    lengths_all: list[int] = []
    with_positive = seen = n_informative = rounds = extra_prompts = 0
    counts: dict[str, float] = {}
    batch = first
    while True:
        if len(batch.completions) != len(batch.prompts) or len(batch.rewards) != len(batch.prompts) * group_size:
            raise ValueError(f"refill: round {rounds} gave {len(batch.prompts)} prompts, "
                             f"{len(batch.completions)} groups and {len(batch.rewards)} rewards (G={group_size})")
        r = torch.tensor(batch.rewards, dtype=torch.float32)
        keep = informative_groups(r, group_size).tolist()
        for g, ok in enumerate(keep):
            if ok and len(kept.prompts) < target:
                kept.prompts.append(batch.prompts[g])
                kept.completions.append(batch.completions[g])
                kept.rewards += batch.rewards[g * group_size:(g + 1) * group_size]
        rewards_all += batch.rewards
        lengths_all += [max(1, len(c.output_ids)) for group in batch.completions for c in group]
        with_positive += int((r.view(-1, group_size) > 0).any(dim=1).sum()) if len(batch.prompts) else 0
        n_informative += sum(keep)
        seen += len(batch.prompts)
        for k, v in batch.counts.items():
            counts[k] = counts.get(k, 0.0) + float(v)
        need = target - len(kept.prompts)
        if need <= 0 or rounds >= max_rounds:
            break
        rate = n_informative / seen if seen else 0.0
        k = target if rate == 0 else min(target, math.ceil(need / rate))
        rounds += 1
        extra_prompts += k
        batch = more(rounds, k)
    kept.counts = counts
    n = max(1, len(rewards_all))
    stats = {"reward": sum(rewards_all) / n, "positive_rate": sum(x > 0 for x in rewards_all) / n,
             "prompts_with_positive": with_positive / max(1, seen), "response_length": sum(lengths_all) / n,
             "rollouts": float(len(rewards_all)), "prompts_skipped": float(seen - n_informative),
             "refill_rounds": float(rounds), "refill_prompts": float(extra_prompts),
             "informative_unused": float(n_informative - len(kept.prompts)),
             "informative_shortfall": float(target - len(kept.prompts)), **counts}
    return kept, stats


def stream_rollouts(stream, engine, sampling: SamplingParams, group_size: int) -> Callable[[int, int], tuple[list, list]]:
    """``roll(round, k)``: the next k prompts of ``stream`` and ``group_size`` rollouts of each.

    Round r samples with the seed ``sample_seed(sampling.seed, r)``: refill rounds draw fresh,
    reproducible samples (a resumed run repeats them: the stream cursor is checkpointed after them).
    """
    def roll(round_: int, k: int) -> tuple[list, list]:
        prompts = stream.next_batch(k)
        s = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sample_seed(sampling.seed, round_))
        return prompts, engine.generate([p.ids for p in prompts], s, n=group_size)

    return roll
