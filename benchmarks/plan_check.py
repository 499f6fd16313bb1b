"""Check popo-plan (popo_mega.plan) against the memory of real tiny Megatron trainers on CPU.

    python benchmarks/plan_check.py [--out benchmarks/results/plan_check_cpu.json]

For each case (a tiny Qwen2 / Llama-3 / Qwen3-MoE checkpoint from tests/tiny_models.py, a TP/PP/DP/EP
layout, a recompute mode) a real ``PolicyTrainer`` (megatron GPTModel + DDP + megatron optimizer + fp32 EMA +
predictor, bf16) is built in 2 gloo processes and one POPO step runs (target pass, forward,
backward, Adam step). Measured, per rank:

  weights    sum of the model's parameter bytes
  grads      sum of the fp32 ``main_grad`` bytes (views into DDP's grad buffer; the buffer's own size,
             which includes megatron's alignment padding, is reported as ``grad_buffer``)
  optimizer  fp32 main-parameter copies + Adam exp_avg / exp_avg_sq of every optimizer (model + predictor)
  ema        the EMA's fp32 shadow tensors
  served_ema the served EMA's resident tensors: none since it became a view (train/served_model.py,
             edf933c); the planner's served_ema is the sync's transient, so the planned resident is 0
  predictor  the predictor's parameter + main_grad bytes
  saved      activations kept for backward by the training forward: the bytes of the distinct storages
             handed to autograd's saved-tensor hook (parameters excluded), one micro-batch
             (``saved_by_kind``: the same bytes by dtype and shape of the first tensor on each storage)
  MoE        ``expert_params`` (this rank's experts), ``routed_tokens``: the token copies this rank's
             experts received in each layer of the training forward; the planner is also evaluated at
             the measured routing (``expert_load`` = their mean / the balanced T x top-k)

and compared with the planner's terms for the same architecture and layout (``attention="math"``:
the CPU attention is SDPA's math path over a [T, T] segment mask, so the score matrices count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# (name, model, tp, pp, distributed_optimizer, recompute, ep) -- all in a world of 2 processes.
CASES = (
    ("qwen2_tp2", "qwen2", 2, 1, True, "none", 1),
    ("qwen2_tp1_dp2_distopt", "qwen2", 1, 1, True, "none", 1),
    ("qwen2_tp1_dp2_no_distopt", "qwen2", 1, 1, False, "none", 1),
    ("qwen2_tp2_full_recompute", "qwen2", 2, 1, True, "full", 1),
    ("llama_tied_tp1_dp2", "llama", 1, 1, True, "none", 1),
    ("llama_tied_pp2", "llama", 1, 2, True, "none", 1),
    ("qwen3_moe_ep1_dp2", "qwen3_moe", 1, 1, True, "none", 1),
    ("qwen3_moe_ep2_dp2", "qwen3_moe", 1, 1, True, "none", 2),
    ("qwen3_moe_ep2_no_distopt", "qwen3_moe", 1, 1, False, "none", 2),
    ("qwen3_moe_tp2_sp", "qwen3_moe", 2, 1, True, "none", 1),
)
PREDICTOR_HIDDEN = 32
# The tiny Qwen3-MoE of tests/tiny_models.py with 8 experts, top-2 (so that EP=2 holds 4 per rank).
MOE_OVERRIDES = {"num_experts": 8}


def make_samples(n: int, vocab: int, seed: int = 0):
    """n positive rollouts of 6..13 tokens (prompt 2..4)."""
    from popo_mega.train.batch import RolloutSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P = int(torch.randint(2, 5, (1,), generator=g))
        R = int(torch.randint(4, 10, (1,), generator=g))
        toks = torch.randint(1, vocab, (P + R,), generator=g)
        out.append(RolloutSample(toks, P, old_logp=-torch.rand(R, generator=g) * 3, weight=1.0 / n,
                                 positive=True, uid=i))
    return out


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def measure_case(path: str, tp: int, pp: int, distopt: bool, recompute: str, n_samples: int = 6, ep: int = 1,
                 sequence_parallel: bool = False) -> dict:
    """One rank's measured memory terms for a fresh trainer at this layout (parallel_state is set up
    here and torn down at the end; the process group must exist)."""
    from megatron.core import parallel_state

    from popo_mega.config import config_from_dict
    from popo_mega.model.loader import build_from_hf
    from popo_mega.runtime import initialize
    from popo_mega.train.step import PolicyTrainer

    model = {"hf_path": path, "dtype": "bfloat16", "transformer_impl": "local"}
    if recompute != "none":
        model["recompute_granularity"] = recompute
    cfg = config_from_dict({"model": model,
                            "parallel": {"tensor": tp, "pipeline": pp, "sequence_parallel": sequence_parallel,
                                         "distributed_optimizer": distopt, "expert": ep},
                            "train": {"lr": 1e-3, "micro_batch_tokens": 4096, "steps": 5, "seed": 3},
                            "algorithm": {"popo": {"predictor_hidden": PREDICTOR_HIDDEN, "noise_std": 0.0}}})
    rt = initialize(tp, pp, seed=0, device="cpu", expert_parallel=ep)
    try:
        trainer = PolicyTrainer(cfg, rt, build_from_hf(cfg.model, rt, sequence_parallel=sequence_parallel))
        samples = make_samples(n_samples, trainer.arch.vocab_size)
        tokens = sum(s.tokens.numel() for s in samples)
        param_ptrs = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
        if trainer.predictor is not None:
            param_ptrs |= {p.untyped_storage().data_ptr() for p in trainer.predictor.parameters()}
        saved: dict[int, int] = {}        # packed during the forward
        recomputed: dict[int, int] = {}   # packed during backward (full recompute re-running layers)
        kinds: dict[int, str] = {}        # storage -> "dtype[shape]" of the first tensor seen on it

        def pack(t):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() not in param_ptrs and s.data_ptr() != 0:
                    into = recomputed if torch._C._current_graph_task_id() != -1 else saved
                    into[s.data_ptr()] = max(into.get(s.data_ptr(), 0), s.nbytes())
                    kinds.setdefault(s.data_ptr(), f"{str(t.dtype)[6:]}{list(t.shape)}")
            return t

        # MoE: the token copies each rank's experts receive in each layer's forward (routing decides
        # them, so the planner's balanced T*k is compared with the sum over the EP ranks).
        routed: list[int] = []
        hooks = [m.register_forward_pre_hook(lambda mod, args: routed.append(int(args[0].shape[0]))
                                             if torch.is_grad_enabled() else None)
                 for name, m in trainer.model.named_modules() if name.endswith("mlp.experts")]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stats = trainer.train_step(samples)
        for h in hooks:
            h.remove()
        by_kind: dict[str, int] = {}
        for ptr, nbytes in saved.items():
            by_kind[kinds[ptr]] = by_kind.get(kinds[ptr], 0) + nbytes
        # Optimizer tensors: a main param whose storage is a parameter's (an fp32 parameter or its
        # distributed-optimizer shard view) is no copy; Adam state is the predictor's when its main
        # param lives in the predictor's storage.
        pred_ptrs = ({p.untyped_storage().data_ptr() for p in trainer.predictor.parameters()}
                     if trainer.predictor is not None else set())
        opt_bytes = pred_opt_bytes = 0
        opts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
        for opt in opts:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    ptr = p.untyped_storage().data_ptr()
                    state = sum(_bytes(v) for v in opt.optimizer.state.get(p, {}).values()
                                if isinstance(v, torch.Tensor) and v.numel() > 1)   # exp_avg, exp_avg_sq
                    if ptr in pred_ptrs:
                        pred_opt_bytes += state
                    else:
                        opt_bytes += state + (0 if ptr in param_ptrs else _bytes(p))  # + fp32 main copy
        params = list(trainer.model.parameters())
        out = {
            "rank": rt.rank, "tp_rank": rt.tp_rank, "pp_rank": rt.pp_rank, "dp_rank": rt.dp_rank, "dp": rt.dp,
            "tokens": tokens, "num_microbatches": stats.get("num_microbatches"), "skipped": stats.get("skipped"),
            "params": sum(p.numel() for p in params),
            "weights": sum(_bytes(p) for p in params),
            "grads": sum(_bytes(p.main_grad) for p in params),
            "grad_buffer": sum(_bytes(b.grad_data) for b in trainer.ddp_model.buffers
                               + trainer.ddp_model.expert_parallel_buffers),
            "expert_params": sum(p.numel() for n, p in trainer.model.named_parameters() if ".experts." in n),
            "optimizer": opt_bytes,
            "ema": sum(_bytes(t) for t in trainer.ema._shadow.values()),
            "served_ema": _served_own_bytes(trainer),
            "predictor": pred_opt_bytes + (sum(_bytes(p) + _bytes(p.main_grad) for p in trainer.predictor.parameters())
                                           if trainer.predictor is not None else 0),
            "saved": sum(saved.values()),
            "recomputed": sum(recomputed.values()),
            "layers": trainer.model.config.num_layers // pp,
            "routed_tokens": routed,   # per MoE layer of the training forward (the target pass runs without grad)
            "saved_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        }
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _world(rank, world_size, paths, cases):
    out = {}
    for name, model, tp, pp, distopt, recompute, ep in cases:
        out[name] = measure_case(paths[model], tp, pp, distopt, recompute, ep=ep,
                                 sequence_parallel=model == "qwen3_moe" and tp > 1)
    return out


def build_tiny(tmp: str) -> dict:
    from tests.tiny_models import llama3_config, qwen2_config, qwen3_moe_config, save_tiny

    paths = {"qwen2": os.path.join(tmp, "qwen2"), "llama": os.path.join(tmp, "llama"),
             "qwen3_moe": os.path.join(tmp, "qwen3_moe")}
    save_tiny(qwen2_config(), paths["qwen2"])
    save_tiny(llama3_config(), paths["llama"])
    save_tiny(qwen3_moe_config(**MOE_OVERRIDES), paths["qwen3_moe"])
    return paths


def model_shapes() -> dict:
    """The tiny models' shapes, as recorded in the results."""
    from tests.tiny_models import llama3_config, qwen2_config, qwen3_moe_config

    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")
    configs = {"qwen2": qwen2_config(), "llama": llama3_config(), "qwen3_moe": qwen3_moe_config(**MOE_OVERRIDES)}
    return {name: {k: getattr(c, k) for k in keys if getattr(c, k, None) is not None} for name, c in configs.items()}


def run_cases(paths: dict, cases=CASES) -> dict:
    """{case name: [per-rank measurements]} from one world of 2 processes."""
    from tests.multiprocess import run_world

    per_rank = run_world(_world, 2, paths, cases, timeout=240 + 60 * len(cases))
    return {name: [r[name] for r in per_rank] for name, *_ in cases}


def _served_own_bytes(trainer) -> int:
    """Bytes of the tensors the served EMA refers to that are neither the model's nor the EMA's: what it
    keeps resident of its own (0 for POPO's view, which casts on read; 0 without an EMA)."""
    if trainer.served is None:
        return 0
    theirs = {t.untyped_storage().data_ptr() for t in trainer.model.state_dict(keep_vars=True).values()
              if isinstance(t, torch.Tensor)}
    theirs |= {t.untyped_storage().data_ptr() for t in trainer.ema._shadow.values()}
    own = {}
    for entry in trainer.served._entries.values():
        t = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in theirs:
            own[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(own.values())


def planned(path: str, tp: int, pp: int, distopt: bool, recompute: str, tokens: int, pp_rank: int, ep: int = 1,
            sequence_parallel: bool = False, expert_load: float = 1.0) -> dict:
    """The planner's terms for a measured case (bf16, math attention over the whole packed micro-batch;
    MoE: routing balanced unless ``expert_load`` says how far the measured routing is from it)."""
    from popo_mega.config import read_hf_config
    from popo_mega.model.builder import Architecture
    from popo_mega.plan import Layout, activation_bytes, plan_stage

    arch = Architecture.from_hf(read_hf_config(path))
    dp = 2 // (tp * pp)
    lay = Layout(tp=tp, pp=pp, dp=dp, ep=ep, distributed_optimizer=distopt, sequence_parallel=sequence_parallel,
                 recompute=recompute, micro_batch_tokens=tokens, seq_len=tokens, impl="local", num_microbatches=1,
                 predictor_hidden=PREDICTOR_HIDDEN, expert_load=expert_load)
    st = plan_stage(arch, lay, pp_rank)
    act = activation_bytes(arch, lay, pp_rank)
    last = pp_rank == pp - 1
    vs = st["params_detail"]["vocab_padded"] // tp
    saved_logits = lay.param_bytes * tokens * vs if last else 0
    return {**{k: st["terms"][k] for k in ("weights", "grads", "optimizer", "ema", "predictor")},
            "served_ema": 0,   # resident: none (the planner's served_ema term is the sync's transient)
            "params": st["params"], "expert_params": st["params_detail"]["experts"],
            "saved": act["stored"] + act["head"] + saved_logits,
            "recomputed_per_layer": act["working"], "dp_shard": dp if distopt else 1,
            "expert_dp_shard": dp // ep if distopt else 1}


def compare(paths: dict, measured: dict, cases=CASES) -> list[dict]:
    rows = []
    for name, model, tp, pp, distopt, recompute, ep in cases:
        sp = model == "qwen3_moe" and tp > 1
        for m in measured[name]:
            p = planned(paths[model], tp, pp, distopt, recompute, m["tokens"], m["pp_rank"], ep, sp)
            row = {"case": name, "model": model, "tp": tp, "pp": pp, "ep": ep, "sequence_parallel": sp, "dp": m["dp"],
                   "distributed_optimizer": distopt, "recompute": recompute, "rank": m["rank"], "pp_rank": m["pp_rank"],
                   "tokens": m["tokens"],
                   "measured": {k: m[k] for k in ("params", "expert_params", "weights", "grads", "grad_buffer",
                                                   "optimizer", "ema", "served_ema", "predictor", "saved",
                                                   "recomputed")},
                   "planned": p, "saved_ratio": m["saved"] / p["saved"] if p["saved"] else None,
                   "recomputed_per_layer_ratio": (m["recomputed"] / m["layers"] / p["recomputed_per_layer"]
                                                  if recompute == "full" else None)}
            if m["routed_tokens"]:
                # the routing of this rank's experts, as the planner's expert_load: copies received per
                # layer (mean over the layers) / the balanced T x top-k
                from popo_mega.config import read_hf_config

                k = read_hf_config(paths[model])["num_experts_per_tok"]
                load = sum(m["routed_tokens"]) / len(m["routed_tokens"]) / (m["tokens"] * k)
                at = planned(paths[model], tp, pp, distopt, recompute, m["tokens"], m["pp_rank"], ep, sp, load)
                row.update(routed_tokens=m["routed_tokens"], expert_load=load, planned_saved_at_measured_load=at["saved"],
                           saved_ratio_at_measured_load=m["saved"] / at["saved"],
                           saved_by_kind=m["saved_by_kind"])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "plan_check_cpu.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_tiny(tmp)
        rows = compare(paths, run_cases(paths))
    for r in rows:
        m, p = r["measured"], r["planned"]
        print(f"{r['case']:<26} rank {r['rank']} " + " ".join(
            f"{k}={m[k]}/{p[k]:.0f}" for k in ("weights", "grads", "optimizer", "ema", "served_ema", "predictor",
                                                "saved"))
              + f" saved ratio {r['saved_ratio']:.3f}"
              + (f" recomputed/layer ratio {r['recomputed_per_layer_ratio']:.3f}" if r["recomputed_per_layer_ratio"] else "")
              + (f" routed {r['routed_tokens']} (load {r['expert_load']:.3f}; ratio at it "
                 f"{r['saved_ratio_at_measured_load']:.3f})" if r.get("routed_tokens") else ""))
    payload = {"what": "popo-plan terms (planned) vs measured bytes of real tiny bf16 megatron trainers on CPU, "
                       "2 gloo processes per case (benchmarks/plan_check.py)",
               "device": "cpu, 2 gloo processes x 1 torch thread", "dtype": "bfloat16 (fp32 grads, main params, "
               "Adam state, EMA)", "impl": "local (megatron local spec + SDPAttention)",
               "models": model_shapes(), "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
               "rows": rows}
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
