"""Time and memory of the fused kernels (popo_mega.ops) against their eager references.

    python benchmarks/kernels.py [--device cpu|cuda] [--threads 2] [--out benchmarks/results/kernels_cpu.csv]
                                 [--no-compile] [--quick]

For each op, forward + backward is timed (median over repeats after a warm-up) for:
  eager       the pure-PyTorch reference twin (``*_ref``)
  compile     ``torch.compile`` of the reference (kernel 1: of the naive full-vocab fp32
              log_softmax formulation, since the reference's chunk loop and collectives are not
              a sensible compile target)
  naive_fp32  kernel 1 only: upcast the shard to fp32, log_softmax, gather, entropy (eager)
  megatron    kernel 1 only: megatron-core's fused_vocab_parallel_cross_entropy on the same
              logits (a 1-process gloo group on CPU); it computes the loss only, no entropy
  extension   the compiled kernel (popo_mega._C)
Effective bandwidth counts the bytes each op must move at least (inputs read, outputs written,
forward + backward) and is reported as % of the bandwidth of ``torch.clone`` (read + write)
measured in the same run. Extra memory is the peak memory above the inputs during one forward
+ backward, including the gradient buffer (CPU: VmHWM - VmRSS of a fresh process per measurement, after resetting the peak;
CUDA: torch.cuda.max_memory_allocated).
Writes one CSV row per (op, impl, dtype) with device, thread count, dtype and shapes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from popo_mega import ops  # noqa: E402
from popo_mega.ops import _extension  # noqa: E402

ESIZE = {torch.float32: 4, torch.bfloat16: 2}


# ----------------------------------------------------------------------------- problems
def problem(name, dtype, device, quick=False, vocab=19008):
    """Inputs for one op: returns (inputs dict, shape string, minimal bytes moved fwd+bwd)."""
    g = torch.Generator().manual_seed(0)
    e = ESIZE[dtype]
    if name == "logprob_entropy":
        T, V = (1024, vocab) if quick else (8192, vocab)
        if torch.device(device).type == "cuda":  # 1.2e9 normals at V=152,064: draw them on the GPU (CPU: seconds each time)
            g = torch.Generator(device=device).manual_seed(0)
        kw = dict(generator=g, device=g.device)
        inp = dict(logits=(torch.randn(T, V, **kw) * 2).to(dtype), target=torch.randint(0, V, (T,), **kw),
                   g_lp=torch.randn(T, **kw), g_ent=torch.randn(T, **kw))
        return _to(inp, device), f"T={T} V/tp={V}", 3 * T * V * e          # fwd read, bwd read + write
    if name == "clipped_surrogate":
        N = 1 << 17 if quick else 1 << 20
        old = -torch.rand(N, generator=g) * 3
        inp = dict(logp=(old + torch.randn(N, generator=g) * 0.3).to(dtype), old=old.to(dtype),
                   adv=torch.randn(N, generator=g).to(dtype), mask=torch.rand(N, generator=g) > 0.1,
                   grad=torch.randn(N, generator=g).to(dtype))
        return _to(inp, device), f"N={N}", N * (4 * e + 1) + N * (5 * e + 1)
    if name == "masked_mean_pool":
        T, H, L = (1 << 17, 128, 512) if quick else (1 << 20, 128, 512)
        B = T // L
        inp = dict(hidden=torch.randn(T, H, generator=g).to(dtype), cu=torch.arange(0, T + 1, L),
                   mask=torch.rand(T, generator=g) > 0.3, grad=torch.randn(B, H, generator=g).to(dtype))
        return _to(inp, device), f"T={T} H={H} B={B}", (T * H * e + T + B * H * e) + (B * H * e + T + T * H * e)
    if name == "cosine_penalty":
        B, H = (1024, 4096) if quick else (4096, 4096)
        inp = dict(pred=torch.randn(B, H, generator=g).to(dtype), target=torch.randn(B, H, generator=g).to(dtype),
                   weights=torch.rand(B, generator=g))
        return _to(inp, device), f"B={B} H={H}", 2 * B * H * e + 3 * B * H * e
    raise ValueError(name)


def _to(inp, device):
    return {k: v.to(device) for k, v in inp.items()}


def _naive_logprob_entropy(logits, target):
    lsm = torch.log_softmax(logits.float(), dim=-1)
    return lsm.gather(1, target[:, None]).squeeze(1), -(lsm.exp() * lsm).sum(-1)


_COMPILED = {}


def step_fn(name, impl, inp):
    """A closure that runs forward + backward once (inputs with requires_grad set inside)."""
    if name == "logprob_entropy":
        z, t, g_lp, g_ent = inp["logits"], inp["target"], inp["g_lp"], inp["g_ent"]
        if impl == "megatron":
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
            group = _gloo_group() if z.device.type == "cpu" else _nccl_group()

            def run():
                x = z.detach().clone().requires_grad_(True)   # megatron may write into its input
                loss = fused_vocab_parallel_cross_entropy(x[:, None, :], t[:, None], group)
                loss.backward(g_lp[:, None])
            return run
        if impl in ("naive_fp32", "compile"):
            fn = _naive_logprob_entropy
            if impl == "compile":
                fn = _COMPILED.setdefault(name, torch.compile(_naive_logprob_entropy))
        else:
            fn = (lambda x, y: ops.logprob_entropy(x, y, impl="extension")) if impl == "extension" else ops.logprob_entropy_ref

        def run():
            x = z.detach().requires_grad_(True)
            x.grad = None
            lp, ent = fn(x, t)
            torch.autograd.backward([lp, ent], [g_lp, g_ent])
        return run
    ref = {"clipped_surrogate": ops.clipped_surrogate_ref, "masked_mean_pool": ops.masked_mean_pool_ref,
           "cosine_penalty": ops.cosine_penalty_ref}[name]
    if impl == "extension":
        kernel = {"clipped_surrogate": ops.clipped_surrogate, "masked_mean_pool": ops.masked_mean_pool,
                  "cosine_penalty": ops.cosine_penalty}[name]
        fn = lambda *a: kernel(*a, impl="extension")  # noqa: E731
    elif impl == "compile":
        fn = _COMPILED.setdefault(name, torch.compile(ref))
    else:
        fn = ref
    if name == "clipped_surrogate":
        def run():
            x = inp["logp"].detach().requires_grad_(True)
            loss, _ = fn(x, inp["old"], inp["adv"], inp["mask"], 0.2, 0.28)
            loss.backward(inp["grad"])
        return run
    if name == "masked_mean_pool":
        def run():
            h = inp["hidden"].detach().requires_grad_(True)
            fn(h, inp["cu"], inp["mask"]).backward(inp["grad"])
        return run

    def run():
        p = inp["pred"].detach().requires_grad_(True)
        fn(p, inp["target"], inp["weights"], 100.0).backward()
    return run


_GROUPS = {}


def _gloo_group():
    import torch.distributed as dist
    if "gloo" not in _GROUPS:
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        _GROUPS["gloo"] = dist.new_group([0])
    return _GROUPS["gloo"]


def _nccl_group():
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return dist.group.WORLD


def _free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- measuring
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(run, device, min_time=1.0, max_reps=10):
    run()          # warm-up (and compilation)
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clone_bandwidth(device):
    x = torch.empty(1 << 27, dtype=torch.uint8, device=device).fill_(1)   # 128 MiB
    t = time_it(lambda: x.clone(), device)
    return 2 * x.numel() / t


def memory_probe(name, impl, dtype_name, device_name, threads, vocab=19008):
    """Peak extra bytes of one forward+backward (run in a fresh process on CPU)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    inp, _, _ = problem(name, getattr(torch, dtype_name), device, vocab=vocab)
    run = step_fn(name, impl, inp)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Reset the kernel's peak-RSS counter (Linux >= 4.0), return freed heap to the OS, then
    # measure the high-water mark of one forward + backward above the resident inputs.
    import ctypes
    import gc
    run()          # warm-up: loads libraries, starts the thread pool, builds kernels' caches
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    run()
    return (_status_kb("VmHWM") - base) * 1024


def _status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_in_subprocess(name, impl, dtype_name, device_name, threads, vocab=19008):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", name, impl, dtype_name, "--device", device_name,
           "--threads", str(threads), "--vocab", str(vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


IMPLS = {"logprob_entropy": ["eager", "naive_fp32", "compile", "megatron", "extension"],
         "clipped_surrogate": ["eager", "compile", "extension"],
         "masked_mean_pool": ["eager", "compile", "extension"],
         "cosine_penalty": ["eager", "compile", "extension"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--ops", default=",".join(IMPLS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    ap.add_argument("--vocab", default="19008", help="kernel 1 vocab shard sizes, comma separated "
                    "(19008 = Qwen 152,064 at TP=8; 152064 = TP=1)")
    ap.add_argument("--memory-probe", nargs=3, metavar=("OP", "IMPL", "DTYPE"))
    args = ap.parse_args(argv)
    if args.memory_probe:
        print(json.dumps({"bytes": memory_probe(*args.memory_probe, args.device, args.threads, int(args.vocab))}))
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not _extension.load():
        sys.exit(f"popo_mega._C is not built; build it with: {_extension.BUILD_COMMAND}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"kernels_{device.type}.csv")
    clone_bw = clone_bandwidth(device)
    print(f"device={dev_name} threads={args.threads} clone bandwidth {clone_bw / 1e9:.2f} GB/s", flush=True)
    rows = []
    cases = [(name, dtype_name, int(v)) for name in args.ops.split(",") for dtype_name in args.dtypes.split(",")
             for v in (args.vocab.split(",") if name == "logprob_entropy" else ["0"])]
    for name, dtype_name, vocab in cases:
        dtype = getattr(torch, dtype_name)
        inp, shape, nbytes = problem(name, dtype, device, args.quick, vocab=vocab or 19008)
        eager_t = None
        for impl in IMPLS[name]:
            if impl == "compile" and args.no_compile:
                continue
            try:
                t = time_it(step_fn(name, impl, inp), device)
            except Exception as exc:  # e.g. megatron or inductor unavailable: record why
                print(f"  {name} {impl} {dtype_name}: failed: {type(exc).__name__}: {exc}"[:300], flush=True)
                rows.append(dict(device=device.type, device_name=dev_name, threads=args.threads, op=name,
                                 impl=impl, dtype=dtype_name, shape=shape, note=f"failed: {type(exc).__name__}"))
                continue
            if impl == "eager":
                eager_t = t
            mem = None
            if not args.no_memory and not (impl == "compile" and device.type == "cpu") and not args.quick:
                mem = (memory_in_subprocess(name, impl, dtype_name, args.device, args.threads, vocab or 19008)
                       if device.type == "cpu" else
                       memory_probe(name, impl, dtype_name, args.device, args.threads, vocab or 19008))
            bw = nbytes / t
            row = dict(device=device.type, device_name=dev_name, threads=args.threads, op=name, impl=impl,
                       dtype=dtype_name, shape=shape, direction="fwd+bwd", time_ms=round(t * 1e3, 3),
                       speedup_vs_eager=round(eager_t / t, 2) if eager_t else "",
                       extra_mem_MB=round(mem / 2 ** 20, 1) if mem is not None else "",
                       min_bytes_MB=round(nbytes / 2 ** 20, 1), eff_GBps=round(bw / 1e9, 2),
                       pct_clone_bw=round(100 * bw / clone_bw, 1), clone_GBps=round(clone_bw / 1e9, 2),
                       torch=torch.__version__, note="")
            rows.append(row)
            print(f"  {name:18s} {impl:10s} {dtype_name:9s} {shape:22s} {t * 1e3:9.2f} ms  "
                  f"x{row['speedup_vs_eager']!s:5s} mem {row['extra_mem_MB']!s:>8s} MB  "
                  f"{row['pct_clone_bw']:5.1f}% clone bw", flush=True)
    fields = ["device", "device_name", "threads", "op", "impl", "dtype", "shape", "direction", "time_ms",
              "speedup_vs_eager", "extra_mem_MB", "min_bytes_MB", "eff_GBps", "pct_clone_bw", "clone_GBps", "torch",
              "note"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    print(f"wrote {out}")


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main()
