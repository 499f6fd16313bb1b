"""Rollout benchmarks: embedded-server generation throughput, and weight-sync time vs bytes.

    python benchmarks/rollout.py [--out benchmarks/results/rollout_cpu.json] [--quick]
    python benchmarks/rollout.py --real-vocab [--out benchmarks/results/rollout_real_vocab_cpu.json]

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
3. ``--real-vocab``: the embedded server's sampler (``generation.generate_batch``, what the server
   runs per batch) against ``transformers`` ``generate`` (do_sample, T = 1, top_p = 1, top_k off, no
   EOS so every row makes all its tokens) on the same model in the same process, same batch, same
   thread count: the miniature Qwen2.5 checkpoint of ``tests/real_checkpoints.py`` (vocab 151,936,
   hidden 64, 2 layers, fp32; needs the test packages of launch/requirements-test-nodeps.txt), 32
   chat-template prompts of the real tokenizer, 24 new tokens each. Seeded: every row of ours has
   its own sampling seed, ``transformers`` seeds the global generator (it has no per-row streams);
   unseeded: the generator only. Third contender: the same model behind ``popo-rollout-server``
   (same thread count, --enable-deterministic-inference) driven over HTTP by ``HttpEngine``, one
   /generate per prompt, all 32 in flight (seeded). The contenders alternate within each
   repetition (order flipped every repetition) and medians are reported, because the machine's
   cores are shared.
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


def _chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` chat-template prompts of different lengths (arithmetic questions), as token ids."""
    prompts = []
    for i in range(count):
        question = f"What is {7 + i} * {3 + 2 * i}?" + " Show your work." * (i % 4)
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(tokenizer.encode(text))
    return prompts


def bench_real_vocab(tmp: str, quick: bool, threads: int = 2) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from popo_mega.rollout.generation import SequenceRequest, generate_batch
    from tests.real_checkpoints import build_checkpoint

    torch.set_num_threads(threads)
    ckpt = build_checkpoint("qwen2.5", os.path.join(tmp, "real_qwen25"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    batch, new_tokens, repeats = (8, 8, 2) if quick else (32, 24, 5)
    prompts = _chat_prompts(tokenizer, batch)
    pad = tokenizer.pad_token_id  # <|endoftext|>
    width = max(map(len, prompts))
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for a decoder-only model
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    hf_config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=pad)

    def run_hf(seeded: bool, rep: int) -> int:
        if seeded:
            torch.manual_seed(1000 + rep)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=hf_config)
        return int((out.shape[1] - width) * batch)

    def run_ours(seeded: bool, rep: int) -> int:
        seqs = [SequenceRequest(prompt=p, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens,
                                seed=1000 * rep + i if seeded else None) for i, p in enumerate(prompts)]
        generate_batch(model, seqs, pad_token_id=pad, eos_token_ids=frozenset(),
                       generator=torch.Generator().manual_seed(rep), device=torch.device("cpu"))
        return sum(len(s.output_ids) for s in seqs)

    servers = launch_servers("embedded", ckpt.path, num_servers=1, device="cpu", log_dir=tmp, health_timeout_s=300,
                             extra_args=("--num-threads", str(threads), "--enable-deterministic-inference"))
    engine = HttpEngine([servers[0].url], max_in_flight=batch, request_timeout_s=600)

    def run_http(seeded: bool, rep: int) -> int:  # one /generate per prompt, all in flight at once
        out = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=new_tokens,
                                                      seed=1000 * rep))
        return sum(len(c.output_ids) for row in out for c in row)

    contenders = {("transformers_generate", False): run_hf, ("transformers_generate", True): run_hf,
                  ("embedded_server_generate_batch", False): run_ours,
                  ("embedded_server_generate_batch", True): run_ours, ("embedded_server_http", True): run_http}
    seconds: dict = {key: [] for key in contenders}
    tokens: dict = {}
    try:
        for (name, seeded), fn in contenders.items():  # warm-up (first-call allocations, lazy imports)
            fn(seeded, 0)
        for rep in range(repeats):
            order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
            for key in order:
                t0 = time.perf_counter()
                tokens[key] = contenders[key](key[1], rep + 1)
                seconds[key].append(time.perf_counter() - t0)
                print(key, round(seconds[key][-1], 3), "s", flush=True)
    finally:
        stop_servers(servers)
    shape = {"model": "miniature Qwen2.5 (tests/real_checkpoints.py)", "vocab_size": ckpt.vocab_size,
             "hidden_size": model.config.hidden_size, "num_layers": model.config.num_hidden_layers,
             "batch": batch, "prompt_tokens_min_max": [min(map(len, prompts)), max(map(len, prompts))],
             "new_tokens": new_tokens}
    rows = []
    for (name, seeded), times in seconds.items():
        median = statistics.median(times)
        rows.append({"bench": "real_vocab_generation", "contender": name, "seeded": seeded, "device": "cpu",
                     "threads": threads, "dtype": "float32", **shape, "repeats": repeats,
                     "generated_tokens": tokens[(name, seeded)], "seconds_each": [round(t, 3) for t in times],
                     "median_s": round(median, 3), "tokens_per_s": round(tokens[(name, seeded)] / median, 1)})
    for ours in rows:
        if ours["contender"] != "transformers_generate":
            theirs = next(r for r in rows
                          if r["contender"] == "transformers_generate" and r["seeded"] == ours["seeded"])
            ours["speedup_vs_transformers_generate"] = round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
            print(f"{ours['contender']} seeded={ours['seeded']}: {ours['tokens_per_s']} vs {theirs['tokens_per_s']} "
                  f"tokens/s = {ours['speedup_vs_transformers_generate']}x", flush=True)
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
    p.add_argument("--real-vocab", action="store_true",
                   help="only the vocab-151,936 comparison with transformers generate (2 threads)")
    p.add_argument("--note", default="", help="added to the result's meta (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    if args.real_vocab:
        out = args.out if "--out" in " ".join(argv or sys.argv) else os.path.join(
            ROOT, "benchmarks", "results", "rollout_real_vocab_cpu.json")
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_real_vocab(tmp, args.quick)
        meta = {"host_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": args.note}
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
        return 0
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
