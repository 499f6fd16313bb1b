"""Architecture parsing, layer-spec selection and FP8 plumbing (no distributed state needed)."""

import pytest
import torch

from popo_mega.config import ConfigError, ModelConfig
from popo_mega.model.builder import Architecture, padded_vocab_size, transformer_config, use_transformer_engine
from tests.tiny_models import llama3_config, qwen2_config


def test_padded_vocab_matches_megatron_rule():
    # Qwen2.5: 151,936 at TP=8 -> next multiple of 128*8=1024 is 149*1024.
    assert padded_vocab_size(151936, 128, 8) == 149 * 1024 == 152576
    assert padded_vocab_size(152064, 128, 1) == 152064  # already a multiple of 128 (1188 * 128)
    assert padded_vocab_size(251, 128, 2) == 256


def test_architecture_from_qwen2_and_llama_configs():
    q = Architecture.from_hf(qwen2_config().to_dict())
    assert (q.model_type, q.qkv_bias, q.tie_embeddings, q.num_kv_heads, q.head_dim) == ("qwen2", True, False, 2, 16)
    assert q.rope_theta == 1e6 and q.rope_scaling_factor is None and q.norm_eps == 1e-6
    ll = Architecture.from_hf(llama3_config().to_dict())
    assert (ll.qkv_bias, ll.tie_embeddings, ll.rope_scaling_factor, ll.rope_theta) == (False, True, 32.0, 5e5)
    # The pre-transformers-5 spelling of released checkpoints (rope_theta / rope_scaling) is read too.
    legacy = {k: v for k, v in qwen2_config().to_dict().items() if k != "rope_parameters"}
    legacy["rope_theta"] = 12345.0
    assert Architecture.from_hf(legacy).rope_theta == 12345.0


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
])
def test_unsupported_configs_are_named(change, message):
    hf = qwen2_config().to_dict()
    hf.update(change)
    with pytest.raises(ConfigError, match=message) as e:
        Architecture.from_hf(hf, source="/ckpt/config.json")
    assert "/ckpt/config.json" in str(e.value)


def test_layer_spec_selection_and_fp8_errors():
    assert use_transformer_engine(ModelConfig(), te_available=True) is True
    assert use_transformer_engine(ModelConfig(), te_available=False) is False
    assert use_transformer_engine(ModelConfig(transformer_impl="local"), te_available=True) is False
    with pytest.raises(ConfigError, match="model.fp8.*needs Transformer Engine"):
        use_transformer_engine(ModelConfig(fp8="hybrid"), te_available=False)
    with pytest.raises(ConfigError, match="model.fp8"):
        use_transformer_engine(ModelConfig(fp8="e4m3", transformer_impl="local"), te_available=True)
    with pytest.raises(ConfigError, match="transformer_engine was asked for"):
        use_transformer_engine(ModelConfig(transformer_impl="transformer_engine"), te_available=False)
    assert use_transformer_engine(ModelConfig(fp8="hybrid"), te_available=True) is True


def test_transformer_config_carries_the_hf_facts_and_fp8_settings():
    arch = Architecture.from_hf(qwen2_config().to_dict())
    cfg = ModelConfig(dtype="bfloat16", fp8="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=16,
                      fp8_amax_compute_algo="most_recent")
    tc = transformer_config(arch, cfg, tp=1, pp=1, use_te=True, use_cpu_init=True)
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (2, 64, 4, 2)
    assert (tc.kv_channels, tc.ffn_hidden_size, tc.layernorm_epsilon) == (16, 96, 1e-6)
    assert tc.add_qkv_bias and not tc.add_bias_linear and tc.gated_linear_unit and tc.normalization == "RMSNorm"
    assert tc.bf16 and tc.params_dtype == torch.bfloat16
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == \
        ("hybrid", "tensorwise", 16, "most_recent")
    plain = transformer_config(arch, ModelConfig(dtype="float32"), use_cpu_init=True)
    assert plain.fp8 is None and not plain.bf16 and plain.params_dtype == torch.float32
