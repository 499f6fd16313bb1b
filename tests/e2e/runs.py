"""The popo-train command line of the end-to-end tests, and reading a run's metrics."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = ["data.synthetic.max_operand=3", "data.synthetic.n_heldout=4"]


def train_args(base, run_dir, steps, extra=(), nproc: int = 1):
    """argv of a popo-train run of the quickstart config on the micro task (under torchrun when nproc > 1)."""
    launcher = [sys.executable, "-m", "popo_mega.train.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "popo_mega.train.cli"]
    return [*launcher, "--config", os.path.join(REPO, "configs", "quickstart_cpu.yaml"),
            f"model.hf_path={base}", f"train.output_dir={run_dir}", f"train.steps={steps}", "train.save_interval=2",
            "train.keep_last=1", "data.prompts_per_step=4", "rollout.group_size=4", "eval.interval=2",
            "algorithm.popo.predictor_hidden=32", *TASK,
            # on-policy (the quickstart samples one step ahead): these tests compare runs step for step,
            # and a rollout in flight across a sync depends on timing; test_async_rollouts.py runs k = 1
            "rollout.max_staleness=0", *extra]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for_steps(proc, run_dir, steps: int, timeout_s: float = 240.0) -> None:
    """Poll until the run in ``proc`` has logged ``steps`` steps (or exited, or ``timeout_s`` passed)."""
    import time

    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= steps:
                    return
        time.sleep(0.2)


def kill_9_when(args, path: str, log_path: str, timeout_s: float = 240.0) -> tuple[bool, int, str]:
    """Run ``args`` (a popo-train command) in its own process group and SIGKILL the whole group, as a
    scheduler would, the moment ``path`` exists (or after ``timeout_s``, or when it exits): megatron's
    checkpoint writer leaves a multiprocessing manager process behind the trainer; the embedded server
    exits by itself. Returns (whether ``path`` was seen, the return code, the output)."""
    import signal
    import subprocess
    import time

    with open(log_path, "w+") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and proc.poll() is None and not os.path.exists(path):
                time.sleep(0.002)
            seen = os.path.exists(path)
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            log.seek(0)
            return seen, proc.returncode, log.read()
