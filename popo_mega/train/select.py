"""From scored rollouts to the samples the policy step trains on.

POPO (docs/algorithms.md, P1): only positives carry weight; with ``entropy_on: positive`` the
negatives are dropped here, so they never reach the policy's forward pass (training cost scales
with positive tokens). Prompts with no positive contribute nothing and are counted.
GRPO / A3PO: group-relative advantages (section 2); with ``dynamic_sampling`` groups whose rewards
are all equal (zero advantage) are dropped (DAPO) and counted; the loop refills the batch to
``data.prompts_per_step`` informative groups first (popo_mega/train/refill.py).

Every rollout of prompt g is at rows g*G .. g*G+G-1 of the flat lists (G = group size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from popo_mega.algorithms.grpo import group_advantages
from popo_mega.algorithms.popo import positive_weights
from popo_mega.config import GrpoConfig, PopoConfig
from popo_mega.rollout.engine import Completion
from popo_mega.train.batch import RolloutSample


@dataclass
class Selection:
    samples: list[RolloutSample]
    stats: dict[str, float]


def _sample(prompt: list[int], c: Completion, **kw) -> RolloutSample:
    return RolloutSample(tokens=torch.tensor(list(prompt) + list(c.output_ids), dtype=torch.int64),
                         prompt_len=len(prompt), old_logp=torch.tensor(c.output_logprobs, dtype=torch.float32), **kw)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: the groups whose rewards are not all equal (DAPO's dynamic-sampling filter).

    rewards: [P*G], rows g*G .. g*G+G-1 for prompt g."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def _flatten(prompts, completions, rewards: torch.Tensor, group_size: int):
    """Check the shapes; return (flat [(g, completion)], response lengths [P*G], stats with reward and
    response length), or (None, None, stats) for a step with no prompt (a refilled step that found no
    informative group)."""
    flat = [(g, c) for g, group in enumerate(completions) for c in group]
    if len(flat) != rewards.numel() or any(len(group) != group_size for group in completions):
        raise ValueError(f"select: expected {len(prompts)} x {group_size} rollouts and as many rewards, "
                         f"got {[len(g) for g in completions]} and {rewards.numel()}")
    if not prompts:
        return None, None, {"rollouts": 0.0}
    lengths = torch.tensor([max(1, len(c.output_ids)) for _, c in flat], dtype=torch.float32)
    stats = {"reward": float(rewards.float().mean()), "response_length": float(lengths.mean()),
             "rollouts": float(len(flat))}
    return flat, lengths, stats


def select_positives(prompts: list[list[int]], completions: list[list[Completion]], rewards: torch.Tensor,
                     p: PopoConfig, group_size: int, uid_offset: int = 0) -> Selection:
    """POPO (P1): the positives with their self-normalised weights (and, with ``entropy_on: all``, the
    negatives for the entropy term only). prompts: [P] token lists; completions: [P][G]; rewards: [P*G]."""
    flat, lengths, stats = _flatten(prompts, completions, rewards, group_size)
    if flat is None:
        return Selection([], stats)
    n_prompts = len(prompts)
    positive = rewards > p.reward_threshold
    seq_logp = torch.tensor([sum(c.output_logprobs) / max(1, len(c.output_logprobs)) for _, c in flat])
    weights = positive_weights(seq_logp, positive, group_size, mode=p.weight_mode,
                               temperature=p.weight_temperature, length=lengths if p.length_normalize else None)
    has_pos = positive.view(n_prompts, group_size).any(dim=1)
    w_pos = weights[positive]
    stats.update(positive_rate=float(positive.float().mean()), prompts_with_positive=float(has_pos.float().mean()),
                 prompts_skipped=float((~has_pos).sum()),
                 weight_entropy=float(-(w_pos * w_pos.clamp_min(1e-12).log()).sum() / max(1, int(has_pos.sum()))))
    keep_negatives = p.entropy_on == "all"
    samples = [_sample(prompts[g], c, weight=float(weights[i]), positive=bool(positive[i]), uid=uid_offset + i)
               for i, (g, c) in enumerate(flat) if bool(positive[i]) or keep_negatives]  # P4, entropy_on=all: all
    return Selection(samples, stats)


def select_groups(prompts: list[list[int]], completions: list[list[Completion]], rewards: torch.Tensor,
                  g: GrpoConfig, group_size: int, uid_offset: int = 0) -> Selection:
    """GRPO / A3PO: every rollout with its group-relative advantage; with ``dynamic_sampling`` the
    groups whose rewards are all equal are dropped and counted. Shapes as ``select_positives``."""
    flat, _, stats = _flatten(prompts, completions, rewards, group_size)
    if flat is None:
        return Selection([], stats)
    adv = group_advantages(rewards.float(), group_size, std_normalize=g.std_normalize)
    by_group = rewards.view(len(prompts), group_size)
    informative = informative_groups(rewards, group_size)
    stats.update(positive_rate=float((rewards > 0).float().mean()),
                 prompts_with_positive=float((by_group > 0).any(dim=1).float().mean()),
                 prompts_skipped=float((~informative).sum()) if g.dynamic_sampling else 0.0)
    samples = [_sample(prompts[k], c, advantage=float(adv[i]), positive=bool(rewards[i] > 0), uid=uid_offset + i)
               for i, (k, c) in enumerate(flat) if not g.dynamic_sampling or bool(informative[k])]
    return Selection(samples, stats)
