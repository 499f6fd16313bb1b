"""Rollout benchmarks: embedded-server generation throughput, and weight-sync time vs bytes.

    python benchmarks/rollout.py [--out benchmarks/results/rollout_cpu.json] [--quick]

1. Generation: one ``popo-rollout-server`` process (CPU, 1 thread) serving a random Qwen2
   (hidden 256, 4 layers, vocab 4096: ~6M parameters, fp32), driven by ``HttpEngine`` with
   1, 8 and 32 prompts in flight, n=1, 64 new tokens each (no EOS, so every response is 64 tokens).
   Reports generated tokens/s over the wall time of ``generate()``.
2. Weight sync: for random Qwen2 models of growing size, one server, the trainer (this process)
   syncs its state_dict with ``HttpEngine.sync_weights`` (gloo over loopback), both with 512 MB
   flattened buckets and with one broadcast per tensor. ``send_s`` is the data path alone
   (``SyncReport.seconds``: POSTs + broadcasts + version), ``sync_s`` the whole call (pause, send,
   flush, continue, version and probe checks). ``raw_broadcast_s`` is one gloo broadcast of the
   same number of bytes between this process and a second one (the floor for any protocol).
Every row records the device, thread counts, dtype and shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from popo_mega.rollout.engine import SamplingParams  # noqa: E402
from popo_mega.rollout.http_engine import HttpEngine  # noqa: E402
from popo_mega.rollout.sglang_launcher import free_port, launch_servers, stop_servers  # noqa: E402
from popo_mega.rollout.tiny_model import save_tiny_qwen2  # noqa: E402
from popo_mega.rollout.weight_group import WeightUpdateGroup  # noqa: E402


def bench_generation(tmp: str, quick: bool) -> list[dict]:
    shape = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=704)
    path = save_tiny_qwen2(os.path.join(tmp, "gen_model"), seed=0, **shape)
    servers = launch_servers("embedded", path, num_servers=1, device="cpu", log_dir=tmp, health_timeout_s=300)
    rows = []
    try:
        engine = HttpEngine([servers[0].url], max_in_flight=64, request_timeout_s=600)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=16 if quick else 64)
        engine.generate([[1, 2, 3]], sampling)  # warm-up
        for in_flight in ([1, 8] if quick else [1, 8, 32]):
            prompts = [[1 + (i * 7) % 4000 for i in range(j, j + 32)] for j in range(in_flight)]  # 32-token prompts
            t0 = time.perf_counter()
            out = engine.generate(prompts, sampling, n=1)
            dt = time.perf_counter() - t0
            tokens = sum(len(c.output_ids) for row in out for c in row)
            rows.append({"bench": "generation", "device": "cpu", "server_threads": 1, "dtype": "float32",
                         "model": shape, "prompt_tokens": 32, "new_tokens": sampling.max_new_tokens,
                         "requests_in_flight": in_flight, "generated_tokens": tokens, "seconds": round(dt, 4),
                         "tokens_per_s": round(tokens / dt, 1)})
            print(rows[-1], flush=True)
    finally:
        stop_servers(servers)
    return rows


def _receiver(port: int, nbytes: int, repeats: int) -> None:
    torch.set_num_threads(1)
    group = WeightUpdateGroup(master_address="127.0.0.1", master_port=port, rank=1, world_size=2,
                              group_name="raw", backend="gloo", timeout_s=300)
    buf = torch.empty(nbytes, dtype=torch.uint8)
    for _ in range(repeats):
        group.broadcast(buf)


def raw_broadcast_seconds(nbytes: int, repeats: int) -> float:
    """Median time of one gloo broadcast of ``nbytes`` from this process to a second one."""
    import multiprocessing as mp

    port = free_port()
    proc = mp.get_context("spawn").Process(target=_receiver, args=(port, nbytes, repeats + 1))
    proc.start()
    try:
        group = WeightUpdateGroup(master_address="127.0.0.1", master_port=port, rank=0, world_size=2,
                                  group_name="raw", backend="gloo", timeout_s=300)
        buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        group.broadcast(buf)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            group.broadcast(buf)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()


def bench_sync(tmp: str, quick: bool) -> list[dict]:
    from transformers import AutoModelForCausalLM

    sizes = [(128, 2, 4096)] if quick else [(128, 2, 4096), (512, 4, 8192), (1024, 8, 16384)]
    repeats = 2 if quick else 3
    rows = []
    for hidden, layers, vocab in sizes:
        shape = dict(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=2,
                     intermediate_size=hidden * 3)
        path = save_tiny_qwen2(os.path.join(tmp, f"sync_{hidden}"), seed=0, **shape)
        trainer = AutoModelForCausalLM.from_pretrained(path)
        state = {k: v.detach().clone() for k, v in trainer.state_dict().items()}
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        raw = raw_broadcast_seconds(nbytes, repeats)
        servers = launch_servers("embedded", path, num_servers=1, device="cpu", log_dir=tmp, health_timeout_s=300)
        try:
            for load_format in ("flattened_bucket", None):
                engine = HttpEngine([servers[0].url], sync_method="distributed", load_format=load_format,
                                    sync_timeout_s=600)
                send, whole = [], []
                for r in range(repeats + 1):
                    t0 = time.perf_counter()
                    engine.sync_weights(state.items(), f"v{r}")
                    if r:  # the first sync also forms the group: reported separately
                        whole.append(time.perf_counter() - t0)
                        send.append(engine.last_sync.seconds)
                    else:
                        first = time.perf_counter() - t0
                report = engine.last_sync
                engine.close()
                rows.append({"bench": "weight_sync", "device": "cpu", "backend": "gloo", "dtype": "float32",
                             "model": shape, "tensors": report.tensors, "bytes": nbytes, "MB": round(nbytes / 2**20, 2),
                             "load_format": load_format or "per_tensor", "buckets": report.buckets,
                             "first_sync_s_incl_group_setup": round(first, 4),
                             "send_s": round(statistics.median(send), 4), "sync_s": round(statistics.median(whole), 4),
                             "raw_broadcast_s": round(raw, 4),
                             "send_over_raw": round(statistics.median(send) / raw, 2),
                             "send_GB_per_s": round(nbytes / statistics.median(send) / 1e9, 3),
                             "raw_GB_per_s": round(nbytes / raw / 1e9, 3)})
                print(rows[-1], flush=True)
        finally:
            stop_servers(servers)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "rollout_cpu.json"))
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_generation(tmp, args.quick) + bench_sync(tmp, args.quick)
    meta = {"host_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "trainer_threads": 1, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": "2-core machine shared with other jobs: absolute numbers are noisy; ratios are the point"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
