"""bf16 POPO train steps of a ~0.5B Qwen2 at TP=1 on one GPU, with the embedded rollout server.

    python benchmarks/gpu/train_step.py [--steps 4] [--out benchmarks/results/train_step_cuda.json]
    python benchmarks/gpu/train_step.py --smoke      # the same code path on the CPU, tiny fp32 model

Per step, as popo_mega.train.loop does it: rollouts from the embedded server (``popo-rollout-server``
in its own process, HF transformers in bf16 on the same GPU), ``PolicyTrainer.train_step`` (EMA
target pass, forward + backward through megatron-core with the fused kernels, optimizer, EMA
update), then the weight sync of the EMA into the server. Reports generated tokens/s, trained
tokens/s (``tokens_fed`` / wall time of ``train_step``), the trainer's peak CUDA memory
(``torch.cuda.max_memory_allocated`` of this process; the server's memory is separate), and
sync seconds, per step and as medians over the steps after the first (warm-up).

Simplified, and why: the model is RANDOM (Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads,
2 KV heads, FFN 4,864, vocab 151,936, tied embeddings; no weights can be downloaded on the device),
so no reward could be earned; rewards are therefore assigned, not graded: half of each group's
rollouts are marked positive with equal POPO weights, which is what the train step sees in a run
with a 50 % pass rate. Prompts are random token ids (64 tokens). The weight sync goes through disk
(``/update_weights_from_disk``): trainer and server share one GPU, where NCCL's broadcast refuses
two ranks on one device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
# --smoke: the same code path on the CPU in seconds (checks the script, measures nothing)
TINY = dict(QWEN25_05B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def save_random_qwen2(path: str, shape: dict, device: str, dtype: torch.dtype) -> int:
    """A random Qwen2 of ``shape`` (initialised on ``device``: seconds on a GPU); returns its size."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=None, bos_token_id=None,
                                             pad_token_id=None)).to(dtype)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="max new tokens per rollout (no EOS: all are this long)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--kernels", default="extension", choices=["extension", "reference", "auto"])
    p.add_argument("--out", default=None, help="default benchmarks/results/train_step_cuda.json (--smoke: none)")
    p.add_argument("--smoke", action="store_true", help="tiny fp32 model on the CPU, 2 steps of 2 x 4 rollouts")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, shape = "cpu", "float32", TINY
        args.steps, args.prompts, args.group, args.new_tokens = 2, 2, 4, 8
    else:
        device, dtype, shape = "cuda", "bfloat16", QWEN25_05B
        args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "train_step_cuda.json")
        if not torch.cuda.is_available():
            print("train_step.py: needs a CUDA device (or --smoke)", file=sys.stderr)
            return 2
    cuda = device == "cuda"

    from popo_mega.config import load_config
    from popo_mega.model.loader import build_from_hf
    from popo_mega.rollout.engine import SamplingParams
    from popo_mega.rollout.http_engine import HttpEngine
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers
    from popo_mega.runtime import initialize
    from popo_mega.train.batch import RolloutSample
    from popo_mega.train.loop import sync_engine_weights
    from popo_mega.train.step import PolicyTrainer

    tmp = tempfile.mkdtemp(prefix="popo_train_step_")
    model_path = os.path.join(tmp, "model")
    n_params = save_random_qwen2(model_path, shape, device, getattr(torch, dtype))
    overrides = [f"model.hf_path={model_path}", f"model.dtype={dtype}", "model.transformer_impl=local",
                 f"train.output_dir={os.path.join(tmp, 'run')}", f"train.micro_batch_tokens={args.micro_batch_tokens}",
                 f"train.kernels={args.kernels}", "train.lr=1.0e-6", f"rollout.group_size={args.group}",
                 f"data.prompts_per_step={args.prompts}", f"rollout.max_new_tokens={args.new_tokens}",
                 "algorithm.popo.predictor_hidden=1024"]
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart_cpu.yaml"), overrides)
    rt = initialize(1, 1, seed=0, device=device)
    t0 = time.perf_counter()
    trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt))
    build_s = time.perf_counter() - t0
    servers = launch_servers("embedded", model_path, num_servers=1, device=device, dtype=dtype,
                             log_dir=tmp, health_timeout_s=600)
    rows = []
    try:
        # verify_probes off: a probe mismatch would abort the throughput measurement (tests check it)
        engine = HttpEngine([servers[0].url], servers=servers, sync_method="disk", verify_probes=False,
                            disk_dir=os.path.join(tmp, "sync"), request_timeout_s=1200)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
        g = torch.Generator().manual_seed(0)
        for step in range(args.steps):
            prompts = [torch.randint(0, shape["vocab_size"], (64,), generator=g).tolist() for _ in range(args.prompts)]
            t0 = time.perf_counter()
            completions = engine.generate(prompts, sampling, n=args.group)
            rollout_s = time.perf_counter() - t0
            samples, uid = [], 0
            for prompt, group in zip(prompts, completions):
                positives = len(group) // 2
                for j, c in enumerate(group):
                    samples.append(RolloutSample(
                        tokens=torch.tensor(prompt + list(c.output_ids), dtype=torch.int64), prompt_len=len(prompt),
                        old_logp=torch.tensor(c.output_logprobs, dtype=torch.float32),
                        weight=1.0 / positives if j < positives else 0.0, advantage=1.0 if j < positives else -1.0,
                        positive=j < positives, uid=uid))
                    uid += 1
            generated = sum(len(c.output_ids) for group in completions for c in group)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            stats = trainer.train_step(samples)
            if cuda:
                torch.cuda.synchronize()
            train_s = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            failure = sync_engine_weights(trainer, engine, use_ema=True, version=f"step{step + 1}")
            sync_s = time.perf_counter() - t0
            if failure is not None:
                raise RuntimeError(f"weight sync failed at step {step + 1}: {failure}")
            fed = float(stats.get("tokens_fed", 0.0))
            rows.append({"step": step + 1, "rollouts": len(samples), "generated_tokens": generated,
                         "rollout_s": round(rollout_s, 3), "generated_tokens_per_s": round(generated / rollout_s, 1),
                         "tokens_fed": fed, "train_s": round(train_s, 3), "train_tokens_per_s": round(fed / train_s, 1),
                         "peak_memory_gib": round(peak / 2 ** 30, 3), "sync_s": round(sync_s, 3),
                         "loss": float(stats.get("loss", float("nan")))})
            print(rows[-1], flush=True)
    finally:
        stop_servers(servers)
        shutil.rmtree(tmp, ignore_errors=True)   # the model and the synced weights: GBs at 0.5B
    steady = rows[1:] or rows
    med = lambda k: statistics.median(r[k] for r in steady)  # noqa: E731
    result = {
        "bench": "train_step", "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(), "dtype": dtype,
        "tp": 1, "model": {**shape, "parameters": n_params, "weights": "random"}, "kernels": args.kernels,
        "prompts_per_step": args.prompts, "group_size": args.group, "prompt_tokens": 64,
        "new_tokens": args.new_tokens, "micro_batch_tokens": args.micro_batch_tokens, "positives_per_group": args.group // 2,
        "build_s": round(build_s, 2), "weight_sync": "disk (one GPU shared by trainer and server)",
        "peak_memory": "torch.cuda.max_memory_allocated of the trainer process during train_step",
        "median_after_first_step": {k: med(k) for k in ("generated_tokens_per_s", "train_tokens_per_s", "train_s",
                                                         "rollout_s", "sync_s", "peak_memory_gib")},
        "steps": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result["median_after_first_step"]), "->", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
