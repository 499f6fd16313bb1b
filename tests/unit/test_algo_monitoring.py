"""P7 monitoring sums against hand values."""

import math

import pytest
import torch

from popo_mega.algorithms.monitoring import rollout_sums, target_kl_sums


def test_rollout_sums_hand_values():
    w = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    pos = torch.tensor([True, True, False, False, False, False, True, False])
    s = rollout_sums(w, pos, group_size=2, lengths=torch.tensor([3, 4, 5, 6, 7, 8, 9, 10]))
    assert s["positives"].item() == 3 and s["rollouts"].item() == 8
    assert s["prompts"].item() == 4 and s["prompts_with_positive"].item() == 2
    assert s["weight_entropy_sum"].item() == pytest.approx(math.log(2.0))   # log 2 + 0
    assert s["response_length_sum"].item() == 52


def test_target_kl_sums_hand_values():
    logp = torch.tensor([0.0, -1.0, -3.0])
    target = torch.tensor([math.log(2.0), -1.0, 5.0])
    s = target_kl_sums(logp, target, torch.tensor([1.0, 1.0, 0.0]))
    assert s["kl_sum"].item() == pytest.approx(1 - math.log(2.0), abs=1e-7)
    assert s["token_count"].item() == 2.0
