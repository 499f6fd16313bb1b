"""``popo-convert``: HF <-> Megatron checkpoints, and a parity check users can run on real models.

    popo-convert hf-to-mcore HF_DIR OUT_DIR [--tp N] [--pp M] [--ep E]
    popo-convert mcore-to-hf MCORE_DIR OUT_DIR [--tp N] [--pp M] [--ep E]
    popo-convert mcore-to-hf RUN/checkpoints/step_XXXXXXXX OUT_DIR --hf-dir HF_DIR [--weights ema]
    popo-convert verify HF_DIR [--tp N] [--pp M] [--ep E] [--dtype float32] [--tol 1e-4]

A Megatron checkpoint is a megatron-core ``dist_checkpointing`` directory (loadable at any TP/PP
layout) plus ``popo_mega_checkpoint.json`` and the HF config/tokenizer files under ``hf/``. ``mcore-to-hf``
also exports a popo-train checkpoint (``popo_checkpoint.json``; its policy or, ``--weights ema``, its
EMA target): it holds no HF files, so ``--hf-dir`` names the run's ``model.hf_path`` for them.
``--ep`` (mixture-of-experts models) splits each layer's experts over E ranks, which are data-parallel
ranks for the dense layers. Run under torchrun, or let the command start TP x PP x EP local processes itself (gloo on CPU, NCCL on
GPU). ``verify`` prints the max abs logits difference as its last line and exits 1 above ``--tol``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from popo_mega.config import ModelConfig

CHECKPOINT_META = "popo_mega_checkpoint.json"
TRAIN_MARKER = "popo_checkpoint.json"   # popo_mega.train.checkpoint.MARKER (not imported: that pulls in megatron)
FIXED_PROMPT = "Janet has 3 apples and buys 5 more. How many apples does she have? The answer is"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="popo-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, src in (("hf-to-mcore", "HF_DIR"), ("mcore-to-hf", "MCORE_DIR"), ("verify", "HF_DIR")):
        s = sub.add_parser(name)
        s.add_argument("src", metavar=src)
        if name != "verify":
            s.add_argument("out", metavar="OUT_DIR")
        s.add_argument("--tp", type=int, default=1)
        s.add_argument("--pp", type=int, default=1)
        s.add_argument("--ep", type=int, default=1, help="expert parallelism (MoE models): experts split over E ranks")
        s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="model dtype (default: float32 for verify, the checkpoint's torch_dtype otherwise)")
        if name == "mcore-to-hf":
            s.add_argument("--hf-dir", default=None,
                           help="a popo-train checkpoint's config and tokenizer: the run's model.hf_path")
            s.add_argument("--weights", choices=["policy", "ema"], default="policy",
                           help="a popo-train checkpoint's policy (default) or EMA target")
        if name == "verify":
            s.add_argument("--tol", type=float, default=None,
                           help="max abs logits difference allowed (default 1e-4 in float32, 0.1 in 16-bit)")
    return p


def _hf_dtype(hf_dir: str) -> str:
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    return dt if dt in ("float32", "bfloat16", "float16") else "float32"


def _check_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise SystemExit(f"popo-convert: {what} '{path}' is not a directory")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check_dir(args.src, "source")
    if args.command == "mcore-to-hf":
        _check_mcore_source(args)
    if args.command != "mcore-to-hf":
        from popo_mega.config import ConfigError, read_hf_config
        from popo_mega.model.builder import Architecture

        try:
            arch = Architecture.from_hf(read_hf_config(args.src, where="HF_DIR"), source=f"{args.src}/config.json")
        except ConfigError as e:
            raise SystemExit(f"popo-convert: {e}") from None
        for what, n, size in (("--tp", args.tp, arch.num_kv_heads), ("--pp", args.pp, arch.num_layers)):
            if size % n:
                raise SystemExit(f"popo-convert: {what} {n} does not divide the model's "
                                 f"{'key/value heads' if what == '--tp' else 'layers'} ({size})")
        _check_expert_parallel(args.ep, arch)
        _check_safetensors_headers(args.src)
    results = launch(_worker, args.tp * args.pp * args.ep, args)
    return int(results[0]) if results else 0


def _check_safetensors_headers(hf_dir: str) -> None:
    """Open the header of every safetensors file the conversion reads (the index's shards, or
    model.safetensors) before any process starts: a corrupted or truncated file is then an error
    naming it. safetensors' own error names no file ("Error while deserializing header:
    HeaderTooLarge") and came as a traceback from inside the worker (issue 15). A missing file is
    left to the reader, which names it."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"popo-convert: {index}: not a readable safetensors index "
                             f"({type(e).__name__}: {e})") from None
    else:
        files = ["model.safetensors"]
    for name in files:
        path = os.path.join(hf_dir, str(name))
        if not os.path.isfile(path):
            continue
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                f.keys()
        except Exception as e:  # safetensors raises SafetensorError, and OSError for unreadable files
            raise SystemExit(f"popo-convert: {path}: not a readable safetensors file "
                             f"({type(e).__name__}: {e})") from None


def _check_expert_parallel(ep: int, arch) -> None:
    if ep < 1:
        raise SystemExit(f"popo-convert: --ep must be >= 1, got {ep}")
    if ep > 1 and not arch.is_moe:
        raise SystemExit(f"popo-convert: --ep {ep} needs a mixture-of-experts model ({arch.model_type} is dense)")
    if arch.is_moe and arch.num_experts % ep:
        raise SystemExit(f"popo-convert: --ep {ep} does not divide the model's {arch.num_experts} experts")


def _is_train_checkpoint(src: str) -> bool:
    return os.path.isfile(os.path.join(src, TRAIN_MARKER))


def _check_mcore_source(args) -> None:
    """mcore-to-hf's source: a popo-convert checkpoint, or a popo-train one with --hf-dir."""
    if _is_train_checkpoint(args.src):
        if not args.hf_dir:
            raise SystemExit(f"popo-convert: '{args.src}' is a popo-train checkpoint, which holds no config or "
                             "tokenizer: pass --hf-dir, the run's model.hf_path")
        if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
            raise SystemExit(f"popo-convert: --hf-dir '{args.hf_dir}' has no config.json")
        from popo_mega.train.checkpoint_manifest import verify_checkpoint

        problems = verify_checkpoint(args.src)  # before anything in it is unpickled (issue 15)
        if problems:
            raise SystemExit(f"popo-convert: '{args.src}' fails its manifest check, not converted: "
                             + "; ".join(problems))
        return
    if not os.path.isfile(os.path.join(args.src, CHECKPOINT_META)):
        raise SystemExit(f"popo-convert: '{args.src}' has neither {CHECKPOINT_META} (popo-convert) nor "
                         f"{TRAIN_MARKER} (popo-train): not a Megatron checkpoint this command reads")
    if args.weights == "ema":
        raise SystemExit(f"popo-convert: --weights ema: '{args.src}' is a popo-convert checkpoint, which has no EMA")


def _saved_dtype(ckpt_dir: str) -> str:
    """The dtype the policy was trained in: that of the saved word embeddings (first stage) or output layer."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in meta:
            return str(meta[key].dtype).replace("torch.", "")
    raise SystemExit(f"popo-convert: '{ckpt_dir}' holds no embedding or output layer")


def launch(fn, world_size: int, *args) -> list:
    """Run ``fn(*args)`` on every rank: directly under torchrun, else in ``world_size`` local processes."""
    from popo_mega.runtime import free_port, under_launcher

    if under_launcher() or world_size == 1:
        return [fn(*args)]
    import tempfile

    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_spawned, args=(world_size, port, tmp, fn, args), nprocs=world_size,
                           start_method="spawn", join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _spawned(rank, world_size, port, tmp, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.save(fn(*args), os.path.join(tmp, f"{rank}.pt"))


def _worker(args) -> int:
    from popo_mega import runtime as rt_mod
    from popo_mega.model import hf as hfmod
    from popo_mega.model.loader import build_from_hf

    rt = rt_mod.initialize(args.tp, args.pp, seed=0, device=args.device, expert_parallel=args.ep)
    try:
        if args.command == "hf-to-mcore":
            dtype = args.dtype or _hf_dtype(args.src)
            loaded = build_from_hf(ModelConfig(hf_path=args.src, dtype=dtype, transformer_impl="local"), rt)
            save_mcore(loaded.model, args.out, args.src, dtype, rt)
            if rt.rank == 0:
                print(f"wrote Megatron checkpoint (tp={args.tp}, pp={args.pp}, ep={args.ep}, {dtype}) to {args.out}")
            return 0
        if args.command == "mcore-to-hf":
            train = _is_train_checkpoint(args.src)
            meta_dir = args.hf_dir if train else os.path.join(args.src, "hf")
            if train:
                dtype = args.dtype or _saved_dtype(args.src)
            else:
                with open(os.path.join(args.src, CHECKPOINT_META)) as f:
                    dtype = args.dtype or json.load(f)["dtype"]
            cfg = ModelConfig(hf_path=meta_dir, dtype=dtype, load_weights=False, transformer_impl="local")
            loaded = build_from_hf(cfg, rt)
            load_mcore(loaded.model, args.src, prefix="ema." if args.weights == "ema" else "")
            from megatron.core import parallel_state as ps

            hfmod.save_hf_checkpoint(loaded.model, loaded.arch, loaded.layout, args.out, meta_dir,
                                     tp_group=ps.get_tensor_model_parallel_group(),
                                     pp_group=ps.get_pipeline_model_parallel_group(),
                                     dp_rank=ps.get_data_parallel_rank())
            if rt.rank == 0:
                print(f"wrote HF checkpoint to {args.out}")
            return 0
        return _verify(args, rt)
    finally:
        rt_mod.shutdown()


def save_mcore(model, out_dir: str, hf_dir: str, dtype: str, rt) -> None:
    """megatron-core dist_checkpointing save of ``model`` plus the metadata mcore-to-hf needs."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from popo_mega.model.hf import copy_hf_metadata

    os.makedirs(out_dir, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    if rt.rank == 0:
        copy_hf_metadata(hf_dir, os.path.join(out_dir, "hf"))
        with open(os.path.join(out_dir, CHECKPOINT_META), "w") as f:
            json.dump({"format": "megatron-core dist_checkpointing", "dtype": dtype,
                       "saved_tp": rt.tp, "saved_pp": rt.pp, "saved_ep": rt.ep}, f, indent=2)
    dist.barrier()


def load_mcore(model, ckpt_dir: str, prefix: str = "") -> None:
    """Load ``model`` from a dist_checkpointing directory; ``prefix`` "ema." reads a popo-train
    checkpoint's EMA, saved under the policy's keys with that prefix (popo_mega/train/checkpoint.py)."""
    import dataclasses

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sharded = model.sharded_state_dict()
    if prefix:   # the EMA holds the parameters only (no extra states), in fp32: cast on load below
        params = dict(model.named_parameters())
        sharded = {name: dataclasses.replace(sh, key=prefix + sh.key) for name, sh in sharded.items()
                   if name in params and isinstance(sh, (ShardedTensor, ShardedTensorFactory))}
    from popo_mega.train.checkpoint import weights_only_loads

    with weights_only_loads():   # torch DCP would unpickle the byte entries with weights_only=False
        state = dist_checkpointing.load(sharded, ckpt_dir)
    model.load_state_dict(state, strict=False)


def _fixed_prompt_ids(hf_dir: str, vocab_size: int) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(hf_dir)(FIXED_PROMPT)["input_ids"]
        if ids:
            return torch.tensor([ids])
    except Exception:  # no tokenizer files: a fixed id pattern is just as good for parity
        pass
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (1, 24), generator=g)


def _verify(args, rt) -> int:
    from megatron.core import parallel_state as ps

    from popo_mega.model.forward import forward_only
    from popo_mega.model.loader import build_from_hf, gather_vocab

    dtype = args.dtype or "float32"
    tol = args.tol if args.tol is not None else (1e-4 if dtype == "float32" else 0.1)
    loaded = build_from_hf(ModelConfig(hf_path=args.src, dtype=dtype, transformer_impl="local"), rt)
    ids = _fixed_prompt_ids(args.src, loaded.arch.vocab_size).to(rt.device)
    pos = torch.arange(ids.shape[1], device=rt.device).unsqueeze(0)
    tp_group = ps.get_tensor_model_parallel_group()
    outs = forward_only(loaded.model, [{"tokens": ids, "position_ids": pos}],
                        lambda out, batch: gather_vocab(out, loaded.arch.vocab_size, tp_group).float().cpu())
    diff = torch.tensor([0.0])
    if outs and rt.tp_rank == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.src, dtype=getattr(torch, dtype)).to(rt.device).eval()
        with torch.no_grad():
            ref = hf(ids).logits.float().cpu()
        diff = (outs[0] - ref).abs().max().reshape(1)
    diff = _max_over_world(diff, rt)
    if rt.rank == 0:
        print(f"tp={args.tp} pp={args.pp} ep={args.ep} dtype={dtype} tokens={ids.shape[1]} tolerance={tol:g}")
        print(f"max abs logits difference: {diff:.3e}")
    return 0 if diff <= tol else 1


def _max_over_world(x: torch.Tensor, rt) -> float:
    import torch.distributed as dist

    t = x.to(rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


if __name__ == "__main__":
    sys.exit(main())
