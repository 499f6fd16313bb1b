"""POPO vs GRPO vs A3PO, and POPO's ablations, on the quickstart's synthetic task (docs/results.md).

Every run is a real ``popo-train`` process of ``configs/quickstart_cpu.yaml`` from the same
warm-started base, with the same rollout budget (steps x prompts x G), differing only in the
overrides below. Held-out greedy accuracy (all 500 problems) is taken every ``--eval-every`` steps.

    python benchmarks/rl_comparison.py --steps 300 --seeds 1 2 3            # the whole matrix
    python benchmarks/rl_comparison.py --only popo grpo --seeds 1             # a part of it

Writes, per run, ``OUT/NAME-sSEED/`` (metrics.jsonl, report.png); then
``benchmarks/results/rl_comparison_cpu.json`` (one record per run: accuracy curve, steps to 90%,
final accuracy, wall time, trained tokens per step) and two PNGs of held-out accuracy by step
(``docs/img/rl_comparison_algorithms.png``, ``docs/img/rl_comparison_ablations.png``).
A run whose metrics.jsonl already holds every step is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> overrides of configs/quickstart_cpu.yaml. GRPO and A3PO have no EMA: they serve the online
# policy. GRPO uses the symmetric clip of its paper (0.2/0.2), A3PO DAPO's clip-higher (0.2/0.28).
# At POPO's lr (2e-3) GRPO collapsed (the *-lr2e-3 runs); the baselines' main runs use 1e-3.
GRPO = ["algorithm.name=grpo", "algorithm.eps_high=0.2", "rollout.weights=online"]
A3PO = ["algorithm.name=a3po", "rollout.weights=online"]
VARIANTS = {
    "popo": [],
    "grpo": [*GRPO, "train.lr=1e-3"],
    "a3po": [*A3PO, "train.lr=1e-3"],
    "grpo-lr2e-3": GRPO,
    "a3po-lr2e-3": A3PO,
    "popo-no-similarity": ["algorithm.popo.alpha=0.0"],
    "popo-uniform-weights": ["algorithm.popo.weight_mode=uniform"],
    "popo-frozen-ema": ["algorithm.popo.tau=1.0"],
    "popo-serve-online": ["rollout.weights=online"],
}
ALGORITHMS = ("popo", "grpo", "a3po")
ABLATIONS = ("popo", "popo-no-similarity", "popo-uniform-weights", "popo-frozen-ema", "popo-serve-online")


def _records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    from popo_mega.train.metrics import read_metrics

    return read_metrics(run_dir)


def run_one(name: str, seed: int, args) -> str:
    run_dir = os.path.join(args.out, f"{name}-s{seed}")
    if len(_records(run_dir)) >= args.steps:
        print(f"[rl-comparison] {name} seed {seed}: already complete in {run_dir}", flush=True)
        return run_dir
    if os.path.exists(run_dir):
        import shutil

        shutil.rmtree(run_dir)  # a partial run: start it again (the matrix compares whole runs)
    cmd = [sys.executable, "-m", "popo_mega.train.cli", "--config", os.path.join(REPO, "configs", "quickstart_cpu.yaml"),
           f"model.hf_path={args.base}", f"train.output_dir={run_dir}", f"train.steps={args.steps}",
           f"train.seed={seed}", f"eval.interval={args.eval_every}", "train.save_interval=0",
           "train.tensorboard=false", *VARIANTS[name]]
    print(f"[rl-comparison] {name} seed {seed}: {' '.join(VARIANTS[name]) or '(shipped config)'}", flush=True)
    t0 = time.time()
    with open(os.path.join(args.out, f"{name}-s{seed}.log"), "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"[rl-comparison] {name} seed {seed} failed (exit {rc}); see {log.name}")
    print(f"[rl-comparison] {name} seed {seed}: done in {time.time() - t0:.0f} s", flush=True)
    return run_dir


def summarise(name: str, seed: int, run_dir: str, initial: float | None, target: float) -> dict:
    rows = _records(run_dir)
    curve = [(r["step"], r["heldout_accuracy"]) for r in rows if "heldout_accuracy" in r]
    reached = {f"steps_to_{int(100 * t)}": next((s for s, a in curve if a >= t), None)
               for t in sorted({0.7, 0.8, target})}
    trained = [r.get("tokens_fed", 0.0) for r in rows]
    return {
        "name": name, "seed": seed, "overrides": VARIANTS[name], "steps": len(rows),
        "initial_accuracy": initial, "final_accuracy": curve[-1][1] if curve else None,
        "best_accuracy": max((a for _, a in curve), default=None),
        **reached,
        "wall_s": rows[-1]["elapsed_s"] if rows else None,
        "trained_tokens_per_step": sum(trained) / max(len(trained), 1),
        "rollouts_per_step": rows[0]["rollouts"] if rows else None,
        "accuracy_curve": curve,
    }


def _initial_accuracy(run_dir: str) -> float | None:
    log = run_dir + ".log"
    if not os.path.exists(log):
        return None
    with open(log) as f:
        for line in f:
            if line.startswith("initial accuracy: "):
                return float(line.split(":")[1].strip().rstrip("%")) / 100
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(REPO, "runs", "quickstart", "base"),
                   help="warm-started base (built as the quickstart builds it when missing)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "rl_comparison"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=None, help="default: the first of --seeds")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results", "rl_comparison_cpu.json"))
    p.add_argument("--img-dir", default=os.path.join(REPO, "docs", "img"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not os.path.isfile(os.path.join(args.base, "config.json")):
        from popo_mega.config import load_config
        from popo_mega.quickstart import BASE_HIGH, BASE_LOW
        from popo_mega.train.prompts import synthetic_task
        from popo_mega.train.warmstart import warm_start

        cfg = load_config(os.path.join(REPO, "configs", "quickstart_cpu.yaml"), [])
        warm_start(synthetic_task(cfg.data), args.base, low=BASE_LOW, high=BASE_HIGH, seed=0)

    ablation_seeds = args.ablation_seeds or args.seeds[:1]
    plan = [(n, s) for n in ALGORITHMS for s in args.seeds]
    plan += [(n, s) for n in ("grpo-lr2e-3", "a3po-lr2e-3", *ABLATIONS) if n != "popo" for s in ablation_seeds]
    if args.only:
        plan = [(n, s) for n, s in plan if n in args.only]
    records = []
    for name, seed in plan:
        run_dir = run_one(name, seed, args)
        records.append(summarise(name, seed, run_dir, _initial_accuracy(run_dir), args.target))
        r = records[-1]
        print(f"[rl-comparison] {name} seed {seed}: {r['initial_accuracy']} -> final {r['final_accuracy']}, "
              f"steps to {100 * args.target:.0f}%: {r[f'steps_to_{int(100 * args.target)}']}, "
              f"{r['trained_tokens_per_step']:.0f} trained tokens/step, {r['wall_s']:.0f} s", flush=True)

    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, one process",
                   "dtype": "float32", "task": "synthetic two-digit addition, 500 held-out problems (greedy)",
                   "model": "tiny Qwen2, hidden 128, 2 layers (quickstart warm start)",
                   "steps": args.steps, "prompts_per_step": 32, "group_size": 8, "runs": records}, f, indent=1)
    print(f"[rl-comparison] wrote {args.results}")

    from popo_mega.train.report import write_report

    done = {(r["name"], r["seed"]): os.path.join(args.out, f"{r['name']}-s{r['seed']}") for r in records}
    for title, names, seeds in (("algorithms", ALGORITHMS, args.seeds),
                                ("ablations", ("grpo-lr2e-3", "a3po-lr2e-3", *ABLATIONS), ablation_seeds)):
        dirs = [done[(n, s)] for n in names for s in seeds if (n, s) in done]
        if len(dirs) > 1:
            png = write_report(dirs, os.path.join(args.img_dir, f"rl_comparison_{title}.png"),
                               metrics=["heldout_accuracy", "reward", "tokens_fed", "entropy"])
            print(f"[rl-comparison] wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
