"""Rollout throughput of the embedded server's HTTP stack: the current one against a git revision.

    python benchmarks/server_http_ab.py [--baseline-rev 669e794] [--reps 3] [--out benchmarks/results/server_http_ab_cpu.json]

Issue 15 moved the server from the stdlib ``http.server`` to FastAPI + uvicorn (with per-request
checks, disconnect watches and an ASGI guard); this measures that the rollout throughput did not
drop. Both servers run the same model and the same ``generation.py`` (the current one: the
baseline's ``server.py`` is taken from ``--baseline-rev`` and run as a script), one process each,
CPU, 1 thread; ``HttpEngine`` drives them as ``benchmarks/rollout.py``'s generation part does
(random Qwen2, hidden 256, 4 layers, vocab 4096, fp32; 32-token prompts, 64 new tokens, n = 1;
1, 8 and 32 requests in flight). The two alternate within each repetition, order flipped every
repetition, and medians are reported, because the machine's cores are shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from popo_mega.rollout.engine import SamplingParams  # noqa: E402
from popo_mega.rollout.http_engine import HttpEngine  # noqa: E402
from popo_mega.rollout.sglang_launcher import free_port, launch  # noqa: E402
from popo_mega.rollout.tiny_model import save_tiny_qwen2  # noqa: E402

SHAPE = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=704)


def _start(script: list[str], model: str, tmp: str, name: str):
    port = free_port()
    cmd = [sys.executable, *script, "--model-path", model, "--port", str(port), "--device", "cpu", "--strict-sglang"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return launch(cmd, f"http://127.0.0.1:{port}", log_path=os.path.join(tmp, f"{name}.log"), health_timeout_s=300,
                  env=env)


def _run(url: str, in_flight: int, new_tokens: int) -> tuple[float, int]:
    engine = HttpEngine([url], max_in_flight=64, request_timeout_s=600)
    prompts = [[1 + (i * 7) % 4000 for i in range(j, j + 32)] for j in range(in_flight)]
    t0 = time.perf_counter()
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=new_tokens), n=1)
    return time.perf_counter() - t0, sum(len(c.output_ids) for row in out for c in row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-rev", default="669e794", help="git revision of the stdlib server.py")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "server_http_ab_cpu.json"))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_qwen2(os.path.join(tmp, "model"), seed=0, **SHAPE)
        baseline = os.path.join(tmp, "server_baseline.py")
        with open(baseline, "w") as f:
            f.write(subprocess.check_output(["git", "-C", ROOT, "show", f"{args.baseline_rev}:popo_mega/rollout/server.py"],
                                            text=True))
        contenders = {"stdlib_http_server@" + args.baseline_rev: [baseline],
                      "fastapi_uvicorn": ["-m", "popo_mega.rollout.server"]}
        servers = {name: _start(script, model, tmp, name.split("@")[0]) for name, script in contenders.items()}
        times: dict = {(name, k): [] for name in servers for k in (1, 8, 32)}
        tokens: dict = {}
        try:
            for url in (s.url for s in servers.values()):
                _run(url, 1, 4)  # warm-up
            for rep in range(args.reps):
                order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                for in_flight in (1, 8, 32):
                    for name in order:
                        dt, n = _run(servers[name].url, in_flight, args.new_tokens)
                        times[(name, in_flight)].append(dt)
                        tokens[(name, in_flight)] = n
                        print(f"rep {rep} {name:32s} in_flight {in_flight:2d}: {n / dt:7.1f} tokens/s", flush=True)
        finally:
            for s in servers.values():
                s.stop()
    rows = []
    for (name, in_flight), dts in times.items():
        med = statistics.median(dts)
        rows.append({"server": name, "device": "cpu", "server_threads": 1, "dtype": "float32", "model": SHAPE,
                     "prompt_tokens": 32, "new_tokens": args.new_tokens, "requests_in_flight": in_flight,
                     "generated_tokens": tokens[(name, in_flight)], "seconds_each": [round(d, 4) for d in dts],
                     "median_tokens_per_s": round(tokens[(name, in_flight)] / med, 1)})
    meta = {"host_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "reps": args.reps, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": args.note or "2-core machine shared with other jobs (load ~20): ratios are the point"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    for in_flight in (1, 8, 32):
        a, b = (r["median_tokens_per_s"] for r in rows if r["requests_in_flight"] == in_flight)
        print(f"in_flight {in_flight:2d}: baseline {a:7.1f}  fastapi {b:7.1f} tokens/s  (ratio {b / a:.2f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
