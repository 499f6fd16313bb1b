"""Selection of rollouts for the policy step: POPO positives and weights, GRPO advantages, dynamic sampling."""

import math

import pytest
import torch

from popo_mega.config import config_from_dict
from popo_mega.rollout.engine import Completion
from popo_mega.train.prompts import Prompt, PromptStream
from popo_mega.train.select import select


def _c(ids, lps):
    return Completion(output_ids=list(ids), output_logprobs=list(lps), finish_reason="stop")


def _algo(**kw):
    return config_from_dict({"algorithm": kw}).algorithm


def test_popo_keeps_only_positives_with_p1_weights():
    prompts = [[1, 2], [3]]
    comps = [[_c([5, 6], [-1.0, -1.0]), _c([7], [-3.0]), _c([8, 9, 10], [-0.5, -0.5, -0.5])],
             [_c([4], [-2.0]), _c([4], [-2.0]), _c([4], [-2.0])]]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    sel = select(prompts, comps, rewards, _algo(name="popo"), group_size=3, uid_offset=100)
    assert [s.tokens.tolist() for s in sel.samples] == [[1, 2, 5, 6], [1, 2, 8, 9, 10]]
    assert [s.prompt_len for s in sel.samples] == [2, 2] and all(s.positive for s in sel.samples)
    assert [s.uid for s in sel.samples] == [100, 102]
    # P1 by hand: lbar = -1.0 and -0.5 -> softmax = (e^-1, e^-0.5) / (e^-1 + e^-0.5)
    z = math.exp(-1.0) + math.exp(-0.5)
    assert math.isclose(sel.samples[0].weight, math.exp(-1.0) / z, rel_tol=1e-6)
    assert math.isclose(sel.samples[1].weight, math.exp(-0.5) / z, rel_tol=1e-6)
    assert sel.samples[1].old_logp.tolist() == [-0.5, -0.5, -0.5]
    assert sel.stats["positive_rate"] == pytest.approx(2 / 6) and sel.stats["prompts_with_positive"] == 0.5
    assert sel.stats["prompts_skipped"] == 1.0 and sel.stats["reward"] == pytest.approx(2 / 6)
    assert math.isclose(sel.stats["response_length"], (2 + 1 + 3 + 1 + 1 + 1) / 6)


def test_popo_entropy_on_all_keeps_every_rollout_with_zero_weight_on_negatives():
    comps = [[_c([5], [-1.0]), _c([6], [-2.0])], [_c([7], [-1.0]), _c([8], [-1.0])]]
    sel = select([[1], [2]], comps, torch.tensor([1.0, 0.0, 0.0, 0.0]),
                 _algo(name="popo", popo={"entropy_on": "all"}), group_size=2)
    assert len(sel.samples) == 4
    assert [s.weight for s in sel.samples] == [1.0, 0.0, 0.0, 0.0]
    assert [s.positive for s in sel.samples] == [True, False, False, False]


def test_grpo_advantages_and_dynamic_sampling():
    comps = [[_c([5], [-1.0]), _c([6], [-1.0])], [_c([7], [-1.0]), _c([8], [-1.0])]]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    sel = select([[1], [2]], comps, rewards, _algo(name="grpo"), group_size=2)
    # Group 1: mean 0.5, unbiased std sqrt(0.5) -> A = +-0.5/sqrt(0.5); group 2: all equal -> 0.
    a = 0.5 / math.sqrt(0.5)
    assert [round(s.advantage, 5) for s in sel.samples] == [round(a, 5), round(-a, 5), 0.0, 0.0]
    sel = select([[1], [2]], comps, rewards, _algo(name="grpo", grpo={"dynamic_sampling": True}), group_size=2)
    assert len(sel.samples) == 2 and sel.stats["prompts_skipped"] == 1.0


def test_select_rejects_ragged_groups():
    with pytest.raises(ValueError, match="expected 1 x 2 rollouts"):
        select([[1]], [[_c([5], [-1.0])]], torch.tensor([1.0]), _algo(name="popo"), group_size=2)


def test_prompt_stream_is_deterministic_and_resumable():
    prompts = [Prompt(ids=[i], gold=str(i), question=str(i)) for i in range(5)]
    a = PromptStream(prompts, seed=3)
    first = [p.ids[0] for p in a.next_batch(7)]
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]  # one full epoch before any repeat
    state = a.state_dict()
    rest = [p.ids[0] for p in a.next_batch(6)]
    b = PromptStream(prompts, seed=3)
    b.load_state_dict(state)
    assert [p.ids[0] for p in b.next_batch(6)] == rest
    with pytest.raises(ValueError, match="checkpoint cursor is for 5 prompts / seed 3"):
        PromptStream(prompts, seed=9).load_state_dict(state)
