"""The family registry: HF configs -> Architecture, and each family's weight table (no distributed state).

The weight-table test reads every Megatron parameter of a tiny checkpoint shard by shard (as each
TP/EP rank would), exports the shards back with the same table, and demands the original HF
tensors bit for bit, each HF tensor produced exactly once: loading and export derive from one table,
so a wrong row shows up as a mismatch or a missing / doubled name.
"""

import pytest
import torch
from safetensors.torch import load_file

from popo_mega.config import ConfigError, ModelConfig
from popo_mega.model import weight_table as wt
from popo_mega.model.builder import transformer_config
from popo_mega.model.families import FAMILIES, Architecture
from popo_mega.model.hf import SafetensorsReader, ShardLayout
from tests.tiny_models import llama3_config, qwen2_config, qwen3_config, qwen3_moe_config, save_tiny

CONFIGS = {"qwen2": qwen2_config, "llama": llama3_config, "qwen3": qwen3_config, "qwen3_moe": qwen3_moe_config}


def test_qwen3_dense_facts():
    a = Architecture.from_hf(qwen3_config().to_dict())
    assert (a.model_type, a.qk_norm, a.qkv_bias, a.tie_embeddings, a.is_moe) == ("qwen3", True, False, True, False)
    assert (a.head_dim, a.hidden_size // a.num_heads) == (32, 16)   # head_dim is the config's, not hidden/heads
    tc = transformer_config(a, ModelConfig(dtype="float32"), use_cpu_init=True)
    assert tc.qk_layernorm and tc.kv_channels == 32 and not tc.add_qkv_bias and tc.num_moe_experts is None


def test_qwen3_moe_facts_and_router_settings():
    a = Architecture.from_hf(qwen3_moe_config().to_dict())
    assert (a.num_experts, a.moe_top_k, a.moe_ffn_hidden_size, a.moe_norm_topk_prob) == (4, 2, 48, True)
    assert a.moe_aux_loss_coef == 0.001   # transformers' Qwen3MoeConfig default, as in Qwen3-30B-A3B
    tc = transformer_config(a, ModelConfig(dtype="float32"), use_cpu_init=True, ep=2)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.expert_model_parallel_size) == (4, 2, 48, 2)
    # norm_topk_prob: softmax over the top-k logits == renormalised top-k of the full softmax
    assert tc.moe_router_pre_softmax is False and tc.moe_router_score_function == "softmax"
    assert (tc.moe_router_load_balancing_type, tc.moe_aux_loss_coeff) == ("aux_loss", 0.001)
    raw = Architecture.from_hf(qwen3_moe_config(norm_topk_prob=False, router_aux_loss_coef=0.0).to_dict())
    tc = transformer_config(raw, ModelConfig(dtype="float32"), use_cpu_init=True)
    assert tc.moe_router_pre_softmax is True and tc.moe_router_load_balancing_type == "none"
    # The released config.json spelling (num_experts) reads the same as transformers 5's (num_local_experts).
    released = {k: v for k, v in qwen3_moe_config().to_dict().items() if k != "num_local_experts"}
    released["num_experts"] = 4
    assert Architecture.from_hf(released).num_experts == 4


@pytest.mark.parametrize("model,change,message", [
    ("qwen3", {"attention_bias": True}, "attention_bias=true is not supported for qwen3"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
    ("qwen3", {"model_type": "qwen3_next"}, "model_type 'qwen3_next' is not supported; supported: qwen2"),
])
def test_unsupported_qwen3_configs_are_named(model, change, message):
    hf = CONFIGS[model]().to_dict()
    hf.update(change)
    with pytest.raises(ConfigError, match=message) as e:
        Architecture.from_hf(hf, source="/ckpt/config.json")
    assert "/ckpt/config.json" in str(e.value)


def test_expert_parallelism_on_a_dense_model_is_refused():
    a = Architecture.from_hf(qwen3_config().to_dict())
    with pytest.raises(ConfigError, match="expert parallelism 2 needs a mixture-of-experts model"):
        transformer_config(a, ModelConfig(dtype="float32"), use_cpu_init=True, ep=2)


def _mcore_names(rules, arch, layout) -> list[str]:
    names = []
    for rule in rules:
        for j in range(layout.layers_per_stage) if "{j}" in rule.mcore else [None]:
            for e in range(layout.experts_per_rank) if rule.per_expert else [None]:
                names.append(rule.mcore.format(j=j, e=e))
    return names


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("tp,pp,ep", [(2, 1, 1), (1, 2, 2)], ids=["tp2", "pp2-ep2"])
def test_weight_table_load_then_export_is_identity(tmp_path, family, tp, pp, ep):
    cfg = CONFIGS[family]()
    save_tiny(cfg, tmp_path / "m")
    orig = load_file(str(tmp_path / "m" / "model.safetensors"))
    arch = Architecture.from_hf(cfg.to_dict())
    ep = ep if arch.is_moe else 1
    # The local spec's norm names only (the TE spec's fused names map to the same HF tensors).
    rules = [r for r in FAMILIES[family].weights if "layer_norm_weight" not in r.mcore
             and (arch.qkv_bias or not r.mcore.endswith("linear_qkv.bias"))]
    exported: dict[str, list[torch.Tensor]] = {}
    with SafetensorsReader(str(tmp_path / "m")) as reader:
        for pp_rank in range(pp):
            for ep_rank in range(ep):
                layouts = [ShardLayout(arch, tp, r, pp, pp_rank, ep=ep, ep_rank=ep_rank) for r in range(tp)]
                for name in _mcore_names(rules, arch, layouts[0]):
                    rule, match = wt.find_rule(FAMILIES[family].weights, name)
                    if ep_rank > 0 and not rule.per_expert:
                        continue   # the other EP ranks hold copies of the dense weights
                    if "{j}" not in rule.mcore and pp_rank != (0 if rule.mcore.startswith("embedding") else pp - 1):
                        continue   # embeddings on the first stage, final norm and output layer on the last
                    hf_names = rule.hf_names(match, layouts[0])
                    shards = [wt.read_shard(rule, hf_names, reader, lay) for lay in layouts]
                    if rule.shard != "replicated" and tp > 1:   # each rank holds a different part
                        assert not torch.equal(shards[0], shards[1]), name
                    for hf_name, t in wt.export_tensors(rule, hf_names, shards, layouts[0]):
                        exported.setdefault(hf_name, []).append(t)
    assert sorted(exported) == sorted(orig)
    for key, tensors in exported.items():
        assert len(tensors) == 1 and torch.equal(tensors[0], orig[key]), key


def test_an_unknown_megatron_name_is_named():
    with pytest.raises(wt.HFCheckpointError, match="decoder.layers.0.mlp.shared_experts.linear_fc1.weight"):
        wt.find_rule(FAMILIES["qwen3_moe"].weights, "decoder.layers.0.mlp.shared_experts.linear_fc1.weight")


def test_check_layout_knows_parallel_expert():
    from popo_mega.config import check_layout, config_from_dict

    moe, dense = qwen3_moe_config().to_dict(), qwen3_config().to_dict()

    def cfg(ep, tp=1, sp=None):
        sp = tp > 1 if sp is None else sp
        return config_from_dict({"parallel": {"expert": ep, "tensor": tp, "sequence_parallel": sp}}, source="run.yaml")

    check_layout(cfg(2), world_size=4, hf_config=moe)            # 4 experts over 2 of the 4 data-parallel ranks
    check_layout(cfg(4, tp=2), world_size=8, hf_config=moe)
    check_layout(cfg(1, tp=2, sp=False), world_size=2, hf_config=dense)
    for c, world, hf, message in [
        (cfg(1, tp=2, sp=False), 2, moe, r"'parallel.sequence_parallel' must be true for a mixture-of-experts"),
        (cfg(2), 2, dense, r"'parallel.expert' = 2 needs a mixture-of-experts model"),
        (cfg(3), 3, moe, r"'parallel.expert' = 3 does not divide the model's 4 experts"),
        (cfg(2, tp=2), 2, moe, r"'parallel.expert' = 2 does not divide the data-parallel size 1"),
        (cfg(0), 1, moe, r"'parallel.expert' must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            check_layout(c, world_size=world, hf_config=hf)
        assert "run.yaml" in str(e.value)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "qwen3_moe"])
def test_plan_layer_params_equal_the_hf_layer(family):
    """popo-plan's per-layer element count against transformers' own layer (q/k norms included for Qwen3;
    router and every expert for Qwen3-MoE, which popo-plan plans since issue 13 item 5)."""
    from transformers import AutoModelForCausalLM

    from popo_mega.plan import layer_params

    cfg = CONFIGS[family]()
    model = AutoModelForCausalLM.from_config(cfg)
    hf_layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0."))
    assert sum(layer_params(Architecture.from_hf(cfg.to_dict()), tp=1).values()) == hf_layer


@pytest.mark.parametrize("family,ep,message", [
    ("qwen3_moe", 3, "--ep 3 does not divide the model's 4 experts"),
    ("qwen3", 2, "--ep 2 needs a mixture-of-experts model \\(qwen3 is dense\\)"),
    ("qwen3_moe", 0, "--ep must be >= 1"),
])
def test_popo_convert_checks_ep_before_starting_processes(tmp_path, family, ep, message):
    from popo_mega.model.convert_cli import main

    save_tiny(CONFIGS[family](), tmp_path / "m")
    for command in (["verify", str(tmp_path / "m")], ["hf-to-mcore", str(tmp_path / "m"), str(tmp_path / "out")]):
        with pytest.raises(SystemExit, match=message):
            main([*command, "--ep", str(ep), "--device", "cpu"])
    assert not (tmp_path / "out").exists()
