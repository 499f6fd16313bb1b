"""The shipped mixture-of-experts configs keep expert parallelism in their miniature runs (fast: no
model is built; the runs themselves are the extended tests of test_shipped_configs.py).

tests/e2e/shipped.py cuts each config to 2 gloo processes; for a config with ``parallel.expert`` > 1
the cut must keep EP=2 (over DP=2) and pick the Qwen3-MoE miniature checkpoint, whose 4 experts EP=2
divides, and a config that attaches to servers elsewhere (rollout.urls) must run the embedded one.
"""

import os

import pytest

from tests.e2e import shipped

MOE = [n for n in shipped.shipped_configs() if shipped.read_config(n).get("parallel", {}).get("expert", 1) > 1]


def test_the_qwen3_moe_configs_are_shipped_with_expert_parallelism():
    assert {"qwen3-30b-a3b-popo.yaml", "qwen3-235b-a22b-popo.yaml"} <= set(MOE)


@pytest.mark.parametrize("name", MOE)
def test_miniature_keeps_expert_parallelism(name, tmp_path):
    from popo_mega.config import check_layout, load_config
    from tests.real_checkpoints import qwen3_moe_config

    raw = shipped.read_config(name)
    assert shipped.family(raw) == "qwen3_moe"
    par = shipped.miniature_parallel(raw)
    assert par == {"tensor": 1, "pipeline": 1, "sequence_parallel": False, "expert": 2}
    cfg = load_config(os.path.join(shipped.CONFIGS, name), shipped.miniature_overrides(name, "/m", str(tmp_path)))
    assert cfg.parallel.expert == 2 and cfg.parallel.tensor == cfg.parallel.pipeline == 1
    assert cfg.rollout.urls == () and cfg.rollout.backend == "embedded"
    check_layout(cfg, world_size=2, hf_config=qwen3_moe_config().to_dict())   # 4 experts over EP=2, DP=2
