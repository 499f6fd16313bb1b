"""Every shipped config in miniature (issue 11 item 8): the overrides that shrink ``configs/X.yaml``
to two gloo processes on a CPU, and the commands a user runs after it (export, serve, evaluate).

Only what cannot run on two CPU processes is changed; the algorithm, its hyper-parameters, the
template, the data sets, the math-verify rewards, the evaluation benchmarks, bf16, recompute, the
distributed optimizer, sequence parallelism (where TP stays > 1) and the placement section stay:

* ``model.hf_path``: a miniature real checkpoint of the config's family (tests/real_checkpoints.py:
  the real tokenizer, the real vocabulary, two tiny layers).
* the parallel shape cut to 2 processes: TP=2 where TP > 1; where TP >= 8 and PP > 1 (two
  dimensions that cannot both be 2 with 2 processes) PP=2 and TP=1, which also turns off sequence
  parallelism (megatron has no SP at TP=1); TP=1 configs run DP=2. A mixture-of-experts config with
  expert parallelism (``parallel.expert`` > 1) keeps it: EP=2 over DP=2 at TP=1 and PP=1 (expert
  ranks are data-parallel ranks, so EP=2 leaves no process for TP or PP; MoE at TP=2 with SP is
  covered by tests/distributed/test_qwen3_moe_ep_step.py and the Qwen3-MoE parity tests).
* ``rollout.urls``: emptied (a config that attaches to servers on other nodes runs the embedded one).
* ``train.optimizer_cpu_offload``: off (megatron-core's HybridDeviceOptimizer runs on CUDA only:
  tests/unit/test_optimizer_offload.py; the trainer refuses it on a CPU with a ConfigError).
* ``rollout``: the embedded server (``backend embedded``, one server of one device: the embedded
  server has no TP), 2 rollouts of 16 tokens per prompt.
* fewer steps (2), prompts (2 per step), evaluation problems (``eval.limit 2``, ``n 1``, 16 tokens).
* the policy step must run, so the rollouts of a random model (its math answers are never right)
  must reach it: POPO counts every rollout as positive (``algorithm.popo.reward_threshold -1``:
  rewards are 0 or 1; the rewards are still graded by math-verify and logged), and A3PO/GRPO with
  DAPO dynamic sampling keeps its all-equal groups (``algorithm.grpo.dynamic_sampling false``:
  with every reward 0 it would drop every group, refill, and skip every step).
* a data file the config names by an absolute path outside the repository (the authors' DeepScaleR
  JSON of the paper presets) becomes the shared MATH training file, which has the same fields
  (``problem``, ``answer``); set names (``math_train``) resolve from ``<repo>/../shared/data/math``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs")
QUICKSTART = "quickstart_cpu.yaml"
MATH_TRAIN_FILE = os.path.join(REPO, "..", "shared", "data", "math", "math_train_rllm.json")
STEPS = 2
PROMPTS = 2
GROUP = 2
TOKENS = 16


def shipped_configs() -> list[str]:
    """File names of configs/*.yaml but the CPU quickstart (which its own tests run)."""
    return sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml") and n != QUICKSTART)


def read_config(name: str) -> dict:
    with open(os.path.join(CONFIGS, name)) as f:
        return yaml.safe_load(f)


def family(raw: dict) -> str:
    """Which miniature checkpoint stands in for the config's model: "llama3", "qwen3_moe" (Qwen3's
    mixture-of-experts releases are named Qwen3-<total>B-A<active>B), "qwen3" or "qwen2.5"."""
    path = raw["model"]["hf_path"].lower()
    if "llama" in path:
        return "llama3"
    if re.search(r"qwen3-\d+b-a\d+b", path):
        return "qwen3_moe"
    return "qwen3" if "qwen3" in path else "qwen2.5"


def miniature_parallel(raw: dict) -> dict:
    """The config's parallel section cut to 2 processes (see the module docstring)."""
    p = raw.get("parallel", {})
    tp, pp = p.get("tensor", 1), p.get("pipeline", 1)
    sp = p.get("sequence_parallel", False)
    if p.get("expert", 1) > 1:
        return {"tensor": 1, "pipeline": 1, "sequence_parallel": False, "expert": 2}
    if tp >= 8 and pp > 1:
        return {"tensor": 1, "pipeline": 2, "sequence_parallel": False}
    if tp > 1:
        return {"tensor": 2, "pipeline": 1, "sequence_parallel": sp}
    return {"tensor": 1, "pipeline": 1, "sequence_parallel": False}


def _outside_data(raw: dict) -> list[str]:
    """Entries of data.train that are absolute paths missing here (a user's local files)."""
    return [e for e in raw.get("data", {}).get("train", []) if os.path.isabs(e) and not os.path.exists(e)]


def miniature_overrides(name: str, hf_path: str, run_dir: str) -> list[str]:
    """``key=value`` overrides that run ``configs/<name>`` in miniature into ``run_dir``."""
    raw = read_config(name)
    par = miniature_parallel(raw)
    out = [f"model.hf_path={hf_path}", f"train.output_dir={run_dir}",
           f"parallel.tensor={par['tensor']}", f"parallel.pipeline={par['pipeline']}",
           f"parallel.sequence_parallel={str(par['sequence_parallel']).lower()}",
           *([f"parallel.expert={par['expert']}"] if "expert" in par else []),
           *(["rollout.urls=[]"] if raw.get("rollout", {}).get("urls") else []),
           *(["train.optimizer_cpu_offload=false"] if raw.get("train", {}).get("optimizer_cpu_offload") else []),
           "rollout.backend=embedded", "rollout.num_servers=1", "rollout.server_tp=1",
           f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={TOKENS}",
           f"train.steps={STEPS}", f"data.prompts_per_step={PROMPTS}", "train.keep_last=1",
           "eval.limit=2", "eval.n=1", f"eval.max_new_tokens={TOKENS}"]
    algo = raw.get("algorithm", {})
    if algo.get("name", "popo") == "popo":
        out.append("algorithm.popo.reward_threshold=-1.0")
    elif algo.get("grpo", {}).get("dynamic_sampling"):
        out.append("algorithm.grpo.dynamic_sampling=false")
    if _outside_data(raw):
        out.append(f"data.train=[{os.path.normpath(MATH_TRAIN_FILE)}]")
    return out


@dataclass
class Finished:
    argv: list[str]
    returncode: int
    output: str
    seconds: float


def run(argv: list[str], timeout_s: float, log_path: str | None = None, env: dict | None = None) -> Finished:
    """Run ``argv`` from the repository root, output captured (and written to ``log_path``)."""
    t0 = time.time()
    try:
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, **(env or {})})
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc = -9
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        out += f"\n[timeout after {timeout_s:.0f}s]"
    if log_path:
        with open(log_path, "w") as f:
            f.write(" ".join(argv) + "\n" + out)
    return Finished(argv, rc, out, time.time() - t0)


def train_argv(name: str, overrides: list[str]) -> list[str]:
    """popo-train under torchrun with 2 processes (what launch/train.sh runs on one node)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "popo_mega.train.cli", "--config", os.path.join(CONFIGS, name), *overrides]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def serve_and_eval(hf_dir: str, benchmarks: list[str], *, template: str, temperature: float, out_json: str,
                   log_dir: str, timeout_s: float = 300) -> Finished:
    """``popo-rollout-server --model-path hf_dir`` on a free port, then ``popo-eval`` against it on
    ``benchmarks`` (2 problems x 1 sample of TOKENS tokens, the config's template and temperature);
    the server is always stopped."""
    from popo_mega.rollout.sglang_launcher import free_port, launch

    port = free_port()
    server = launch([sys.executable, "-m", "popo_mega.rollout.server", "--model-path", hf_dir, "--port", str(port),
                     "--device", "cpu", "--random-seed", "0"], f"http://127.0.0.1:{port}",
                    log_path=os.path.join(log_dir, "eval_server.log"), health_timeout_s=180)
    try:
        return run([sys.executable, "-m", "popo_mega.eval.cli", "--server-url", server.url, "--tokenizer", hf_dir,
                    "--benchmarks", *benchmarks, "--n", "1", "--limit", "2", "--max-new-tokens", str(TOKENS),
                    "--template", template, "--temperature", str(temperature), "--workers", "1",
                    "--out", out_json], timeout_s=timeout_s, log_path=os.path.join(log_dir, "eval.log"))
    finally:
        server.stop()
