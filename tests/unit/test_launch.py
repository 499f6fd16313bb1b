"""Bad inputs to the launch script and to popo-train fail fast with a message naming the problem."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_sh_usage_and_missing_config():
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "train.sh")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage: bash launch/train.sh CONFIG.yaml" in r.stderr
    r = subprocess.run(["bash", os.path.join(REPO, "launch", "train.sh"), "/nonexistent/run.yaml"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "config file not found: /nonexistent/run.yaml" in r.stderr


def test_popo_train_config_errors_name_key_and_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    r = subprocess.run([sys.executable, "-m", "popo_mega.train.cli", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert f"{cfg}: unknown key 'train.stepz' (did you mean 'train.steps'?)" in r.stderr
    r = subprocess.run([sys.executable, "-m", "popo_mega.train.cli", "--config", str(cfg), "train.steps=x"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "command-line override 'train.steps=x'" in r.stderr
