"""popo-train evaluates eval.benchmarks during training (issue 11): a 3-step run of the micro task with
eval.interval=2 logs gsm8k (graded by math-verify) and the synthetic held-out split at step 2 (the
interval) and step 3 (the end), not at step 1, and its report draws a panel per benchmark. CPU; one
popo-train process of a few seconds of compute (the base is conftest.py's)."""

import json
import shutil
import subprocess

import pytest

from tests.e2e.runs import REPO, read_metrics, train_args

EVAL = ["eval.benchmarks=[gsm8k, synthetic]", "eval.limit=2", "eval.n=2", "eval.max_new_tokens=6",
        "eval.temperature=1.0", "train.save_interval=0"]


@pytest.fixture
def long_base(base, tmp_path):
    """The base with a context long enough for GSM8K's prompts in its character tokenizer (up to
    ~1,000 tokens): the embedded server refuses a prompt longer than the context, as SGLang does.
    RoPE has no position weights, so only config.json changes."""
    out = tmp_path / "long_base"
    shutil.copytree(base, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 2048
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_benchmarks_are_logged_at_the_interval_and_the_end(long_base, tmp_path):
    run_dir = str(tmp_path / "run")
    r = subprocess.run(train_args(long_base, run_dir, 3, EVAL), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    keys = {f"eval/{b}/{m}" for b in ("gsm8k", "synthetic")
            for m in ("avg@2", "pass@2", "response_length", "truncated_fraction")}
    assert not keys & set(rows[0]), "evaluated at step 1 (eval.interval=2)"
    for row in rows[1:]:
        assert keys <= set(row), sorted(set(row))
        for b in ("gsm8k", "synthetic"):
            avg, best = row[f"eval/{b}/avg@2"], row[f"eval/{b}/pass@2"]
            # 2 problems x 2 samples: avg@2 is a multiple of 1/4, pass@2 of 1/2, and pass@2 >= avg@2
            assert avg * 4 == int(avg * 4) and best * 2 == int(best * 2) and 0.0 <= avg <= best <= 1.0
            assert 0.0 <= row[f"eval/{b}/response_length"] <= 6.0  # eval.max_new_tokens=6
        assert row["eval_s"] > 0.0
    # The quickstart evaluates the online policy (eval.model policy) while the engine serves the EMA.
    assert "step 2: evaluating the online policy on gsm8k (2), synthetic (2) x 2 samples" in r.stdout
    assert "step 3 eval gsm8k: avg@2 " in r.stdout

    from popo_mega.train.report import benchmark_panels

    assert benchmark_panels(rows) == ["eval/gsm8k", "eval/synthetic"]
    # The run's report.png: heldout_accuracy, reward, positive_rate, entropy, similarity,
    # response_length and the two benchmark panels = 8 panels, 2 x 4 of 600 x 350 px.
    from tests.unit.test_report import png_size

    assert png_size(f"{run_dir}/report.png") == (1200, 1400)
