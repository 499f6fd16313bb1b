"""Numeric config keys outside their range are ConfigErrors at load, naming the key and the file
(issue 15, item 11). CPU, no model; a few seconds.

Before: train.lr=-1, train.steps=-1 and rollout.group_size=0 failed only after the model was built
and the servers launched, with tracebacks naming no key, leaving a run directory;
data.prompts_per_step=0 ran two empty steps with reward NaN and exited 0; POPO with group_size 1 ran.
"""

import glob
import os

import pytest
import yaml

from popo_mega.config import ConfigError, load_config
from popo_mega.data.paths import REPO_ROOT

QUICKSTART = os.path.join(REPO_ROOT, "configs", "quickstart_cpu.yaml")


@pytest.mark.parametrize("override,key", [
    ("train.lr=-1", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.steps=-1", "train.steps"),
    ("rollout.group_size=0", "rollout.group_size"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("data.prompts_per_step=0", "data.prompts_per_step"),
    ("algorithm.popo.tau=1.5", "algorithm.popo.tau"),
    ("algorithm.popo.tau=-0.1", "algorithm.popo.tau"),
    ("rollout.temperature=-0.1", "rollout.temperature"),
    ("rollout.temperature=.nan", "rollout.temperature"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.01", "rollout.top_p"),
    ("algorithm.eps_low=-0.1", "algorithm.eps_low"),
    ("algorithm.eps_high=-0.1", "algorithm.eps_high"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("train.save_interval=-1", "train.save_interval"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.log_interval=0", "train.log_interval"),
    ("train.micro_batch_tokens=0", "train.micro_batch_tokens"),
    ("train.adam_beta2=1.0", "train.adam_beta2"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.min_lr=1.0", "train.min_lr"),                    # above train.lr
    ("train.optimizer_offload_fraction=1.5", "train.optimizer_offload_fraction"),
    ("algorithm.popo.weight_temperature=0", "algorithm.popo.weight_temperature"),
    ("algorithm.popo.noise_std=-0.01", "algorithm.popo.noise_std"),
    ("algorithm.a3po.ratio=1.5", "algorithm.a3po.ratio"),
    ("eval.temperature=.nan", "eval.temperature"),
    ("data.synthetic.max_operand=0", "data.synthetic"),
    ("data.synthetic.ops=[x]", "data.synthetic"),
])
def test_out_of_range_value_names_key_and_file(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and QUICKSTART in msg, msg


@pytest.mark.parametrize("name", ["popo", "grpo", "a3po"])
def test_every_group_relative_algorithm_needs_two_rollouts_per_group(name):
    with pytest.raises(ConfigError, match=r"'rollout\.group_size' must be >= 2"):
        load_config(QUICKSTART, [f"algorithm.name={name}", "rollout.group_size=1"])
    assert load_config(QUICKSTART, [f"algorithm.name={name}", "rollout.group_size=2"]).rollout.group_size == 2


@pytest.mark.parametrize("override", ["train.steps=0", "rollout.temperature=0", "rollout.top_p=1.0",
                                      "algorithm.popo.tau=1.0", "algorithm.popo.tau=0", "train.save_interval=0",
                                      "train.grad_clip=0", "algorithm.eps_low=0", "algorithm.popo.beta=-0.01"])
def test_boundary_values_that_mean_something_are_accepted(override):
    load_config(QUICKSTART, [override])


def test_shipped_configs_are_in_range():
    paths = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.yaml")))
    assert len(paths) >= 10
    for p in paths:
        load_config(p)


def test_error_from_the_yaml_file_names_that_file(tmp_path):
    raw = yaml.safe_load(open(QUICKSTART))
    raw["train"]["lr"] = -1
    path = tmp_path / "bad_lr.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{path}: key 'train\.lr' must be > 0.*got -1"):
        load_config(path)


@pytest.mark.parametrize("override,key", [("train.lr=-1", "train.lr"), ("rollout.group_size=0", "rollout.group_size"),
                                          ("data.prompts_per_step=0", "data.prompts_per_step")])
def test_popo_train_stops_before_building_anything(tmp_path, monkeypatch, capsys, override, key):
    """popo-train's entry point with a bad value: exit 2, the key on stderr, no run directory, and the
    training loop (which builds the model and launches the servers) never called."""
    from popo_mega import cli
    from popo_mega.train import loop

    called = []
    monkeypatch.setattr(loop, "run", lambda cfg: called.append(cfg))
    out = tmp_path / "run"
    rc = cli.train_main(["--config", QUICKSTART, f"train.output_dir={out}", override])
    err = capsys.readouterr().err
    assert rc == 2 and f"'{key}'" in err and "Traceback" not in err, err
    assert called == [] and not out.exists()
