"""What colocated mode costs on the CPU: the embedded server releasing its memory for the policy step.

    python benchmarks/colocated_release.py [--out benchmarks/results/colocated_release_cpu.json] [--reps 3]

For two models, one ``popo-rollout-server`` process (CPU, 1 thread, ``--strict-sglang
--enable-deterministic-inference --enable-memory-saver``: SGLang's memory saver without
``--enable-weights-cpu-backup``, so a release loses the weights and they are sent again), driven
over HTTP by ``HttpEngine`` as the training loop drives it:

1. ``quickstart``: the quickstart's architecture (``train/warmstart.build_tiny_qwen2`` on the
   synthetic task's character tokenizer: hidden 128, 2 layers), random weights, fp32.
2. ``qwen2.5_real_vocab``: the miniature Qwen2.5 of ``tests/real_checkpoints.py`` (vocab 151,936,
   hidden 64, 2 layers, fp32; the vocabulary matrices are almost all of it).

Each repetition: the trainer (this process) syncs the weights (``HttpEngine.sync_weights``, gloo
group: pause retract, broadcast, flush, continue, version check) without a release (``sync_s``:
what every step pays anyway), then ``/release_memory_occupation`` (all tags: ``release_s``),
``/resume_memory_occupation`` (``resume_s``) and the same sync again (``resync_s``). The server's
resident memory (``VmRSS`` of its process) is read before the release, after it, after the resume
and after the re-sync; a seeded request's tokens after the re-sync are compared with the ones
before the release. Medians over the repetitions are reported with every value.
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

import requests
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from popo_mega.rollout.engine import SamplingParams  # noqa: E402
from popo_mega.rollout.http_engine import HttpEngine  # noqa: E402
from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers  # noqa: E402

FLAGS = ("--enable-deterministic-inference", "--enable-memory-saver")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``/proc/<pid>/status`` VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def quickstart_model(path: str) -> str:
    from popo_mega.rewards.synthetic import load_tokenizer
    from popo_mega.train.warmstart import build_tiny_qwen2

    build_tiny_qwen2(load_tokenizer()).save_pretrained(path)
    return path


def real_vocab_model(path: str) -> str:
    from tests.real_checkpoints import build_checkpoint

    return build_checkpoint("qwen2.5", path).path


def shapes(path: str) -> dict:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads,
            "intermediate_size": c.intermediate_size, "tie_word_embeddings": bool(c.tie_word_embeddings)}


def _post(url: str, path: str, body: dict) -> float:
    t = time.perf_counter()
    r = requests.post(url + path, json=body, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
    return time.perf_counter() - t


def bench(name: str, path: str, reps: int, tmp: str) -> dict:
    from transformers import AutoModelForCausalLM

    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = [(k, v.detach()) for k, v in trainer.state_dict().items()]
    param_bytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
    servers = launch_servers("embedded", path, num_servers=1, device="cpu", dtype="float32", log_dir=tmp,
                             health_timeout_s=300, extra_args=FLAGS)
    server = servers[0]
    url, pid = server.url, server.process.pid
    engine = HttpEngine([url], sync_method="distributed", sync_backend="gloo", request_timeout_s=300,
                        verify_probes=False)
    probe = [[3, 4, 5, 6]]
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=11)
    rows = []
    try:
        engine.sync_weights(state, "warm")  # forms the group
        want = [c.output_ids for c in engine.generate(probe, sampling)[0]]
        for rep in range(reps):
            t = time.perf_counter()
            engine.sync_weights(state, f"plain{rep}")
            sync_s = time.perf_counter() - t
            rss_before = rss_bytes(pid)
            release_s = _post(url, "/release_memory_occupation", {})
            rss_released = rss_bytes(pid)
            resume_s = _post(url, "/resume_memory_occupation", {})
            rss_resumed = rss_bytes(pid)
            refused = requests.post(url + "/generate", json={"input_ids": probe[0]}, timeout=30)
            t = time.perf_counter()
            engine.sync_weights(state, f"resync{rep}")
            resync_s = time.perf_counter() - t
            rss_resynced = rss_bytes(pid)
            got = [c.output_ids for c in engine.generate(probe, sampling)[0]]
            rows.append({"rep": rep, "sync_s": sync_s, "release_s": release_s, "resume_s": resume_s,
                         "resync_s": resync_s, "rss_before_mib": rss_before / 2**20,
                         "rss_released_mib": rss_released / 2**20, "rss_resumed_mib": rss_resumed / 2**20,
                         "rss_resynced_mib": rss_resynced / 2**20,
                         "rss_freed_mib": (rss_before - rss_released) / 2**20,
                         "generate_before_resync": f"HTTP {refused.status_code}: {refused.text[:160]}",
                         "outputs_match": got == want})
            print(name, json.dumps(rows[-1]), flush=True)
    finally:
        engine.close()
        stop_servers(servers)

    def med(key):
        return statistics.median(r[key] for r in rows)

    return {"model": name, "device": "cpu", "dtype": "float32", "shapes": shapes(path),
            "parameters": sum(p.numel() for p in trainer.parameters()), "parameter_mib": param_bytes / 2**20,
            "server_flags": ["--strict-sglang", *FLAGS], "server_threads": 1, "reps": reps,
            "median": {k: med(k) for k in ("sync_s", "release_s", "resume_s", "resync_s", "rss_before_mib",
                                           "rss_released_mib", "rss_resumed_mib", "rss_resynced_mib",
                                           "rss_freed_mib")},
            "all_outputs_match": all(r["outputs_match"] for r in rows), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "colocated_release_cpu.json"))
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("quickstart", quickstart_model), ("qwen2.5_real_vocab", real_vocab_model)):
            path = build(os.path.join(tmp, name))
            results.append(bench(name, path, args.reps, tmp))
    out = {"benchmark": "colocated_release", "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                      "torch": torch.__version__, "trainer_threads": 1},
           "note": "release = /release_memory_occupation of all tags with --enable-memory-saver and no CPU backup "
                   "(the weights' storage is freed; their content is lost and re-sent); sync_s is the sync every "
                   "step pays anyway, so colocated mode adds release_s + resume_s + (resync_s - sync_s)",
           "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
