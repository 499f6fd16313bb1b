"""``popo-report RUN_DIR [RUN_DIR ...]``: metric curves of one or several runs, as one PNG.

    popo-report runs/popo runs/grpo --out cmp.png --metrics reward positive_rate --smooth 5
    write_report(["runs/popo", "runs/grpo"], "cmp.png", metrics=["reward"], smooth=5)

Reads each run's metrics.jsonl (:func:`popo_mega.train.metrics.read_metrics`) and draws one
subplot per metric, one curve per run, labelled by the run directory's name (its full path when
two runs share a name). Metric names are those of ``popo_mega.train.metrics.CANONICAL_KEYS``;
default: heldout_accuracy, reward, positive_rate, entropy, similarity, response_length, then one
panel per benchmark the runs evaluated during training.

- Benchmark panels (popo_mega/train/benchmark_eval.py): ``eval/<benchmark>`` (as a metric name
  too, e.g. ``--metrics eval/aime2025``) draws that benchmark's ``eval/<benchmark>/avg@n`` and
  ``eval/<benchmark>/pass@k`` curves in one panel, labelled ``<run> avg@n`` / ``<run> pass@k``; a
  single key such as ``eval/aime2025/pass@8`` is an ordinary metric.

- A metric missing from some runs (e.g. ``similarity`` in a GRPO run) is drawn for the others,
  with a note on stderr. A metric asked for explicitly and missing from every run is an error;
  of the default list, metrics missing everywhere are dropped with a note (an error if none is
  left). Records without the metric (``heldout_accuracy`` is logged on eval steps only) are
  skipped point by point.
- ``smooth N``: trailing moving average over the last N logged points of that metric
  (non-finite values are left out of the average, so one NaN does not blank the curve).
- ``x``: ``step``, or ``time`` (the records' ``elapsed_s``, training time in minutes).
- Layout: ``ncols = min(2, n_metrics)``, ``nrows = ceil(n_metrics / ncols)``, each panel
  ``PANEL_W x PANEL_H`` inches at ``DPI``: the PNG is exactly
  ``(ncols * PANEL_W * DPI) x (nrows * PANEL_H * DPI)`` pixels. matplotlib's Agg canvas is used
  directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from popo_mega.train.metrics import CANONICAL_KEYS, read_metrics

DEFAULT_METRICS = ("heldout_accuracy", "reward", "positive_rate", "entropy", "similarity", "response_length")
PANEL_W, PANEL_H, DPI = 6.0, 3.5, 100
EVAL_PREFIX = "eval/"  # eval/<benchmark>/<avg@n | pass@k | ...>, logged by popo_mega/train/benchmark_eval.py


def _benchmark_of(key: str) -> str | None:
    """'eval/aime2025' for 'eval/aime2025/avg@8' or '.../pass@8'; None for any other key."""
    parts = key.split("/")
    if len(parts) == 3 and key.startswith(EVAL_PREFIX) and parts[2].startswith(("avg@", "pass@")):
        return "/".join(parts[:2])
    return None


def benchmark_panels(records: Sequence[dict]) -> list[str]:
    """The benchmark panels ('eval/<benchmark>', sorted) of the records that have avg@n / pass@k keys."""
    return sorted({b for r in records for b in map(_benchmark_of, r) if b is not None})


def panel_keys(panel: str, records: Sequence[dict]) -> list[str]:
    """The record keys the panel ``panel`` draws from ``records``: ``[panel]`` for a metric; for a
    benchmark panel its avg@n keys, then its pass@k keys by increasing k. Empty when absent."""
    found = {k for r in records for k in r}
    if panel in found:
        return [panel]
    keys = [k for k in found if _benchmark_of(k) == panel]
    return sorted(keys, key=lambda k: (not k.rsplit("/", 1)[1].startswith("avg@"), int(k.rsplit("@", 1)[1])))


def smooth_series(y: Sequence[float], n: int) -> list[float]:
    """Trailing moving average: out[i] = mean of the finite values among y[max(0, i-n+1) : i+1]
    (NaN when there are none). ``n = 1`` returns the values unchanged."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"smooth must be an int >= 1, got {n!r}")
    out = []
    for i in range(len(y)):
        window = [v for v in y[max(0, i - n + 1): i + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def _labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    names = [Path(d).resolve().name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def write_report(run_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike,
                 metrics: Sequence[str] | None = None, smooth: int = 1, x: str = "step",
                 log=None) -> str:
    """Draw ``metrics`` (default ``DEFAULT_METRICS``) of every run in ``run_dirs`` to
    ``out_png``; returns the PNG's path. ``log``: stream for notes (default stderr)."""
    log = sys.stderr if log is None else log
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    smooth_series([], smooth)  # validates smooth
    explicit = metrics is not None
    runs = [(label, read_metrics(d)) for label, d in zip(_labels(run_dirs), run_dirs)]
    metrics = list(metrics if explicit else
                   DEFAULT_METRICS + tuple(benchmark_panels([r for _, recs in runs for r in recs])))
    if not metrics:
        raise ValueError("no metrics to plot")

    present = {m: [label for label, recs in runs if panel_keys(m, recs)] for m in metrics}
    missing_everywhere = [m for m in metrics if not present[m]]
    if missing_everywhere and explicit:
        raise ValueError(
            f"metric(s) {', '.join(missing_everywhere)} found in none of the runs "
            f"({', '.join(str(d) for d in run_dirs)}); canonical keys: {', '.join(CANONICAL_KEYS)}")
    for m in missing_everywhere:
        print(f"popo-report: no run has {m!r}; not drawn", file=log)
    metrics = [m for m in metrics if present[m]]
    if not metrics:
        raise ValueError(f"none of the default metrics ({', '.join(DEFAULT_METRICS)}) is in "
                         f"any run; pass --metrics (canonical keys: {', '.join(CANONICAL_KEYS)})")
    for m in metrics:
        for label, _ in runs:
            if label not in present[m]:
                print(f"popo-report: run {label} has no {m!r}; skipped in that panel", file=log)

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"popo-report needs matplotlib ({e}); `pip install matplotlib`") from None
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = Figure(figsize=(ncols * PANEL_W, nrows * PANEL_H), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        for label, recs in runs:
            keys = panel_keys(m, recs)
            for key in keys:
                pts = [r for r in recs if key in r]
                xs = [r["step"] if x == "step" else r.get("elapsed_s", math.nan) / 60 for r in pts]
                ys = smooth_series([float(r[key]) for r in pts], smooth)
                name = label if key == m else f"{label} {key.rsplit('/', 1)[1]}"  # benchmark panel: avg@n, pass@k
                ax.plot(xs, ys, label=name, marker="." if len(pts) < 30 else None)
        ax.set_title(m + (f" (smoothed over {smooth})" if smooth > 1 else ""))
        if m not in {k for _, recs in runs for k in panel_keys(m, recs)}:  # a benchmark panel: accuracies
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step" if x == "step" else "training time (min)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=DPI)
    return str(out_png)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="popo-report", description="Draw metric curves of one or several runs to a PNG.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default=None,
                   help="PNG path (default: RUN_DIR/report.png for one run, ./report.png for several)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help=f"metric keys (default: {' '.join(DEFAULT_METRICS)}; "
                        f"canonical: {' '.join(CANONICAL_KEYS)})")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving-average window (points)")
    p.add_argument("--x", choices=("step", "time"), default="step", help="x axis")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or (str(Path(args.run_dirs[0]) / "report.png") if len(args.run_dirs) == 1
                       else "report.png")
    try:
        path = write_report(args.run_dirs, out, metrics=args.metrics, smooth=args.smooth, x=args.x)
    except (ValueError, FileNotFoundError) as e:
        print(f"popo-report: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
