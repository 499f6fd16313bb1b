"""popo-plan (popo_mega.plan): parameter counts, memory terms, activation formula, largest micro-batch, CLI.

Expected numbers are derived independently: parameter totals from transformers' own model of the same
config (and the published sizes of the real checkpoints), terms by hand from the formulas of
docs/plan.md, the largest micro-batch by brute force.
"""

import dataclasses
import json
import os
import re

import pytest

from popo_mega.config import ConfigError
from popo_mega.model.builder import Architecture
from popo_mega.plan import (KNOWN_MODELS, Layout, activation_bytes, layer_activation_bytes_per_token, main,
                            max_micro_batch_tokens, plan, plan_stage, predictor_params, stage_params)
from tests.tiny_models import llama3_config, qwen2_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arch(cfg):
    return Architecture.from_hf(cfg.to_dict())


@pytest.mark.parametrize("make", [qwen2_config, llama3_config])
def test_tp1_pp1_params_equal_transformers_model_plus_vocab_padding(make):
    from transformers import AutoModelForCausalLM

    cfg = make()
    n_hf = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    arch = _arch(cfg)
    p = stage_params(arch, tp=1, pp=1, pp_rank=0, divisible_by=128)
    v_pad = -(-cfg.vocab_size // 128) * 128          # 251 -> 256, 263 -> 384
    tables = 1 if cfg.tie_word_embeddings else 2
    assert p["vocab_padded"] == v_pad
    assert p["total"] == n_hf + tables * (v_pad - cfg.vocab_size) * cfg.hidden_size


def test_tp_and_pp_shards_sum_to_the_whole():
    """TP shards of the layers add up to the TP=1 layers plus the replicated norms; PP stages add up to
    the PP=1 total plus the tied embedding's copy on the last stage."""
    arch = _arch(llama3_config(num_hidden_layers=4))     # tied
    one = stage_params(arch, 1, 1, 0, 128)
    two = stage_params(arch, 2, 1, 0, 128)
    norms = arch.num_layers * 2 * arch.hidden_size
    assert 2 * two["layers"] == one["layers"] + norms
    v2 = -(-263 // 256) * 256                             # padded to 128 x TP = 256 -> 512 at TP=2
    assert two["embedding"] == v2 // 2 * 64 and two["output_layer"] == 0
    stages = [stage_params(arch, 1, 2, r, 128) for r in range(2)]
    assert stages[0]["embedding"] and not stages[0]["output_layer"] and not stages[0]["final_norm"]
    assert stages[1]["output_layer"] == stages[0]["embedding"] == 384 * 64   # the tied copy
    assert sum(s["total"] for s in stages) == one["total"] + 384 * 64


@pytest.mark.parametrize("name,published", [("qwen2.5-7b", 7_615_616_512), ("llama3-70b", 70_553_706_496),
                                            ("qwen2.5-math-1.5b", 1_543_714_304)])
def test_builtin_models_match_published_sizes(name, published):
    """Unpadded TP=1 total = the parameter count of the released safetensors (model cards)."""
    arch = Architecture.from_hf(KNOWN_MODELS[name])
    p = stage_params(arch, 1, 1, 0, divisible_by=1)
    assert p["total"] == published


def test_predictor_params_by_hand():
    # Linear 64->32 (+bias), LayerNorm 32 (w, b), Linear 32->64 (+bias)
    assert predictor_params(64, 32, 2) == 64 * 32 + 32 + 2 * 32 + 32 * 64 + 64
    assert predictor_params(8, 4, 1) == 8 * 8 + 8
    assert predictor_params(8, 4, 3) == (8 * 4 + 4 + 8) + (4 * 4 + 4 + 8) + (4 * 8 + 8)


def test_static_terms_by_hand():
    arch = _arch(qwen2_config())
    lay = Layout(tp=1, pp=1, dp=4, micro_batch_tokens=256, predictor_hidden=32)
    n = stage_params(arch, 1, 1, 0)["total"]
    q = predictor_params(64, 32, 2)
    t = plan_stage(arch, lay, 0)["terms"]
    assert t["weights"] == 2 * n and t["grads"] == 4 * n and t["ema"] == 4 * n
    # bf16 predictor: its fp32 main copy + Adam are sharded with the model's in the optimizer.
    assert t["optimizer"] == (12 * n + 12 * q) / 4
    assert t["predictor"] == 2 * q + 4 * q
    no_dist = plan_stage(arch, dataclasses.replace(lay, distributed_optimizer=False), 0)["terms"]
    assert no_dist["optimizer"] == 12 * n + 12 * q
    fp32 = plan_stage(arch, dataclasses.replace(lay, param_bytes=4), 0)["terms"]
    assert fp32["predictor"] == 8 * q + 8 * q / 4 and fp32["optimizer"] == 8 * n / 4
    grpo = plan_stage(arch, dataclasses.replace(lay, popo=False), 0)["terms"]
    assert grpo["ema"] == grpo["predictor"] == grpo["ema_swap"] == 0
    fp8 = plan_stage(arch, dataclasses.replace(lay, fp8=True), 0)["terms"]
    linear = 2 * ((4 + 4) * 16 * 64 + 64 * 64 + 2 * 96 * 64 + 64 * 96)   # 2 layers: qkv, proj, fc1, fc2
    assert fp8["fp8_cache"] == 2 * linear


def test_norms_and_predictor_follow_the_model_dtype():
    """PolicyTrainer keeps RMSNorm weights and the predictor in the model dtype (bf16 here): every
    parameter has an fp32 main copy + Adam in the optimizer; the predictor adds its bf16 weights
    and fp32 grads. q by hand for h=64, predictor 1024 x 2: 64*1024+1024 + 2*1024 + 1024*64+64."""
    arch = _arch(qwen2_config())
    p = stage_params(arch, 1, 1, 0)
    q = 64 * 1024 + 1024 + 2 * 1024 + 1024 * 64 + 64
    t = plan_stage(arch, Layout(impl="local", micro_batch_tokens=256), 0)["terms"]
    assert t["weights"] == 2 * p["total"]
    assert t["predictor"] == 2 * q + 4 * q
    assert t["optimizer"] == 12 * p["total"] + 12 * q


def test_activation_formula_by_hand_te():
    """h=64, a=4, g=2, d=16, F=96, bf16, TP=2 with SP: the docstring's terms written out."""
    arch = _arch(qwen2_config())
    lay = Layout(tp=2, sequence_parallel=True, recompute="none")
    h, a, g, d, f, t = 64, 4, 2, 16, 96, 2
    norms = 2 * (2 * h / t + 4 / t)
    gemm = 2 * (2 * h / t + f / t)                   # QKV, FC1 (SP shards), FC2 inputs
    attn = 2 * (a * d + 2 * g * d + a * d) / t + 4 * a / t
    swiglu = 2 * 3 * f / t
    assert layer_activation_bytes_per_token(arch, lay) == pytest.approx(norms + gemm + attn + swiglu)
    assert layer_activation_bytes_per_token(arch, dataclasses.replace(lay, recompute="full")) == 2 * h / t
    sel = layer_activation_bytes_per_token(arch, dataclasses.replace(lay, recompute="selective"))
    assert sel == pytest.approx(norms + gemm + attn + swiglu - 4 * a / t)
    # no SP: the norm and QKV/FC1 inputs are replicated over TP
    nosp = layer_activation_bytes_per_token(arch, dataclasses.replace(lay, sequence_parallel=False))
    assert nosp - (norms + gemm + attn + swiglu) == pytest.approx(2 * h + 4 + 2 * h)


def test_pipeline_in_flight_microbatches():
    arch = _arch(qwen2_config(num_hidden_layers=4))
    lay = Layout(pp=4, micro_batch_tokens=100)
    per = layer_activation_bytes_per_token(arch, lay)
    for r in range(4):
        act = activation_bytes(arch, lay, r)
        assert act["in_flight"] == 4 - r
        assert act["stored"] == pytest.approx((4 - r) * 1 * 100 * per)
    assert activation_bytes(arch, dataclasses.replace(lay, num_microbatches=2), 0)["in_flight"] == 2


def test_max_micro_batch_is_largest_fitting_multiple_by_brute_force():
    arch = Architecture.from_hf(KNOWN_MODELS["qwen2.5-math-7b"])
    lay = Layout(tp=2, dp=4, gpu_mem_gib=80, margin_gib=6)
    best = max_micro_batch_tokens(arch, lay)
    usable = 74 * 1024 ** 3

    def total(tokens):
        return plan_stage(arch, dataclasses.replace(lay, micro_batch_tokens=tokens), 0)["total"]

    brute = max(t for t in range(256, 65536, 256) if total(t) <= usable)
    assert best == brute
    tiny_gpu = dataclasses.replace(lay, gpu_mem_gib=10)
    assert max_micro_batch_tokens(arch, tiny_gpu) == 0 and not plan(arch, tiny_gpu)["fits"]


def test_bad_layouts_are_clear_errors():
    arch = Architecture.from_hf(KNOWN_MODELS["qwen2.5-72b"])
    with pytest.raises(ConfigError, match="--tp 3 does not divide"):
        plan(arch, Layout(tp=3))
    with pytest.raises(ConfigError, match="--pp 3 does not divide the model's 80 layers"):
        plan(arch, Layout(pp=3))
    with pytest.raises(ConfigError, match="recompute"):
        plan(arch, Layout(recompute="some"))


def test_cli_model_table_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["--model", "qwen2.5-72b", "--tp", "8", "--pp", "4", "--dp", "2", "--recompute", "full",
                 "--micro-batch-tokens", "16384", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TP=8 PP=4 DP=2" in text and "stage 3" in text and "largest micro-batch" in text
    data = json.loads(out.read_text())
    assert len(data["stages"]) == 4 and data["layout"]["recompute"] == "full"
    # the 72B shard: 72.7e9 / 32 ~ 2.27e9 parameters per GPU, about 39 GiB in all at T = 16k
    assert 2.1e9 < data["stages"][1]["params"] < 2.4e9


def test_cli_hf_config_and_errors(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(qwen2_config().to_dict()))
    assert main(["--hf-config", str(d / "config.json"), "--tp", "2", "--micro-batch-tokens", "512"]) == 0
    assert main(["--model", "gpt-5"]) == 2
    assert "unknown --model 'gpt-5'" in capsys.readouterr().err
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    assert main(["--hf-config", str(d)]) == 2
    assert "missing key 'num_hidden_layers'" in capsys.readouterr().err


def test_cli_reads_a_run_config(tmp_path, capsys):
    import yaml

    raw = {"model": {"hf_path": "/nonexistent/Qwen2.5-72B", "recompute_granularity": "full"},
           "parallel": {"tensor": 8, "pipeline": 4, "sequence_parallel": True},
           "train": {"micro_batch_tokens": 12288}, "algorithm": {"name": "grpo"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path), "--dp", "2"]) == 0
    text = capsys.readouterr().out
    assert "qwen2.5-72b TP=8 PP=4 DP=2" in text and "SP=on" in text and "recompute=full T=12288" in text
    assert re.search(r"^ema(\s+0\.00){4}$", text, re.M)         # GRPO: no EMA on any of the 4 stages
    assert main(["--config", str(path), "--dp", "2", "--pp", "2", "--no-sequence-parallel"]) == 0
    assert "TP=8 PP=2 DP=2" in capsys.readouterr().out
    raw["model"]["hf_path"] = "/nonexistent/some-model"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path)]) == 2
    assert "matches no built-in model" in capsys.readouterr().err
    assert main(["--config", os.path.join(ROOT, "configs", "qwen2.5-72b-popo.yaml"), "--dp", "2"]) == 0


def test_cli_prints_each_shipped_configs_placement(capsys):
    """DP comes from the placement; the node lines are written out by hand from the shipped YAMLs."""
    assert main(["--config", os.path.join(ROOT, "configs", "qwen2.5-32b-popo.yaml")]) == 0
    text = capsys.readouterr().out
    assert "qwen2.5-32b TP=4 PP=2 DP=4" in text
    assert "placement disaggregated: 8 node(s) x 8 GPUs; trainer TP=4 PP=2 DP=4 on 32 GPUs; 8 server(s) x TP 4" in text
    for n in range(8):
        assert f"  node {n}: trainer GPUs 0-3 | server {n}: GPUs 4-7 (base-gpu-id 4)\n" in text
    assert "on GPUs of its own" in text
    assert main(["--config", os.path.join(ROOT, "configs", "qwen2.5-72b-popo.yaml")]) == 0
    text = capsys.readouterr().out
    assert "qwen2.5-72b TP=8 PP=4 DP=2" in text and "--enable-memory-saver" in text
    for n in range(8):
        assert f"  node {n}: trainer GPUs 0-7 | server {n}: GPUs 0-7 (base-gpu-id 0)\n" in text
    # colocated: the server's share is mem_fraction x (80 GiB - the trainer's static state)
    static = float(re.search(r"beside ([\d.]+) GiB of trainer state", text).group(1))
    share = float(re.search(r"servers: ([\d.]+) GiB per GPU \(mem_fraction 0.6", text).group(1))
    assert share == pytest.approx(0.6 * (80 - static), abs=0.02)
    assert main(["--config", os.path.join(ROOT, "configs", "qwen2.5-math-7b-popo.yaml")]) == 0
    text = capsys.readouterr().out
    assert "TP=2 PP=1 DP=2" in text
    assert "  node 0: trainer GPUs 0-3 | server 0: GPUs 4 (base-gpu-id 4) | server 1: GPUs 5 (base-gpu-id 5) | " \
           "server 2: GPUs 6 (base-gpu-id 6) | server 3: GPUs 7 (base-gpu-id 7)\n" in text


def test_cli_placement_left_to_the_launch(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"hf_path": "/nonexistent/Qwen2.5-Math-7B"},
                                    "parallel": {"tensor": 2}, "rollout": {"num_servers": 2}}))
    assert main(["--config", str(path)]) == 0
    assert "placement: decided at launch" in capsys.readouterr().out
    assert main(["--config", str(path), "--nodes", "2", "--gpus-per-node", "4"]) == 2  # 2 nodes: loopback host
    assert "key 'rollout.host' = '127.0.0.1'" in capsys.readouterr().err
    assert main(["--config", str(path), "--nodes", "1", "--gpus-per-node", "4"]) == 0
    text = capsys.readouterr().out
    # one node of 4: servers on GPUs 2 and 3 leave 2 GPUs = one TP=2 group
    assert "TP=2 PP=1 DP=1" in text and "  node 0: trainer GPUs 0-1 | server 0: GPUs 2 (base-gpu-id 2) | " \
                                         "server 1: GPUs 3 (base-gpu-id 3)\n" in text


# ------------------------------------------------------------------------------------------ mixture of experts

def test_moe_params_equal_transformers_model_plus_vocab_padding():
    """Tiny Qwen3-MoE (tests/tiny_models.py): the TP=1 / EP=1 total equals transformers' own model of the
    same config (router, fused experts, QK-norms) plus the padded vocabulary rows, and the expert part
    equals the parameters transformers keeps under ``.experts.``."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import qwen3_moe_config

    cfg = qwen3_moe_config(num_experts=8)
    hf = AutoModelForCausalLM.from_config(cfg)
    arch = _arch(cfg)
    p = stage_params(arch, tp=1, pp=1, pp_rank=0, divisible_by=128)
    assert p["total"] == sum(t.numel() for t in hf.parameters()) + 2 * (256 - 251) * 64
    assert p["experts"] == sum(t.numel() for n, t in hf.named_parameters() if ".experts." in n)
    assert p["experts"] == 2 * 8 * 3 * 64 * 48                  # layers x experts x (gate, up, down) x h x F_e


@pytest.mark.parametrize("name,published", [("qwen3-30b-a3b", 30_532_122_624), ("qwen3-235b-a22b", 235_093_634_560)])
def test_moe_builtin_models_match_published_sizes(name, published):
    """Unpadded TP=1 totals = the parameter counts keras-hub publishes for the same checkpoints
    (keras-team/keras-hub, keras_hub/src/models/qwen3_moe/qwen3_moe_presets.py, checked there against
    transformers' num_parameters)."""
    arch = Architecture.from_hf(KNOWN_MODELS[name])
    assert stage_params(arch, 1, 1, 0, divisible_by=1)["total"] == published


def test_moe_shards_over_ep_and_tp():
    """Qwen3-30B-A3B by hand: 128 experts x 3 matrices of 2048 x 768 per layer, split over EP (whole
    experts) and TP (each matrix); the router [128, 2048] and the norms are replicated; the attention
    is split over TP only."""
    arch = Architecture.from_hf(KNOWN_MODELS["qwen3-30b-a3b"])
    h, fe, E, L = 2048, 768, 128, 48
    attention = (32 + 2 * 4) * 128 * h + h * 32 * 128
    for tp, ep in ((1, 1), (2, 8), (1, 16), (4, 2)):
        p = stage_params(arch, tp, 1, 0, divisible_by=1, ep=ep)
        assert p["experts"] == L * (E // ep) * 3 * h * fe // tp
        vocab = 151936 // tp
        assert p["total"] == p["experts"] + L * (attention // tp + E * h + 2 * h + 2 * 128) + 2 * vocab * h + h
    # the EP x TP shards of the experts add up to every expert once
    assert 8 * 2 * stage_params(arch, 2, 1, 0, 1, ep=8)["experts"] == stage_params(arch, 1, 1, 0, 1)["experts"]


def test_moe_optimizer_state_sharded_over_expert_data_parallel():
    """megatron's distributed optimizer shards expert parameters over the expert-data-parallel group
    (DP / EP ranks) and the others over DP: 12 bytes (fp32 main + Adam m, v) per parameter of each."""
    from tests.tiny_models import qwen3_moe_config

    arch = _arch(qwen3_moe_config(num_experts=8))
    lay = Layout(tp=1, dp=4, ep=2, micro_batch_tokens=256, predictor_hidden=32)
    p = stage_params(arch, 1, 1, 0, ep=2)
    experts = 2 * 4 * 3 * 64 * 48                               # 4 of the 8 experts on this rank
    assert p["experts"] == experts
    q = predictor_params(64, 32, 2)
    t = plan_stage(arch, lay, 0)["terms"]
    assert t["optimizer"] == pytest.approx(12 * (p["total"] - experts + q) / 4 + 12 * experts / 2)
    assert t["weights"] == 2 * p["total"] and t["grads"] == t["ema"] == 4 * p["total"]
    no_dist = plan_stage(arch, dataclasses.replace(lay, distributed_optimizer=False), 0)["terms"]
    assert no_dist["optimizer"] == 12 * (p["total"] + q)


def test_moe_activation_formula_by_hand_te():
    """h=64, a=4, g=2, d=32, E=8, k=2, F_e=48, bf16, TP=2 with SP: the attention block as a dense layer's
    (with Qwen3's QK-norm), the MLP replaced by the router's per-token tensors and k routed copies."""
    from tests.tiny_models import qwen3_moe_config

    arch = _arch(qwen3_moe_config(num_experts=8))
    lay = Layout(tp=2, sequence_parallel=True, recompute="none")
    h, a, g, d, E, k, fe, t = 64, 4, 2, 32, 8, 2, 48, 2
    norms = 2 * (2 * h / t + 4 / t)
    gemm = 2 * 2 * h / t                                       # QKV and router/permute inputs (SP shards)
    attn = 2 * (2 * a * d + 2 * g * d) / t + 4 * a / t
    qk_norm = (2 * d + 4) * (a + g) / t
    router = ((4 + 2 + 1) * E + 20 * k) / t
    routed = k * (2 * h + 2 * 4 * fe / t + 2 * fe / t + 2)
    assert layer_activation_bytes_per_token(arch, lay) == pytest.approx(norms + gemm + attn + qk_norm + router + routed)
    heavy = layer_activation_bytes_per_token(arch, dataclasses.replace(lay, expert_load=1.5))
    assert heavy - layer_activation_bytes_per_token(arch, lay) == pytest.approx(0.5 * routed)
    full = plan_stage(arch, dataclasses.replace(lay, recompute="full", micro_batch_tokens=1024), 0)
    assert full["activation_detail"]["per_layer_per_token"] == 2 * h / t


def test_moe_layout_errors_name_the_flag():
    moe = Architecture.from_hf(KNOWN_MODELS["qwen3-30b-a3b"])
    with pytest.raises(ConfigError, match="--ep 3 does not divide the model's 128 experts"):
        plan(moe, Layout(dp=3, ep=3))
    with pytest.raises(ConfigError, match="--ep 4 does not divide --dp 2"):
        plan(moe, Layout(dp=2, ep=4))
    with pytest.raises(ConfigError, match="needs sequence parallelism"):
        plan(moe, Layout(tp=2, sequence_parallel=False))
    with pytest.raises(ConfigError, match="--ep 2 needs a mixture-of-experts model"):
        plan(Architecture.from_hf(KNOWN_MODELS["qwen3-8b"]), Layout(dp=2, ep=2))


@pytest.mark.parametrize("name,model,world", [("qwen3-30b-a3b-popo.yaml", "qwen3-30b-a3b", 8),
                                              ("qwen3-235b-a22b-popo.yaml", "qwen3-235b-a22b", 64)])
def test_shipped_moe_configs_fit_80gb_and_check_layout_agrees(name, model, world, capsys, tmp_path):
    """popo-plan takes each shipped MoE config's layout (parallel.expert included, and its optimizer
    offload) and finds it fits an 80 GB H100 with the 6 GiB margin on the GPU count issue 13 named;
    check_layout accepts the same layout for the real model at that trainer world size. Expert
    parameters per GPU by hand: layers / PP x experts / EP x 3 x h x F_e / TP from the HF config numbers.
    Without the offload, no layout of that many GPUs fits."""
    import yaml

    from popo_mega.config import check_layout, load_config

    path = os.path.join(ROOT, "configs", name)
    raw = yaml.safe_load(open(path))
    hf = KNOWN_MODELS[model]
    tp, pp, ep = raw["parallel"]["tensor"], raw["parallel"]["pipeline"], raw["parallel"]["expert"]
    assert ep > 1 and raw["placement"]["nodes"] * raw["placement"]["gpus_per_node"] == world
    assert raw["train"]["optimizer_cpu_offload"] is True
    check_layout(load_config(path), world, hf)
    out = str(tmp_path / "plan.json")
    assert main(["--config", path, "--json", out]) == 0
    text = capsys.readouterr().out
    dp = world // (tp * pp)
    assert f"TP={tp} PP={pp} DP={dp} EP={ep}" in text and "-> fits" in text
    data = json.load(open(out))
    assert data["fits"] and data["total"] <= (80 - 6) * 1024 ** 3
    experts = (hf["num_hidden_layers"] // pp) * (hf["num_experts"] // ep) * 3 * hf["hidden_size"] \
        * hf["moe_intermediate_size"] // tp
    for stage in data["stages"]:
        assert stage["params_detail"]["experts"] == experts
    assert data["layout"]["optimizer_offload_fraction"] == raw["train"]["optimizer_offload_fraction"]
    # without offload, the same model on the same GPU count fits in no layout popo-plan accepts
    small = world
    for t in (1, 2, 4):
        for p in (1, 2):
            for e in (1, 2, 4, 8, 16, 32, 64):
                d = small // (t * p)
                if small % (t * p) or d % e or hf["num_hidden_layers"] % p:
                    continue
                res = plan(Architecture.from_hf(hf), Layout(tp=t, pp=p, dp=d, ep=e, recompute="full",
                                                           micro_batch_tokens=16384))
                assert not res["fits"], (t, p, e)


def test_served_ema_is_a_sync_transient_of_one_gathered_tensor_for_popo_only():
    """train/served_model.py is a view since edf933c: nothing resident; the sync casts one tensor at a time,
    the largest the [V_pad, h] embedding: its cast TP shard + the gathered shards + their concatenation.
    Not in the static sum; the peak is static + the largest of the training, target and sync transients.
    Nothing for GRPO/A3PO, which keep no EMA."""
    arch = _arch(qwen2_config())                       # vocab 251, h 64
    for tp, v_pad in ((1, 256), (2, 256)):             # 251 -> a multiple of 128 x tp
        lay = Layout(tp=tp, dp=2 // tp, micro_batch_tokens=256, predictor_hidden=32)
        st = plan_stage(arch, lay, 0)
        t = st["terms"]
        assert t["served_ema"] == pytest.approx(2 * v_pad * 64 * (2 + 1 / tp))
        assert st["static"] == pytest.approx(sum(t[k] for k in ("weights", "grads", "optimizer", "ema",
                                                                "predictor", "fp8_cache")))
        assert st["sync_transient"] == t["served_ema"]
        assert st["total"] == pytest.approx(st["static"] + max(st["train_transient"], st["target_transient"],
                                                                 t["served_ema"]))
    assert plan_stage(arch, dataclasses.replace(lay, popo=False), 0)["terms"]["served_ema"] == 0


def test_optimizer_offload_moves_main_params_and_adam_to_the_host_by_hand():
    """train.optimizer_cpu_offload at fraction f (megatron's HybridDeviceOptimizer with the precision-aware
    distributed optimizer): (1 - f) of the 12 bytes per optimizer element stay on the GPU; the host holds
    f x (12 + 4: the pinned fp32 grad copy) per element. Elements: (N + P) / DP for a bf16 dense model."""
    arch = _arch(qwen2_config())
    n = stage_params(arch, 1, 1, 0)["total"]
    q = predictor_params(64, 32, 2)
    base = Layout(tp=1, pp=1, dp=4, micro_batch_tokens=256, predictor_hidden=32)
    for f in (0.0, 0.25, 1.0):
        st = plan_stage(arch, dataclasses.replace(base, optimizer_offload_fraction=f), 0)
        assert st["terms"]["optimizer"] == pytest.approx((1 - f) * 12 * (n + q) / 4)
        assert st["host_optimizer"] == pytest.approx(f * 16 * (n + q) / 4)
        assert st["terms"]["grads"] == 4 * n and st["terms"]["weights"] == 2 * n   # stay on the GPU
    res = plan(arch, dataclasses.replace(base, optimizer_offload_fraction=0.5, gpus_per_node=4))
    assert res["host_optimizer_per_node"] == pytest.approx(4 * 0.5 * 16 * (n + q) / 4)
    with pytest.raises(ConfigError, match="optimizer_offload_fraction must be in"):
        plan(arch, dataclasses.replace(base, optimizer_offload_fraction=1.5))
    with pytest.raises(ConfigError, match="needs the distributed optimizer"):
        plan(arch, dataclasses.replace(base, optimizer_offload_fraction=0.5, distributed_optimizer=False))


def test_cli_reads_offload_from_a_run_config_and_the_flag(tmp_path, capsys):
    import yaml

    raw = yaml.safe_load(open(os.path.join(ROOT, "configs", "qwen3-30b-a3b-popo.yaml")))
    raw.setdefault("train", {}).update(optimizer_cpu_offload=True, optimizer_offload_fraction=0.5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = str(tmp_path / "plan.json")
    assert main(["--config", str(path), "--json", out]) == 0
    data = json.load(open(out))
    assert data["layout"]["optimizer_offload_fraction"] == 0.5 and data["host_optimizer_per_node"] > 0
    assert "offload=0.5" in capsys.readouterr().out
    raw["train"]["optimizer_cpu_offload"] = False          # the fraction alone does not offload
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path), "--json", out]) == 0
    assert json.load(open(out))["layout"]["optimizer_offload_fraction"] == 0
    assert main(["--config", str(path), "--optimizer-cpu-offload", "--json", out]) == 0
    assert json.load(open(out))["layout"]["optimizer_offload_fraction"] == 1.0
