"""Config loading: typed sections, overrides, and errors that name the key and the file."""

import json
import os

import pytest
import yaml

from popo_mega.config import Config, ConfigError, check_layout, config_from_dict, load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _hf_dir(tmp_path, heads=4, kv=2, layers=2):
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_attention_heads": heads,
                                               "num_key_value_heads": kv, "num_hidden_layers": layers}))
    return str(d)


def test_yaml_loads_into_frozen_typed_sections(tmp_path):
    path = _write(tmp_path, {"train": {"lr": "1e-6", "steps": 7}, "rollout": {"urls": ["http://a", "http://b"]},
                             "algorithm": {"name": "grpo", "grpo": {"beta_kl": 0.04}}})
    cfg = load_config(path, ["parallel.tensor=2", "algorithm.popo.alpha=0.5"])
    assert isinstance(cfg, Config) and cfg.source == path
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert cfg.train.steps == 7 and cfg.parallel.tensor == 2
    assert cfg.rollout.urls == ("http://a", "http://b")
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.grpo.beta_kl == 0.04 and cfg.algorithm.popo.alpha == 0.5
    assert cfg.algorithm.popo.beta == 0.01  # untouched default
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # frozen


def test_misspelled_key_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, {"train": {"learning_rat": 1.0}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert path in str(e.value) and "'train.learning_rat'" in str(e.value)
    path = _write(tmp_path, {"algorithm": {"popo": {"alpah": 0.2}}}, "b.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'algorithm\.popo\.alpah' \(did you mean 'algorithm\.popo\.alpha'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(_write(tmp_path, {"trian": {}}, "c.yaml"))


@pytest.mark.parametrize("section,key,value,expect", [
    ("train", "steps", 2.5, "expected int"),
    ("train", "steps", True, "expected int"),
    ("train", "lr", "fast", "expected float"),
    ("parallel", "sequence_parallel", "yes", "expected bool"),
    ("algorithm", "name", "ppo", "expected one of"),
    ("rollout", "weights", "both", "expected one of"),
    ("rollout", "urls", 5, "expected a list"),
])
def test_wrong_type_names_key_and_file(tmp_path, section, key, value, expect):
    path = _write(tmp_path, {section: {key: value}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert path in msg and f"'{section}.{key}'" in msg and expect in msg


def test_override_errors_name_the_override(tmp_path):
    path = _write(tmp_path, {})
    with pytest.raises(ConfigError, match=r"command-line override 'train\.stepz=3'.*unknown key 'train\.stepz'"):
        load_config(path, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"override 'parallel\.tensor=two'.*'parallel\.tensor'.*expected int"):
        load_config(path, ["parallel.tensor=two"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["parallel.tensor"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(lst))


def test_impossible_layouts_name_key_and_file(tmp_path):
    hf = _hf_dir(tmp_path, heads=12, kv=4, layers=6)
    path = _write(tmp_path, {"model": {"hf_path": hf}})
    check_layout(load_config(path, ["parallel.tensor=4", "parallel.pipeline=3"]), world_size=24)  # fine
    with pytest.raises(ConfigError) as e:
        check_layout(load_config(path, ["parallel.tensor=8"]))
    assert "'parallel.tensor'" in str(e.value) and "12 attention heads" in str(e.value) and path in str(e.value)
    with pytest.raises(ConfigError, match=r"'parallel\.tensor' = 3 does not divide the model's 4 key/value heads"):
        check_layout(load_config(path, ["parallel.tensor=3"]))
    with pytest.raises(ConfigError, match=r"'parallel\.pipeline' = 4 does not divide the model's 6 layers"):
        check_layout(load_config(path, ["parallel.pipeline=4"]))
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel\.tensor x parallel\.pipeline = 4 x 1"):
        check_layout(load_config(path, ["parallel.tensor=4"]), world_size=6)
    with pytest.raises(ConfigError, match="model.hf_path: no config.json"):
        check_layout(config_from_dict({"model": {"hf_path": str(tmp_path / "nowhere")}}))


def test_sequence_parallel_needs_tensor_parallelism(tmp_path):
    path = _write(tmp_path, {"model": {"hf_path": _hf_dir(tmp_path)}, "parallel": {"sequence_parallel": True}})
    with pytest.raises(ConfigError, match=r"'parallel\.sequence_parallel' needs parallel\.tensor > 1") as e:
        check_layout(load_config(path))
    assert path in str(e.value)
    check_layout(load_config(path, ["parallel.tensor=2"]), world_size=2)  # fine


def test_staleness_is_a_count_of_steps_and_not_for_colocated_servers(tmp_path):
    path = _write(tmp_path, {"rollout": {"max_staleness": 2}, "placement": {"mode": "colocated"}})
    with pytest.raises(ConfigError, match=r"'rollout\.max_staleness' is 2 with placement\.mode colocated") as e:
        load_config(path)
    assert path in str(e.value)
    with pytest.raises(ConfigError, match=r"'rollout\.max_staleness' must be >= 0"):
        load_config(path, ["rollout.max_staleness=-1", "placement.mode=disaggregated"])
    assert load_config(path, ["placement.mode=disaggregated"]).rollout.max_staleness == 2


def test_no_config_value_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("POPO_TRAIN_LR", "0.5")
    monkeypatch.setenv("TRAIN_LR", "0.5")
    assert config_from_dict({}).train.lr == Config().train.lr


def test_every_shipped_config_loads():
    config_dir = os.path.join(REPO, "configs")
    files = [f for f in sorted(os.listdir(config_dir)) if f.endswith(".yaml")] if os.path.isdir(config_dir) else []
    for name in files:
        load_config(os.path.join(config_dir, name))
