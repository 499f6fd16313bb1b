"""popo-train runs of the CPU quickstart config for the benchmarks that compare loop settings on it
(async_rollouts.py, colocated_loop.py): the warm-started base, and one run with overrides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart_cpu.yaml")


def quickstart_run(base: str, run_dir: str, overrides: list[str], what: str) -> tuple[list[dict], float, str]:
    """``popo-train --config configs/quickstart_cpu.yaml`` from ``base`` into ``run_dir`` with
    ``overrides`` (no checkpoints, no TensorBoard); (metrics.jsonl rows, wall seconds, stdout).
    A failed run exits naming ``what``."""
    cmd = [sys.executable, "-m", "popo_mega.train.cli", "--config", CONFIG, f"model.hf_path={base}",
           f"train.output_dir={run_dir}", "train.save_interval=0", "train.tensorboard=false", *overrides]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"[{what}] run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], wall, r.stdout
