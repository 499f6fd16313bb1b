"""Issue 15's /generate case table: every bad body of tests/unit/test_server_requests.py::BAD, sent over
HTTP to the embedded server of a git revision (before) and to the current one (after).

    python benchmarks/server_cases.py [--baseline-rev 669e794] [--out benchmarks/results/server_cases_cpu.json]

Each case records the HTTP status and the start of the answer (200s: how many sequences of how many
tokens), the seconds it took (a 15 s client timeout is "TIMEOUT") and /health right after. The
model is ``tiny_model.save_tiny_qwen2`` (vocab 64, 256 positions), CPU; the current server runs with
``--max-sequences-per-request 16`` as the unit test's limits. The two cases that locked the old
server (max_new_tokens 1e9, n 1e6) run last, so they cannot spoil the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from popo_mega.rollout.sglang_launcher import free_port, launch  # noqa: E402
from popo_mega.rollout.tiny_model import save_tiny_qwen2  # noqa: E402
from tests.unit.test_server_requests import BAD  # noqa: E402

LOCKS = (0, 5)  # max_new_tokens 1e9, n 1e6


def _answer(r: requests.Response) -> str:
    def bare(constant):
        raise ValueError(f"bare {constant}")
    try:
        out = json.loads(r.text, parse_constant=bare)
    except ValueError as exc:
        return f"{r.status_code} NOT JSON ({exc}): {r.text[:80]}"
    if r.status_code == 200:
        out = out if isinstance(out, list) else [out]
        return f"200 {len(out)} sequence(s) of {sorted({len(o['output_ids']) for o in out})} tokens"
    message = out.get("error", {}).get("message", "") if isinstance(out, dict) else str(out)
    return f"{r.status_code} {message[:100]}"


def run(script: list[str], extra: list[str], tmp: str, name: str) -> list[dict]:
    path = save_tiny_qwen2(os.path.join(tmp, f"model_{name}"), seed=0)
    port = free_port()
    cmd = [sys.executable, *script, "--model-path", path, "--port", str(port), "--device", "cpu", "--strict-sglang",
           *extra]
    server = launch(cmd, f"http://127.0.0.1:{port}", log_path=os.path.join(tmp, f"{name}.log"), health_timeout_s=120,
                    env={**os.environ, "PYTHONPATH": ROOT})
    rows = {}
    try:
        for i in [i for i in range(len(BAD)) if i not in LOCKS] + list(LOCKS):
            body, field = BAD[i]
            t0 = time.monotonic()
            try:
                got = _answer(requests.post(f"{server.url}/generate", data=json.dumps(body), timeout=15))
            except requests.Timeout:
                got = "TIMEOUT (15 s)"
            rows[i] = {"answer": got, "seconds": round(time.monotonic() - t0, 2),
                       "health_after": requests.get(f"{server.url}/health", timeout=15).status_code}
    finally:
        server.stop()
    return [rows[i] for i in range(len(BAD))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-rev", default="669e794")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "server_cases_cpu.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = os.path.join(tmp, "server_baseline.py")
        with open(baseline, "w") as f:
            f.write(subprocess.check_output(["git", "-C", ROOT, "show", f"{args.baseline_rev}:popo_mega/rollout/server.py"],
                                            text=True))
        before = run([baseline], [], tmp, "before")
        after = run(["-m", "popo_mega.rollout.server"], ["--max-sequences-per-request", "16"], tmp, "after")
    cases = [{"case": i, "body": json.dumps(body)[:120], "field": field, "before": b, "after": a}
             for i, ((body, field), b, a) in enumerate(zip(BAD, before, after))]
    defects = sum(1 for c in cases if not c["before"]["answer"].startswith("400"))
    fixed = sum(1 for c in cases if c["after"]["answer"].startswith("400") and c["field"] in c["after"]["answer"])
    meta = {"baseline_rev": args.baseline_rev, "device": "cpu", "model": "save_tiny_qwen2 (vocab 64, 256 positions, fp32)",
            "cases": len(cases), "not_400_before": defects, "400_naming_the_field_after": fixed,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, indent=1)
    for c in cases:
        print(f"{c['case']:2d} {c['field']:34s} before: {c['before']['answer'][:60]:60s} after: {c['after']['answer'][:50]}")
    print(meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
