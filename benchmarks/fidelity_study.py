"""The fidelity study (issue 14): POPO (ours), POPO (the authors' recipe), GRPO and A3PO, and POPO's
ablations, on the quickstart's synthetic task with 5 seeds each. Replaces benchmarks/rl_comparison.py
(3 seeds; its results stay in benchmarks/results/rl_comparison_cpu.json).

    python benchmarks/fidelity_study.py                 # run (or resume) the matrix, one run at a time
    python benchmarks/fidelity_study.py --dry-run       # print what is left, in order
    python benchmarks/fidelity_study.py --report        # docs/results.md's study section + PNGs from the rows

Two runners may share the matrix (one core each): each claims its next run with a claim file
(``OUT/<run>.claim``, holding its pid; a dead runner's claim is taken over) and merges its row into
the results file under a lock, so neither runs what the other has claimed or overwrites its rows.

Every run is a real ``popo-train`` process of ``configs/quickstart_cpu.yaml`` from the same
warm-started base (``runs/quickstart/base``, ~43 % held-out; built as the quickstart builds it when
missing), with the same rollout budget (``STEPS`` x 32 prompts x G = 8), differing only in the
overrides of ``VARIANTS`` / ``ABLATIONS`` and ``train.lr``. Held-out greedy accuracy of the online
policy (all 500 held-out problems) is taken every ``EVAL_EVERY`` steps.

The matrix, in the order it runs (so that a partial study is already useful):
  (a) the lr sweep, seed 1: four lrs for each of popo, popo-paper, grpo, a3po (``SWEEP_LRS``),
      centre lr first. The fourth (half the lowest) was added after the first three put every
      variant's best lr at the bottom of its grid: a sweep whose best is at its edge has not found it. POPO's 2e-3 is the shipped default; GRPO and A3PO collapsed at 2e-3 (1.4 %
      and 1.2 % at 300 steps, docs/results.md) and ran at 1e-3, so their grid brackets 1e-3 without
      re-running the known collapse; popo-paper's cosine schedule averages about half its peak lr, so
      its grid is POPO's. The best lr is the one with the highest mean of the last three held-out
      evaluations (less noisy than the single final one); the seed-1 sweep run at it is seed 1 of (b).
  (b) the four main variants at their best lr, seeds 2-5, seed by seed (seed 2 of all four, then 3...).
  (c) the six ablations at POPO's best lr, seeds 1-5, seed by seed.
  16 + 16 + 30 = 62 runs (``TOTAL_RUNS``).
  (d) edge probes: a main variant whose best lr is the lowest of its grid gets one seed-1 run at half
      that lr, to say whether the optimum lies below the grid. A probe never changes the best lr
      (``best_lr`` reads only ``SWEEP_LRS``: the seeds and ablations already run stay comparable);
      the report shows it beside the sweep.

Steps: ``STEPS = 200``. Measured first (2026-11-28): a 400-step POPO probe on one thread ran at
~2 s per step while other sessions loaded the machine (load average 6 on 2 cores), and the study's
first run (POPO, 200 steps) took 527 s wall at 0.57 cores on average (CPU s / wall s), ~65 s of it
start-up and the initial evaluation; each of the 8 evaluations (policy and served EMA, 500 problems
each) costs ~10 s. On an otherwise idle machine a 300-step run took 160-250 s with two threads,
so ~4 minutes for 200 steps on one. 58 runs (the first plan) at 200 steps: ~4 hours idle, ~8.5 hours loaded; at
300 steps ~6 and ~12.5. 200 is the most that fits about two sessions of background time (~5 h)
unless the machine is loaded throughout. The cost: from this 40 % base the policy is near 50 % at
step 200 (70 % at step 700 in the quickstart), so "steps to 80 % / 90 %" are "not reached"; the
report adds steps to 50 % / 60 %, and every row keeps its whole curve (and the served EMA's).

``popo-paper`` = the quickstart config with the recipe's algorithmic choices of
configs/qwen2.5-math-1.5b-popo-paper.yaml (docs/algorithms.md, "The authors' recipe"):
  carried over: rollout.weights online; algorithm.popo.is_correction none; entropy_on all;
    weight_mode softmax at weight_temperature 1 (already our default); tau 0.999 constant;
    noise_std 0.01; reward_threshold 0 and length_normalize false (our defaults too); cosine lr
    schedule with warmup_fraction 0.1 and min_lr 0; weight_decay 0.01; Adam betas 0.9/0.999 and
    grad_clip 1.0 (the quickstart's too).
  not carried over, and why: the model, prompts per step (8 vs our 32; G is 8 in both), response length, steps,
    prompt length and lr 1e-7 are the scale of a 1.5B model on DeepScaleR, not algorithmic choices
    (the study's rollout budget is the quickstart's, and popo-paper gets its own best lr from the
    sweep); predictor_hidden 4096 (1,536-wide model) stays the quickstart's 256 (128-wide model:
    the same ~2-3x of the hidden size); bf16 and seed 42 (fp32 on CPU; the seed is the study's
    variable); their per-micro-batch loss normalisers cannot be reproduced (they depend on TRL's
    shuffle and micro-batch size) and the preset does not carry them either.

Threads: each run gets ``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1`` (the machine's other core is
left to other sessions). popo-train sets no thread count of its own, so torch takes it from the
environment; the embedded server is a separate process that calls ``torch.set_num_threads`` with its
``--num-threads`` flag, default 1 (popo_mega/rollout/server.py). Each row records the setting and the
run's CPU seconds (trainer and server, from the kernel's child accounting) over its wall seconds.

Code: runs use a snapshot of one git commit (``git archive`` into ``OUT/code-<commit>``, plus the
built extension), pinned by the first run and taken from the existing rows on resume, so that
uncommitted edits of other sessions in the working tree never enter a run and all runs of the study
use the same trainer. ``--code-commit`` overrides it (the rows record it).

Resume: a run whose row is in the results file is never re-run; a run directory without a complete
metrics.jsonl (a killed run) is deleted and run again. After every finished run the results file
is rewritten. SIGTERM/SIGINT end the current popo-train (it takes its embedded server with it) and
exit; the run restarts next time.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "fidelity_study_cpu.json")
OUT = os.path.join(REPO, "runs", "fidelity_study")
STEPS = 200
EVAL_EVERY = 25
SEEDS = (1, 2, 3, 4, 5)
THREADS = 1

# GRPO and A3PO have no EMA: they serve the online policy. GRPO uses its paper's symmetric clip
# (0.2/0.2), A3PO DAPO's clip-higher (0.2/0.28), as in the 3-seed comparison.
PAPER = ["rollout.weights=online", "algorithm.popo.is_correction=none", "algorithm.popo.entropy_on=all",
         "algorithm.popo.weight_mode=softmax", "algorithm.popo.weight_temperature=1.0",
         "algorithm.popo.tau=0.999", "algorithm.popo.tau_schedule=constant", "algorithm.popo.noise_std=0.01",
         "algorithm.popo.reward_threshold=0.0", "algorithm.popo.length_normalize=false",
         "train.lr_schedule=cosine", "train.warmup_fraction=0.1", "train.min_lr=0.0", "train.weight_decay=0.01",
         "train.adam_beta1=0.9", "train.adam_beta2=0.999", "train.grad_clip=1.0"]
VARIANTS = {
    "popo": [],
    "popo-paper": PAPER,
    "grpo": ["algorithm.name=grpo", "algorithm.eps_high=0.2", "rollout.weights=online"],
    "a3po": ["algorithm.name=a3po", "rollout.weights=online"],
}
# Each changes one thing of the shipped POPO config (configs/quickstart_cpu.yaml), at POPO's lr.
ABLATIONS = {
    "popo-uniform-weights": ["algorithm.popo.weight_mode=uniform"],       # vs softmax (P1)
    "popo-no-similarity": ["algorithm.popo.alpha=0.0"],                   # no L_sim (P3)
    "popo-frozen-ema": ["algorithm.popo.tau=1.0"],                        # the target never moves (P6)
    "popo-serve-online": ["rollout.weights=online"],                      # vs the EMA served
    "popo-no-is": ["algorithm.popo.is_correction=none"],                  # vs token-level clipped ratio
    "popo-entropy-all": ["algorithm.popo.entropy_on=all"],                # vs positives only
}
SWEEP_LRS = {
    "popo": (2e-3, 1e-3, 3e-3, 5e-4),
    "popo-paper": (2e-3, 1e-3, 3e-3, 5e-4),
    "grpo": (1e-3, 5e-4, 1.5e-3, 2.5e-4),
    "a3po": (1e-3, 5e-4, 1.5e-3, 2.5e-4),
}
TOTAL_RUNS = sum(map(len, SWEEP_LRS.values())) + (len(SEEDS) - 1) * len(VARIANTS) + len(SEEDS) * len(ABLATIONS)


def overrides(variant: str) -> list[str]:
    return VARIANTS[variant] if variant in VARIANTS else ABLATIONS[variant]


def run_name(variant: str, seed: int, lr: float) -> str:
    return f"{variant}-lr{lr:g}-s{seed}"


def sweep_score(row: dict) -> float:
    """Mean of the last three held-out evaluations of a sweep row (the lr criterion)."""
    accs = [a for _, a in row["curve"]][-3:]
    return sum(accs) / len(accs)


def best_lr(rows: list[dict], variant: str) -> float | None:
    """The sweep's best lr for ``variant``; None until all of its sweep lrs have a seed-1 row."""
    got = {r["lr"]: r for r in rows if r["variant"] == variant and r["seed"] == 1 and r["lr"] in SWEEP_LRS[variant]}
    if len(got) < len(SWEEP_LRS[variant]):
        return None
    return max(SWEEP_LRS[variant], key=lambda lr: sweep_score(got[lr]))


def probe_lr(rows: list[dict], variant: str) -> float | None:
    """Half the sweep's best lr when that best is the lowest of ``variant``'s grid (stage (d)), else None."""
    best = best_lr(rows, variant)
    return best / 2 if best is not None and best == min(SWEEP_LRS[variant]) else None


def matrix(rows: list[dict]) -> list[tuple[str, str, int, float]]:
    """Every (stage, variant, seed, lr) of the study as far as ``rows`` determine it, in run order, done
    or not. Stages (b), (c) and (d) need the sweep's best lrs, so they appear once the sweep rows they
    need exist."""
    width = max(map(len, SWEEP_LRS.values()))
    todo = [("sweep", v, 1, lr) for i in range(width) for v, lrs in SWEEP_LRS.items() for lr in lrs[i:i + 1]]
    best = {v: best_lr(rows, v) for v in VARIANTS}
    for seed in SEEDS[1:]:
        todo += [("main", v, seed, best[v]) for v in VARIANTS if best[v] is not None]
    if best["popo"] is not None:
        for seed in SEEDS:
            todo += [("ablation", v, seed, best["popo"]) for v in ABLATIONS]
    todo += [("probe", v, 1, lr) for v in VARIANTS if (lr := probe_lr(rows, v)) is not None]
    return todo


def plan(rows: list[dict]) -> list[tuple[str, str, int, float]]:
    """The runs of ``matrix(rows)`` still to do, in order."""
    done = {(r["variant"], r["seed"], r["lr"]) for r in rows}
    return [t for t in matrix(rows) if t[1:] not in done]


def load_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"variant", "seed", "lr"} <= set(r) for r in rows):
        raise SystemExit(f"{path}: expected a list of row objects with variant, seed, lr")
    return rows


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive flock on ``path`` (created if missing) for the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _holder(claim_path: str) -> int | None:
    try:
        with open(claim_path) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def claim(out: str, name: str) -> bool:
    """Take ``name`` for this process (``OUT/<name>.claim`` holds the pid); False if another live runner
    holds it. A claim whose pid is gone (a runner killed with -9) is taken over. Claims are made under
    one lock (``OUT/.claims.lock``), so two runners never both take the same run."""
    path = os.path.join(out, name + ".claim")
    with _locked(os.path.join(out, ".claims.lock")):
        holder = _holder(path)
        if holder is not None and holder != os.getpid() and _pid_alive(holder):
            return False
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    return True


def unclaim(out: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, name + ".claim"))


def claimed_by_others(out: str) -> set[str]:
    """Run names a live runner other than this one holds."""
    names = set()
    for entry in os.listdir(out) if os.path.isdir(out) else ():
        if entry.endswith(".claim"):
            pid = _holder(os.path.join(out, entry))
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                names.add(entry[:-len(".claim")])
    return names


def next_run(results: str, out: str) -> tuple[str, str, int, float] | None:
    """The first run of the plan that no runner has finished or holds, claimed for this process.
    The rows are read again after the claim: a runner writes its row before it lets go of the claim,
    so a run finished between the first read and the claim is seen and let go."""
    for t in plan(load_rows(results)):
        name = run_name(*t[1:])
        if not claim(out, name):
            continue
        if any((r["variant"], r["seed"], r["lr"]) == t[1:] for r in load_rows(results)):
            unclaim(out, name)
            continue
        return t
    return None


def add_row(path: str, row: dict) -> list[dict]:
    """Append ``row`` to the results file under an exclusive lock, re-reading it first (another runner
    may have written since); returns the rows now on disk."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path + ".lock"):
        rows = load_rows(path) + [row]
        write_rows(path, rows)
    return rows


def write_rows(path: str, rows: list[dict]) -> None:
    """Rewritten whole after every run, through a temporary file (a kill mid-write keeps the old file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def code_snapshot(commit: str, out: str) -> str:
    """``popo_mega`` and ``configs`` of ``commit`` under OUT/code-<commit12>, with the built C extension
    copied from the working tree (it is not tracked; kernels fall back to the reference without it)."""
    path = os.path.join(out, f"code-{commit[:12]}")
    if os.path.isfile(os.path.join(path, ".complete")):
        return path
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    archive = subprocess.run(["git", "archive", commit, "popo_mega", "configs"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    for name in os.listdir(os.path.join(REPO, "popo_mega")):
        if name.startswith("_C") and name.endswith(".so"):
            shutil.copy2(os.path.join(REPO, "popo_mega", name), os.path.join(path, "popo_mega", name))
    open(os.path.join(path, ".complete"), "w").close()
    return path


def _metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    from popo_mega.train.metrics import read_metrics

    return read_metrics(run_dir)


def _initial_accuracy(log_path: str) -> float | None:
    with open(log_path) as f:
        for line in f:
            if line.startswith("initial accuracy: "):
                return float(line.split(":")[1].strip().rstrip("%")) / 100
    return None


_child: subprocess.Popen | None = None
_stop_signal: int | None = None


def _stop(signum, frame):
    """SIGTERM/SIGINT: pass SIGTERM on to the running popo-train (it exits at its next step boundary
    and takes its embedded server with it); ``run_one`` exits once it has ended. A second signal kills
    it. The handler never waits on the child: the interrupted ``Popen.wait`` holds its lock, and a
    wait here would deadlock (the first version of this handler did)."""
    global _stop_signal
    again, _stop_signal = _stop_signal is not None, signum
    if _child is not None and _child.poll() is None:
        (_child.kill if again else _child.terminate)()


def _exit_if_stopped() -> None:
    if _stop_signal is not None:
        print(f"[fidelity] stopped by signal {_stop_signal}; the unfinished run restarts on resume", flush=True)
        sys.exit(128 + _stop_signal)


def run_one(stage: str, variant: str, seed: int, lr: float, *, base: str, code: str, commit: str, out: str,
            steps: int, eval_every: int) -> dict:
    """One popo-train run; returns its row."""
    global _child
    name = run_name(variant, seed, lr)
    run_dir, log_path = os.path.join(out, name), os.path.join(out, name + ".log")
    shutil.rmtree(run_dir, ignore_errors=True)  # partial or absent: the study compares whole runs
    cmd = [sys.executable, "-m", "popo_mega.train.cli", "--config", os.path.join(code, "configs", "quickstart_cpu.yaml"),
           f"model.hf_path={base}", f"train.output_dir={run_dir}", f"train.steps={steps}", f"train.seed={seed}",
           f"train.lr={lr:g}", f"eval.interval={eval_every}", "train.save_interval=0", "train.tensorboard=false",
           *overrides(variant)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "PYTHONPATH": code}
    print(f"[fidelity] {stage} {name}: {' '.join(overrides(variant)) or '(shipped config)'}", flush=True)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log_path, "w") as log:
        # cwd = the snapshot: ``python -m`` puts the cwd first on sys.path, before PYTHONPATH
        _child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=code, env=env)
        rc = _child.wait()
        _child = None
    _exit_if_stopped()
    wall = time.time() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    records = _metrics(run_dir)
    if rc != 0 or len(records) < steps:
        raise SystemExit(f"[fidelity] {name} failed (exit {rc}, {len(records)}/{steps} steps); see {log_path}")
    return summarise(stage, variant, seed, lr, records, _initial_accuracy(log_path), wall, cpu, commit)


def summarise(stage: str, variant: str, seed: int, lr: float, records: list[dict], initial: float | None,
              wall_s: float, cpu_s: float, commit: str) -> dict:
    curve = [[r["step"], r["heldout_accuracy"]] for r in records if "heldout_accuracy" in r]
    served = [[r["step"], r["heldout_accuracy_served"]] for r in records if "heldout_accuracy_served" in r]
    trained = [r.get("tokens_fed", 0.0) for r in records]
    return {
        "variant": variant, "seed": seed, "lr": lr, "stage": stage, "overrides": overrides(variant),
        "steps": len(records), "initial_accuracy": initial,
        "final_accuracy": curve[-1][1] if curve else None,
        "best_accuracy": max((a for _, a in curve), default=None),
        **{f"steps_to_{t}": next((s for s, a in curve if a >= t / 100), None) for t in (70, 80, 90)},
        "tokens_per_step": sum(trained) / max(len(trained), 1),
        "rollouts_per_step": records[0]["rollouts"],
        "wall_s": round(wall_s, 1), "train_s": round(records[-1]["elapsed_s"], 1), "cpu_s": round(cpu_s, 1),
        "curve": curve,
        "curve_served": served,  # the served EMA's held-out accuracy (variants that serve the EMA; else [])
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, shared with other sessions",
        "dtype": "float32", "threads": THREADS, "commit": commit,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def fill_served_curves(rows: list[dict], out: str) -> bool:
    """Rows written before ``curve_served`` existed get it from their run directory's metrics.jsonl
    (when it is still there); True if any row changed."""
    changed = False
    for row in rows:
        run_dir = os.path.join(out, run_name(row["variant"], row["seed"], row["lr"]))
        if "curve_served" not in row and len(records := _metrics(run_dir)) == row["steps"]:
            row["curve_served"] = [[r["step"], r["heldout_accuracy_served"]] for r in records
                                   if "heldout_accuracy_served" in r]
            changed = True
    return changed


def ensure_base(base: str) -> None:
    if os.path.isfile(os.path.join(base, "config.json")):
        return
    from popo_mega.config import load_config
    from popo_mega.quickstart import BASE_HIGH, BASE_LOW
    from popo_mega.train.prompts import synthetic_task
    from popo_mega.train.warmstart import warm_start

    cfg = load_config(os.path.join(REPO, "configs", "quickstart_cpu.yaml"), [])
    warm_start(synthetic_task(cfg.data), base, low=BASE_LOW, high=BASE_HIGH, seed=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(REPO, "runs", "quickstart", "base"))
    p.add_argument("--out", default=OUT, help="run directories, logs and the code snapshot")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--code-commit", default=None, help="default: the rows' commit, else HEAD")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--dry-run", action="store_true", help="print the runs still to do and exit")
    p.add_argument("--report", action="store_true", help="write the report from the rows and exit")
    args = p.parse_args(argv)

    rows = load_rows(args.results)
    if args.report:
        from benchmarks.fidelity_report import write_study_report

        write_study_report(rows, results_path=args.results)
        return 0
    if args.dry_run:
        busy = claimed_by_others(os.path.abspath(args.out))
        for t in plan(rows):
            print(*t, "(running: claimed)" if run_name(*t[1:]) in busy else "")
        print(f"({len(rows)} rows done; stages (b)/(c) are listed once the sweep picks their lr)")
        return 0

    commits = {r["commit"] for r in rows}
    if args.code_commit:
        commit = _git("rev-parse", args.code_commit)
    elif commits:
        if len(commits) > 1:
            raise SystemExit(f"{args.results}: rows from several commits {sorted(commits)}; pass --code-commit")
        commit = commits.pop()
    else:
        commit = _git("rev-parse", "HEAD")
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if fill_served_curves(rows, args.out):
        write_rows(args.results, rows)
    code = code_snapshot(commit, args.out)
    ensure_base(args.base)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    n = 0
    while args.max_runs is None or n < args.max_runs:
        _exit_if_stopped()
        pick = next_run(args.results, args.out)
        if pick is None:
            break
        stage, variant, seed, lr = pick
        name = run_name(variant, seed, lr)
        try:
            row = run_one(stage, variant, seed, lr, base=os.path.abspath(args.base), code=code, commit=commit,
                          out=args.out, steps=args.steps, eval_every=args.eval_every)
            rows = add_row(args.results, row)
        finally:
            unclaim(args.out, name)
        n += 1
        print(f"[fidelity] {name}: {row['initial_accuracy']} -> final {row['final_accuracy']}, "
              f"steps to 80 %: {row['steps_to_80']}, {row['tokens_per_step']:.0f} tokens/step, {row['wall_s']:.0f} s "
              f"({row['cpu_s'] / row['wall_s']:.2f} cores); {len(plan(rows))} left", flush=True)
    left = plan(load_rows(args.results))
    print("[fidelity] nothing left to run" if not left else
          "[fidelity] stopped at --max-runs" if args.max_runs is not None and n >= args.max_runs else
          f"[fidelity] {len(left)} left, all claimed by other runners", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)  # benchmarks.fidelity_report for --report
    sys.exit(main())
