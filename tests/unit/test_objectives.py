"""One object per objective (train/objectives.py): what each algorithm asks of the loop and the step."""

import pytest
import torch

from popo_mega.config import config_from_dict
from popo_mega.train.batch import RolloutSample, pack_micro_batches
from popo_mega.train.objectives import A3PO, GRPO, POPO, make_objective


def _objective(**algorithm):
    return make_objective(config_from_dict({"algorithm": algorithm}).algorithm)


def _sample(uid, positive, old=True, response=3):
    tokens = torch.arange(2 + response, dtype=torch.int64) + 1
    return RolloutSample(tokens, 2, old_logp=torch.full((response,), -1.0) if old else None,
                         weight=1.0 if positive else 0.0, advantage=1.0 if positive else -1.0,
                         positive=positive, uid=uid)


@pytest.mark.parametrize("algorithm, cls", [({"name": "popo"}, POPO), ({"name": "grpo"}, GRPO), ({"name": "a3po"}, A3PO)])
def test_the_config_names_the_objective(algorithm, cls):
    assert type(_objective(**algorithm)) is cls


def test_what_each_objective_keeps_and_reads():
    popo = _objective(name="popo")  # defaults: alpha 0.1, token-level IS correction
    assert popo.keeps_ema and popo.keeps_predictor and not popo.keeps_reference and not popo.refills
    assert popo.needs_old_logp
    bare = _objective(name="popo", popo={"alpha": 0.0, "is_correction": "none"})
    assert bare.keeps_ema and not bare.keeps_predictor and not bare.needs_old_logp
    grpo = _objective(name="grpo", grpo={"beta_kl": 0.04, "dynamic_sampling": True})
    assert not grpo.keeps_ema and not grpo.keeps_predictor and grpo.keeps_reference and grpo.refills
    assert grpo.needs_old_logp and not _objective(name="grpo").keeps_reference


def test_positives_only_where_negatives_enter_no_term():
    batch = [_sample(0, True), _sample(1, False), _sample(2, True)]
    assert [s.uid for s in _objective(name="popo").trainable(batch)] == [0, 2]
    assert [s.uid for s in _objective(name="popo", popo={"entropy_on": "all"}).trainable(batch)] == [0, 1, 2]
    assert [s.uid for s in _objective(name="grpo").trainable(batch)] == [0, 1, 2]
    assert _objective(name="popo").trainable([_sample(1, False)]) == []  # the loop skips such a batch


def test_a_missing_old_logp_is_an_error_only_where_the_loss_reads_it():
    batch = [_sample(0, True, old=False)]
    with pytest.raises(ValueError, match="is_correction: token"):
        _objective(name="popo").check_inputs(batch)
    with pytest.raises(ValueError, match="'grpo'"):
        _objective(name="grpo").check_inputs(batch)
    _objective(name="popo", popo={"is_correction": "none"}).check_inputs(batch)  # no error


def test_group_normalisers_count_response_tokens_and_rollouts():
    (mb,) = pack_micro_batches([_sample(0, True, response=3), _sample(1, False, response=5)], 64)
    got = _objective(name="grpo").normalisers(mb)
    assert got.dtype == torch.float64 and got.tolist() == [8.0, 2.0, 0.0]  # 3 + 5 response tokens, 2 rollouts
