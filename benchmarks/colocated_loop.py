"""What colocated mode costs inside the training loop on the CPU (issue 12 item 3).

    python benchmarks/colocated_loop.py [--steps 40] [--reps 2] [--out benchmarks/results/colocated_loop_cpu.json]

Runs ``popo-train`` on configs/quickstart_cpu.yaml from the quickstart's warm-started base
(runs/quickstart/base; built as the quickstart builds it when missing), held-out evaluation off, in
both placements, alternating (disaggregated, colocated, disaggregated, ...) so that the machine's
load falls on both alike:

* ``disaggregated``: the embedded server keeps its weights;
* ``colocated``: the server runs with ``--enable-memory-saver``; ``/release_memory_occupation``
  frees its weights before every policy step, ``/resume_memory_occupation`` re-allocates them after,
  and the weight sync that every step does anyway sends them back.

Per run: the medians over steps 2.. of the step time, rollout_s, sync_s, release_s and resume_s
(from metrics.jsonl), the wall time, and the rewards of the first steps (the same seed in both
placements: equal rewards say colocation changed nothing the policy sees). What memory a release
frees is measured apart, in benchmarks/colocated_release.py.
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


def _run(mode: str, base: str, out_dir: str, steps: int) -> dict:
    run_dir = os.path.join(out_dir, f"{mode}-{int(time.time())}")
    rows, wall, _ = quickstart_run(base, run_dir, [f"train.steps={steps}", "eval.interval=0", f"placement.mode={mode}",
                                                   "rollout.max_staleness=0"],  # colocated servers cannot sample
                                   f"colocated-loop {mode}")                      # while the step runs
    later = rows[1:]   # step 1 pays the first-call costs

    def med(key):
        vals = [row[key] for row in later if key in row]
        return statistics.median(vals) if vals else None

    out = {"mode": mode, "steps": len(rows), "wall_s": wall, "step_time_s": med("step_time_s"),
           "rollout_s": med("rollout_s"), "sync_s": med("sync_s"), "release_s": med("release_s"),
           "resume_s": med("resume_s"), "rewards_first_10": [row.get("reward") for row in rows[:10]]}
    print(f"[colocated-loop] {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()
                                                   if isinstance(v, float)), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(REPO, "runs", "quickstart", "base"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--work", default=os.path.join(REPO, "runs", "colocated_loop"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "colocated_loop_cpu.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    from benchmarks.fidelity_study import ensure_base

    ensure_base(args.base)
    os.makedirs(args.work, exist_ok=True)
    runs = [_run(mode, args.base, args.work, args.steps)
            for _ in range(args.reps) for mode in ("disaggregated", "colocated")]
    summary = {}
    for mode in ("disaggregated", "colocated"):
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {k: statistics.median(r[k] for r in mine) for k in
                         ("wall_s", "step_time_s", "rollout_s", "sync_s") if all(r[k] is not None for r in mine)}
        if mode == "colocated":
            summary[mode].update({k: statistics.median(r[k] for r in mine) for k in ("release_s", "resume_s")})
    load = os.getloadavg()
    result = {"benchmark": "colocated_loop", "device": f"CPU ({platform.machine()}), {os.cpu_count()} cores, one process + its server",
              "dtype": "float32", "model": "quickstart tiny Qwen2 (hidden 128, 2 layers, vocab of the synthetic task)",
              "config": "configs/quickstart_cpu.yaml, eval.interval=0", "steps": args.steps, "reps": args.reps,
              "load_average_at_end": load, "summary_medians": summary, "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[colocated-loop] wrote {args.out}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
