"""The weights a sync sends from the served EMA copy (``PolicyTrainer.served``, train/served_model.py)
equal what the old sync sent with the EMA swapped into the policy, at TP=2 and at PP=2, with tied and
untied embeddings; and gathering them leaves the live policy's parameters as they were.

Two gloo processes, a tiny Qwen2, CPU. One POPO step (tau 0.9) first, so that the EMA differs from
the policy. The expected tensors come from the path this replaces: ``EMA.swapped_into`` the policy,
then ``iter_hf_tensors`` + ``funnel_pipeline_stages`` over the policy module.
"""

import pytest
import torch

from tests.distributed.test_train_step import make_cfg, make_samples
from tests.multiprocess import run_world
from tests.tiny_models import qwen2_config, save_tiny


def _layouts(rank, world_size, paths):
    from megatron.core import parallel_state

    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize
    from popo_mega.train.served_model import hf_tensors_for_engine
    from popo_mega.train.step import PolicyTrainer

    out = {}
    for tied, path in paths.items():
        for tp, pp in ((2, 1), (1, 2)):
            rt = initialize(tp, pp, seed=0, device="cpu")
            cfg = make_cfg(path)
            trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
            trainer.train_step([s for s in make_samples() if s.positive])
            policy = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if torch.is_tensor(v)}
            got = {k: v.clone() for k, v in hf_tensors_for_engine(trainer.served, trainer.arch, trainer.layout)}
            untouched = all(torch.equal(v, policy[k]) for k, v in trainer.model.state_dict().items() if torch.is_tensor(v))
            live = {k: v.clone() for k, v in hf_tensors_for_engine(trainer.model, trainer.arch, trainer.layout)}
            with torch.no_grad(), trainer.ema.swapped_into(trainer.model):
                want = {k: v.clone() for k, v in hf_tensors_for_engine(trainer.model, trainer.arch, trainer.layout)}
            out[tied, tp, pp] = {"got": got, "want": want, "live": live, "untouched": untouched}
            parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    paths = {}
    for tied in (False, True):
        path = tmp_path_factory.mktemp("hf") / f"qwen2_tied{int(tied)}"
        save_tiny(qwen2_config(tie_word_embeddings=tied), path)
        paths[tied] = str(path)
    return run_world(_layouts, 2, paths, timeout=600)


@pytest.mark.extended  # ~75 s (two processes, four trainers); CI: tests/unit/test_served_model.py (tied names,
# the cast, the policy untouched) and test_pretend_cuda_step.py's TP=2 / PP=2 syncs of the served EMA
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_served_ema_sends_what_the_swapped_ema_sent(results, tied, tp, pp):
    r0, r1 = (r[tied, tp, pp] for r in results)
    got, want = r0["got"], r0["want"]
    assert got and sorted(got) == sorted(want)                   # every stage's tensors reach rank 0
    assert ("lm_head.weight" in got) != tied                     # HF ties lm_head to embed_tokens
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], r0["live"][k]) for k in got)   # the EMA, not the policy
    assert r1["got"] == {}                                       # only global rank 0 receives
    assert r0["untouched"] and r1["untouched"]                   # the policy's parameters as they were
