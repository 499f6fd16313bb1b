"""Asynchronous rollouts on the CPU quickstart (issue 12 item 4): rollout.max_staleness k = 0, 1, 2.

    python benchmarks/async_rollouts.py [--steps 200] [--ks 0,1,2] [--reps 1] [--out benchmarks/results/async_rollouts_cpu.json]

Runs ``popo-train`` on configs/quickstart_cpu.yaml from the quickstart's warm-started base
(runs/quickstart/base; built as the quickstart builds it when missing), the same seed for every k,
held-out greedy accuracy of the online policy every ``--eval-interval`` steps, no checkpoints. The
runs alternate (k = 0, 1, 2, 0, 1, 2, ...) so that the machine's load falls on every k alike.

Per run, from metrics.jsonl and the run's output:
* wall time of the whole command and the training time (``elapsed_s`` of the last step);
* time per phase, summed over the steps: ``rollout_s`` (sampling, grading, selection; with k >= 1 it
  runs beside the trainer), ``train_s`` (the policy step and the EMA update), ``sync_s`` (the weight
  sync; evaluations are in no phase), ``rollout_wait_s`` (the trainer idle, waiting for its batch);
* staleness (mean over steps of the batch's oldest version lag) and the fraction of partial rollouts;
* the held-out accuracy curve and the final accuracy, and the training seconds to the first
  evaluation at >= 90 %;
* the rewards of the first 20 steps (equal across reps of k = 0: the loop is deterministic).
The summary gives each k's speed-up over k = 0 in training time and its accuracy difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.quickstart_runs import quickstart_run  # noqa: E402
PHASES = ("rollout_s", "train_s", "sync_s", "rollout_wait_s")


def _run(k: int, base: str, work: str, steps: int, eval_interval: int, rep: int) -> dict:
    run_dir = os.path.join(work, f"k{k}-rep{rep}-{int(time.time())}")
    rows, wall, stdout = quickstart_run(base, run_dir, [f"train.steps={steps}", f"eval.interval={eval_interval}",
                                                        f"rollout.max_staleness={k}"], f"async-rollouts k={k}")
    final = next((float(line.split(":")[1].strip().rstrip("%")) / 100 for line in stdout.splitlines()
                  if line.startswith("final accuracy:")), None)
    curve = [[row["step"], row["heldout_accuracy"]] for row in rows if "heldout_accuracy" in row]
    to_90 = next((row["elapsed_s"] for row in rows if row.get("heldout_accuracy", 0.0) >= 0.9), None)
    out = {"k": k, "rep": rep, "steps": len(rows), "wall_s": wall, "train_elapsed_s": rows[-1]["elapsed_s"],
           "phase_totals_s": {p: sum(row.get(p, 0.0) for row in rows) for p in PHASES},
           "step_time_median_s": statistics.median(row["step_time_s"] for row in rows[1:]),
           "staleness_mean": statistics.mean(row.get("staleness", 0.0) for row in rows),
           "partial_rollouts_mean": statistics.mean(row.get("partial_rollouts", 0.0) for row in rows),
           "heldout_curve": curve, "final_accuracy": final, "train_s_to_90": to_90,
           "rewards_first_20": [row.get("reward") for row in rows[:20]]}
    print(f"[async-rollouts] k={k} rep {rep}: wall {wall:.0f} s, training {out['train_elapsed_s']:.0f} s, "
          f"final {final}, phases {json.dumps({p: round(v, 1) for p, v in out['phase_totals_s'].items()})}", flush=True)
    return out


def summarise(runs: list[dict]) -> dict:
    """Per k: medians over reps of the times and the final accuracy; speed-up and accuracy difference
    against k = 0 (training time, the command's start-up and final evaluation left out)."""
    out = {}
    for k in sorted({r["k"] for r in runs}):
        mine = [r for r in runs if r["k"] == k]
        out[k] = {"reps": len(mine), "wall_s": statistics.median(r["wall_s"] for r in mine),
                  "train_elapsed_s": statistics.median(r["train_elapsed_s"] for r in mine),
                  "final_accuracy": statistics.median(r["final_accuracy"] for r in mine),
                  **{p: statistics.median(r["phase_totals_s"][p] for r in mine) for p in PHASES}}
    if 0 in out:
        for k, s in out.items():
            s["speedup_vs_k0"] = out[0]["train_elapsed_s"] / s["train_elapsed_s"]
            s["accuracy_vs_k0_points"] = 100 * (s["final_accuracy"] - out[0]["final_accuracy"])
    return out


def plot(result: dict, path: str) -> None:
    """Held-out accuracy against training seconds and against steps, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["runs"]:
        steps = [s for s, _ in r["heldout_curve"]]
        acc = [100 * a for _, a in r["heldout_curve"]]
        label = f"k={r['k']}" + (f" ({r['note']})" if r.get("note") else "")
        by_step.plot(steps, acc, marker=".", label=label)
        by_time.plot([r["train_elapsed_s"] * s / r["steps"] for s in steps], acc, marker=".", label=label)
    by_time.set_xlabel("training seconds (steps x mean step time)")
    by_step.set_xlabel("step")
    for ax in (by_time, by_step):
        ax.set_ylabel("held-out greedy accuracy, policy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"rollout.max_staleness on the CPU quickstart ({result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(REPO, "runs", "quickstart", "base"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--ks", default="0,1,2")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--work", default=os.path.join(REPO, "runs", "async_rollouts"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "async_rollouts_cpu.json"))
    p.add_argument("--png", default=os.path.join(REPO, "docs", "img", "async_rollouts_cpu.png"))
    p.add_argument("--plot-only", action="store_true", help="redraw --png from --out without running")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.out) as f:
            plot(json.load(f), args.png)
        return 0
    sys.path.insert(0, REPO)
    from benchmarks.fidelity_study import ensure_base

    ensure_base(args.base)
    os.makedirs(args.work, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    runs = [_run(k, args.base, args.work, args.steps, args.eval_interval, rep) for rep in range(args.reps) for k in ks]
    result = {"benchmark": "async_rollouts",
              "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores, one trainer process + its embedded server",
              "dtype": "float32", "model": "quickstart tiny Qwen2 (hidden 128, 2 layers, vocab of the synthetic task)",
              "config": f"configs/quickstart_cpu.yaml, train.steps={args.steps}, eval.interval={args.eval_interval}",
              "load_average_at_end": os.getloadavg(), "summary": summarise(runs), "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.png)
    print(f"[async-rollouts] wrote {args.out} and {args.png}: {json.dumps(result['summary'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
