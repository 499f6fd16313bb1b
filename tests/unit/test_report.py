"""popo-report (popo_mega/train/report.py): PNG of several runs with different metric sets, its
pixel size from the documented layout, clear errors, smoothing worked out by hand. CPU."""

import json
import math
import struct

import numpy as np
import pytest

from popo_mega.train.report import benchmark_panels, main, panel_keys, smooth_series, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    """(width, height) from the IHDR chunk, read by hand."""
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def write_run(run_dir, records):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    # POPO-like run: reward, positive_rate, similarity. GRPO-like run: reward, positive_rate, entropy.
    a = write_run(tmp_path / "popo", [
        {"step": s, "elapsed_s": 2.0 * s, "reward": s / 10, "positive_rate": s / 20,
         "similarity": -0.5 + s / 100} for s in range(1, 11)])
    b = write_run(tmp_path / "grpo", [
        {"step": s, "elapsed_s": 3.0 * s, "reward": 1 - s / 10, "positive_rate": 0.5,
         "entropy": 2.0 - s / 10} for s in range(1, 11)])
    return a, b


def colour_present(png, hex_rgb):
    import matplotlib.image as mpimg

    img = mpimg.imread(png)[..., :3]
    rgb = np.array([int(hex_rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)], dtype=np.float32)
    return bool((np.abs(img - rgb).max(axis=-1) < 0.02).any())


def test_report_two_runs_different_metric_sets(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = write_report([a, b], tmp_path / "out" / "cmp.png",
                       metrics=["reward", "similarity", "entropy"], smooth=3)
    assert out == str(tmp_path / "out" / "cmp.png")
    # 3 panels -> 2 columns x 2 rows of 6 x 3.5 in at 100 dpi.
    assert png_size(out) == (1200, 700)
    err = capsys.readouterr().err
    assert "run grpo has no 'similarity'" in err and "run popo has no 'entropy'" in err
    # Both runs' curves are drawn: matplotlib's first two cycle colours appear in the image.
    assert colour_present(out, "#1f77b4") and colour_present(out, "#ff7f0e")


def test_metric_absent_everywhere_is_an_error(two_runs, tmp_path):
    with pytest.raises(ValueError, match="heldout_accuracy.*found in none of the runs"):
        write_report(list(two_runs), tmp_path / "x.png", metrics=["reward", "heldout_accuracy"])
    assert not (tmp_path / "x.png").exists()


def test_default_metrics_drop_missing_ones(two_runs, tmp_path, capsys):
    # Defaults: heldout_accuracy, reward, positive_rate, entropy, similarity, response_length; no run
    # has the first or the last.
    out = write_report(list(two_runs), tmp_path / "d.png")
    assert "no run has 'response_length'" in capsys.readouterr().err
    assert png_size(out) == (1200, 700)  # 4 panels: 2 x 2


def test_cli(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main([str(a), "--metrics", "reward", "--x", "time"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(a / "report.png") and png_size(printed) == (600, 350)
    out = tmp_path / "r.png"
    assert main([str(a), str(b), "--out", str(out), "--metrics", "reward", "positive_rate",
                 "--smooth", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out) and png_size(out) == (1200, 350)
    assert main([str(a), "--metrics", "kl_ema"]) == 2
    assert "kl_ema" in capsys.readouterr().err
    assert main([str(tmp_path / "missing_run")]) == 2
    assert "missing_run" in capsys.readouterr().err


@pytest.fixture
def eval_run(tmp_path):
    """A run that evaluated gsm8k at steps 2 and 4 and math500 at step 4 (benchmark_eval.py's keys)."""
    recs = [{"step": s, "reward": s / 10} for s in range(1, 5)]
    for r, avg, best in ((recs[1], 0.25, 0.5), (recs[3], 0.5, 0.75)):
        r.update({"eval/gsm8k/avg@2": avg, "eval/gsm8k/pass@2": best, "eval/gsm8k/response_length": 80.0,
                  "eval_s": 3.0})
    recs[3].update({"eval/math500/avg@16": 0.1, "eval/math500/pass@16": 0.4, "eval/math500/pass@2": 0.2})
    return write_run(tmp_path / "evalrun", recs)


def test_default_report_draws_a_panel_per_benchmark(eval_run, tmp_path):
    from popo_mega.train.metrics import read_metrics

    recs = read_metrics(eval_run)
    assert benchmark_panels(recs) == ["eval/gsm8k", "eval/math500"]  # not eval_s, not .../response_length
    # avg@n first, then pass@k by k as a number (pass@16 after pass@2)
    assert panel_keys("eval/math500", recs) == ["eval/math500/avg@16", "eval/math500/pass@2", "eval/math500/pass@16"]
    assert panel_keys("reward", recs) == ["reward"] and panel_keys("eval/aime2025", recs) == []
    out = write_report([eval_run], tmp_path / "e.png")
    assert png_size(out) == (1200, 700)  # reward + 2 benchmark panels: 2 x 2
    # The gsm8k panel's second curve (pass@2) takes matplotlib's second cycle colour; the reward
    # panel has one curve (the first colour) only.
    assert colour_present(out, "#ff7f0e")
    one = write_report([eval_run], tmp_path / "g.png", metrics=["eval/gsm8k"])
    assert png_size(one) == (600, 350)
    nothing = write_report([eval_run], tmp_path / "r.png", metrics=["reward"])
    assert not colour_present(nothing, "#ff7f0e")


def test_smooth_series_by_hand():
    nan = math.nan
    assert smooth_series([1.0, nan, 3.0, 5.0], 2) == [1.0, 1.0, 3.0, 4.0]
    assert smooth_series([2.0, 4.0, 9.0], 3) == [2.0, 3.0, 5.0]
    assert smooth_series([1.0, 2.0], 1) == [1.0, 2.0]
    r = smooth_series([nan, 1.0], 1)
    assert math.isnan(r[0]) and r[1] == 1.0
    with pytest.raises(ValueError, match="smooth"):
        smooth_series([1.0], 0)
