"""Training checkpoints with megatron-core ``dist_checkpointing``: save, find the latest complete one,
resume at the same or a different TP/PP layout.

    path = save_checkpoint(trainer, "runs/x/checkpoints", extra={"data_cursor": 128}, keep_last=2)
    info = load_checkpoint(trainer, "runs/x/checkpoints")   # None when there is none
    # info = {"step": 10, "extra": {...}, "path": ..., "rng_restored": True}

Contents: the policy (megatron's sharded state dict), the optimizer (the distributed optimizer in
the ``fully_reshardable`` format), the fp32 EMA (each tensor wrapped with the sharding metadata of
the parameter it averages, key prefix ``ema.``), the predictor (replicated, last stage), the LR
scheduler, the step, the caller's ``extra`` (data cursor etc., JSON-like) and per-rank RNG
states (python, numpy, torch, megatron's model-parallel tracker).

Atomicity: everything is written into ``ROOT/.tmp_step_XXXXXXXX``; when every rank has finished,
global rank 0 writes the marker file ``popo_checkpoint.json`` into it, then the manifest
``popo_manifest.json`` (size and SHA-256 of every file, popo_mega/train/checkpoint_manifest.py;
each rank hashes the shards it wrote), and renames it to ``ROOT/step_XXXXXXXX``. A directory
without the marker (a crash mid-save, a copy in progress) is never loaded. ROOT must be on a file
system that every rank sees.

Integrity and safe loading (issue 15): before anything of a checkpoint is unpickled, the ranks
verify it against its manifest (missing, truncated, changed or unlisted files; ``.metadata``
through an allow-list unpickler). A checkpoint that fails is reported file by file and the
previous complete one is tried; when none passes, the error lists every one tried. Then every
``torch.load`` of the load (megatron's ``common.pt``, torch DCP's byte entries, which its
DefaultLoadPlanner.load_bytes reads with ``weights_only=False``) runs with ``weights_only=True``
(:func:`weights_only_loads`); what we save is plain tensors, dicts, lists, ints, floats and
strings for that (:func:`_rng_state`: numpy's RNG state as a tensor). Only checkpoints this run
(or another trusted one) wrote are loaded: docs/architecture.md says why.

Known megatron-core 0.16.1 pitfalls handled here (../shared/design/environment.md):

* Where Adam keeps its step counter depends on the optimizer megatron picked
  (megatron/core/optimizer/__init__.py:12-34 and 359-363): torch.optim.Adam/AdamW (no TE, no apex)
  keep a 0-dim tensor per parameter, ``state[p]["step"]``; Transformer Engine's FusedAdam keeps
  ONE int per param group, ``param_groups[i]["step"]``, and its state_dict()/load_state_dict()
  raise KeyError on any per-parameter key but exp_avg / exp_avg_sq / master_param. Every
  per-parameter ``step`` fix below is applied to the torch layout only (:func:`_steps_per_parameter`).
* Adam creates its state at its first real step; megatron saves no state it does not have. A
  checkpoint before the first optimizer step (or after skipped steps only) would fail
  (distrib_optimizer.py:641 ``assert len(steps) == 1``; its parameter-state gather needs exp_avg),
  so save and load first give every parameter the state the first step would create
  (:func:`_init_optimizer_state`: zero moments, torch layout: ``step`` 0).
* A fresh optimizer's state is initialised before load; after load with the distributed optimizer
  every torch Adam parameter state shared ONE ``step`` tensor (torch Adam then increments it once
  per parameter and the bias correction goes wrong) — :func:`_unshare_adam_steps` gives each
  parameter its own copy.
* The LR scheduler's load_state_dict adds the saved step count to its current one; it is reset to
  0 first (the trainer had moved it to 1), or every resumed run would be one LR step ahead.

RNG states are restored only when the layout (TP, PP, DP) is the one that saved them; after a
re-layout the seeds of the new layout stay (the run is then not bit-identical, by construction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import time
import warnings

import torch
import torch.distributed as dist

from popo_mega.train import checkpoint_manifest as manifest
from popo_mega.train.checkpoint_manifest import CheckpointIntegrityError

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "export_hf", "MARKER",
           "CheckpointIntegrityError"]

MARKER = "popo_checkpoint.json"
_DIR = re.compile(r"^step_(\d{8})$")
_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of the COMPLETE checkpoints under ``root`` (marker present), oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _layout(trainer) -> dict:
    return {"tp": trainer.rt.tp, "pp": trainer.rt.pp, "dp": trainer.rt.dp}


def _rng_state() -> dict:
    """Per-rank RNG states as plain values ``torch.load(weights_only=True)`` reads without any
    allow-listed class: python's (version, tuple of ints, gauss), torch ByteTensors, and numpy's
    MT19937 state as a dict with its 624 keys in an int64 tensor (np.random.get_state() is a tuple
    holding a uint32 ndarray, which needs numpy's unpickling globals)."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", None) or [opt])


def _steps_per_parameter(inner: torch.optim.Optimizer) -> bool:
    """True when ``inner`` keeps Adam's step counter per parameter, as a 0-dim tensor
    ``state[p]["step"]``: torch.optim.Adam / AdamW, megatron-core's fallback without TE and apex
    (its distributed optimizer then reads and writes that per-parameter step,
    distrib_optimizer.py:639-643 and 817-825). False for Transformer Engine's (and apex's)
    FusedAdam: ONE int ``param_groups[i]["step"]``, created at the group's first step; its
    per-parameter state holds only exp_avg, exp_avg_sq (and master_param), and its state_dict()
    maps every per-parameter key through ``name_to_dtype_map``, so an added ``step`` raises
    KeyError('step') (TE transformer_engine/pytorch/optimizers/fused_adam.py: step(),
    get_unscaled_state(), state_dict(), set_scaled_state()). Decided by the class of the object that
    holds the state, not by guessing which optimizer megatron would have picked."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _init_optimizer_state(opt) -> None:
    """Give every parameter the Adam state its first real optimizer step would create, where it has
    none yet: zero exp_avg / exp_avg_sq (megatron's own ``init_state_fn``) and, in the torch layout
    only, a zero ``step`` tensor of its own (what torch Adam's ``_init_group`` creates; Adam then
    counts 0 -> 1 and the bias correction of the first real step is unchanged). Parameters that
    already have state are left alone.

    Needed before save when no real step was taken yet (the first steps were skipped, or step 0):
    the distributed optimizer's state_dict() needs a ``step`` in every torch Adam state
    (distrib_optimizer.py:641 ``assert len(steps) == 1`` fails on none) and its parameter-state
    gather reads exp_avg / exp_avg_sq of every parameter. Needed before load because
    dist_checkpointing loads into existing state. No dummy optimizer step: that would add a
    ``step`` to the parameter state, which the fully_reshardable loader rejects."""
    for o in _optimizers(opt):
        if getattr(o, "init_state_fn", None) is not None:
            o.init_state_fn(o.optimizer, o.config)
        if _steps_per_parameter(o.optimizer):
            for state in o.optimizer.state.values():
                if state:
                    state.setdefault("step", torch.zeros((), dtype=torch.float32))


def _load_optimizer(opt, state) -> None:
    """``opt.load_state_dict(state)``, working around megatron-core 0.16.1's distributed optimizer
    with the torch Adam fallback: its ``load_state_dict`` puts a "step" into every parameter state
    and then the fully_reshardable loader fails (KeyError 'step': the checkpoint's parameter state
    carries no step). So the non-parameter part is loaded first (it restores the step into every
    state), the step is set aside while the parameter state is loaded, then put back.

    Without the distributed optimizer megatron saves the torch step as ``common_step`` and copies it
    into every parameter state on load, but saves it only when it is truthy (optimizer.py:845 and
    1033, ``if step:``): a checkpoint taken before the first real step has none, and torch Adam
    refuses a state without ``step`` (adam.py ``__setstate__``: KeyError). A zero common step is
    put back here."""
    subs = _optimizers(opt)
    parts = [state] if len(subs) == 1 else [v for _, v in sorted(state.items())]
    for o, part in zip(subs, parts):
        per_param = _steps_per_parameter(o.optimizer)
        if not hasattr(o, "load_parameter_state_from_fully_reshardable"):
            inner = part["optimizer"] if "optimizer" in part else part   # Float16Optimizer / FP32Optimizer
            if per_param and inner["state"]:
                inner["state"].setdefault("common_step", torch.zeros((), dtype=torch.float32))
            o.load_state_dict(part)
            continue
        param_state = part.pop("param_state", None)
        o.load_state_dict(part)
        if param_state is None:
            continue
        kind = part.get("param_state_sharding_type")
        if kind != "fully_reshardable":
            raise ValueError(f"checkpoint: optimizer state in format {kind!r}, expected fully_reshardable")
        steps = {p: st.pop("step") for p, st in o.optimizer.state.items() if "step" in st} if per_param else {}
        o.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            o.optimizer.state[p]["step"] = step


def _unshare_adam_steps(opt) -> int:
    """Give every parameter's torch Adam state its own ``step`` tensor; returns how many were
    shared. Nothing to do in the FusedAdam layout (one int per param group)."""
    shared = 0
    for o in _optimizers(opt):
        if not _steps_per_parameter(o.optimizer):
            continue
        seen: set[int] = set()
        for state in o.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    shared += 1
                seen.add(id(step))
                state["step"] = step.clone()
    return shared


def _sharded_state(trainer, is_loading: bool, with_rng: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    rt = trainer.rt
    model_sd = trainer.model.sharded_state_dict(metadata=dict(_SHARDING))
    state: dict = {"model": model_sd}
    params_sd = dict(model_sd)
    if trainer.predictor is not None:
        pred_sd = {}
        for name, t in trainer.predictor.state_dict(keep_vars=True).items():
            pred_sd[name] = ShardedTensor.from_rank_offsets(f"popo_predictor.{name}", t,
                                                            replica_id=(0, rt.tp_rank, rt.dp_rank))
        state["predictor"] = pred_sd
        params_sd.update({f"popo_predictor.{k}": v for k, v in pred_sd.items()})
    if trainer.ema is not None:
        ema = dict(trainer.ema.named_tensors())
        ema_sd = {}
        for name, sh in model_sd.items():
            if name not in ema:
                continue
            if isinstance(sh, ShardedTensor):
                ema_sd[name] = dataclasses.replace(sh, key=f"ema.{sh.key}", data=ema[name], dtype=ema[name].dtype)
            elif isinstance(sh, ShardedTensorFactory):   # e.g. SwiGLU linear_fc1, split [gate; up] on save
                ema_sd[name] = dataclasses.replace(sh, key=f"ema.{sh.key}", data=ema[name])
        missing = sorted(set(ema) - set(ema_sd))
        if missing:
            raise RuntimeError(f"checkpoint: EMA tensors without sharding metadata in the model: {missing[:5]}")
        state["ema"] = ema_sd
    state["optimizer"] = trainer.optimizer.sharded_state_dict(params_sd, is_loading=is_loading,
                                                              metadata=dict(_SHARDING))
    if with_rng:
        state["rng"] = ShardedObject("popo_rng_state", _rng_state(), (rt.pp, rt.tp, rt.dp),
                                     (rt.pp_rank, rt.tp_rank, rt.dp_rank), replica_id=0)
    return state


def save_checkpoint(trainer, root: str, extra: dict | None = None, keep_last: int = 2) -> str:
    """Write a checkpoint of ``trainer`` at ``trainer.step`` under ``root``; collective over all
    ranks. Returns the final directory. Older complete checkpoints beyond ``keep_last`` (>= 1) and
    stale temporary directories are removed by rank 0."""
    from megatron.core import dist_checkpointing

    if keep_last < 1:
        raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
    step = trainer.step
    final = _step_dir(root, step)
    tmp = os.path.join(root, f".tmp_step_{step:08d}")
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    _init_optimizer_state(trainer.optimizer)   # before the first real step there is no Adam state
    state = _sharded_state(trainer, is_loading=False, with_rng=True)
    state["popo"] = {"step": step, "scheduler": trainer.scheduler.state_dict(), "extra": extra or {},
                     "layout": _layout(trainer), "algorithm": trainer.algo.name,
                     "ema_meta": None if trainer.ema is None else
                     {k: v for k, v in trainer.ema.state_dict().items() if k != "shadow"}}
    dist_checkpointing.save(state, tmp)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"step": step, "layout": _layout(trainer), "algorithm": trainer.algo.name,
                       "saved_at": time.time()}, f)
    _write_manifest(tmp, rank)
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):
            if name.startswith(".tmp_step_") and name != os.path.basename(tmp):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    dist.barrier()
    return final


def _write_manifest(tmp: str, rank: int) -> None:
    """Collective, after every rank's files and the marker exist in ``tmp``: each rank hashes the
    files it wrote (checkpoint_manifest.files_hashed_by), rank 0 gathers them, hashes whatever no
    rank took (so every file present is listed once) and writes the manifest last."""
    world = dist.get_world_size()
    names = manifest.files_of(tmp)
    mine = manifest.hash_files(tmp, manifest.files_hashed_by(names, rank, world))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        entries = {k: v for part in gathered for k, v in part.items()}
        present = manifest.files_of(tmp)
        entries.update(manifest.hash_files(tmp, [n for n in present if n not in entries]))
        manifest.write_manifest(tmp, {n: entries[n] for n in present})


def _verify(path: str) -> list[str]:
    """Collective: the problems of checkpoint ``path`` (checkpoint_manifest.verify_checkpoint), the
    files shared out over the ranks; every rank returns the same list."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = manifest.verify_checkpoint(path, rank, world)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return [p for part in every for p in part]


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside runs with ``weights_only=True``: torch's documented switch
    TORCH_FORCE_WEIGHTS_ONLY_LOAD, which also overrides an explicit ``weights_only=False``
    (torch/serialization.py, torch.load). Needed because torch DCP's DefaultLoadPlanner.load_bytes
    (torch 2.13, default_planner.py:387-391), which megatron-core 0.16.1's MCoreLoadPlanner inherits,
    unpickles every byte entry (our RNG state, the layers' ``_extra_state``) with
    ``weights_only=False``, and megatron creates that planner inside its load strategy, out of our
    reach. TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, if set, is lifted meanwhile (torch refuses both)."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pick_checkpoint(root_or_dir: str) -> str | None:
    """Collective: the checkpoint to load, verified. ``root_or_dir`` a checkpoint directory: it, or
    CheckpointIntegrityError naming its problems. A root: its newest complete checkpoint that passes
    verification, each one that fails reported (one warning on rank 0) and skipped for the previous;
    None when the root holds no complete checkpoint; CheckpointIntegrityError listing every one
    tried when none passes. A directory given explicitly without the marker is incomplete:
    FileNotFoundError."""
    base = os.path.basename(os.path.normpath(root_or_dir))
    if os.path.isfile(os.path.join(root_or_dir, MARKER)):
        candidates, explicit = [root_or_dir], True
    elif _DIR.match(base) or base.startswith(".tmp_step_"):
        raise FileNotFoundError(f"checkpoint {root_or_dir} has no {MARKER}: it was not completely written")
    else:
        candidates, explicit = [p for _, p in reversed(list_checkpoints(root_or_dir))], False
        if not candidates:
            return None
    tried = []
    for path in candidates:
        problems = _verify(path)
        if not problems:
            return path
        tried.append(f"{path}:\n    " + "\n    ".join(problems))
        if explicit:
            raise CheckpointIntegrityError(f"checkpoint {path} fails verification, not loaded:\n    "
                                           + "\n    ".join(problems))
        if dist.get_rank() == 0:
            then = "trying the previous complete one" if path != candidates[-1] else "no earlier one is left"
            warnings.warn(f"checkpoint {path} fails verification, skipped ({then}): " + "; ".join(problems),
                          stacklevel=3)
    raise CheckpointIntegrityError(f"no checkpoint under {root_or_dir} passes verification; tried, newest first:\n"
                                   + "\n".join(tried))


def load_checkpoint(trainer, root_or_dir: str) -> dict | None:
    """Restore ``trainer`` from the latest complete checkpoint under ``root_or_dir`` that passes
    verification (or from that checkpoint directory itself, see :func:`_pick_checkpoint`).
    Collective. Returns {"step", "extra", "path", "rng_restored", "shared_adam_steps_fixed"}, or
    None when there is no complete checkpoint. Every torch.load of it runs with weights_only=True."""
    path = _pick_checkpoint(root_or_dir)
    if path is None:
        return None
    try:
        with weights_only_loads():
            return _load_verified(trainer, path)
    except BaseException as e:   # torch DCP's CheckpointException is a BaseException
        e.add_note(f"while loading checkpoint {path} (it passed verification against its manifest)")
        raise


def _load_verified(trainer, path: str) -> dict:
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(path)["popo"]
    if common["algorithm"] != trainer.algo.name:
        raise ValueError(f"checkpoint {path} was written by algorithm {common['algorithm']!r}, "
                         f"this run is {trainer.algo.name!r}")
    same_layout = common["layout"] == _layout(trainer)
    _init_optimizer_state(trainer.optimizer)
    state = _sharded_state(trainer, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(state, path)
    trainer.model.load_state_dict(loaded["model"], strict=True)
    if trainer.predictor is not None:
        trainer.predictor.load_state_dict(loaded["predictor"])
    _load_optimizer(trainer.optimizer, loaded["optimizer"])
    fixed = _unshare_adam_steps(trainer.optimizer)
    if trainer.ema is not None:
        with torch.no_grad():
            for name, t in trainer.ema.named_tensors():
                t.copy_(loaded["ema"][name])
        meta = common["ema_meta"]
        trainer.ema.step = int(meta["step"])
        trainer.ema.tau, trainer.ema.schedule, trainer.ema.total_steps = meta["tau"], meta["schedule"], meta["total_steps"]
    # megatron's load_state_dict ADDS the saved count to the current one (optimizer_param_scheduler.py:
    # 384, step(increment=num_steps)), as for a fresh scheduler at 0; PolicyTrainer has already moved
    # it to 1 (the first step's LR), which would put every resumed run one LR step ahead.
    trainer.scheduler.num_steps = 0
    trainer.scheduler.load_state_dict(common["scheduler"])
    trainer.step = int(common["step"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    return {"step": trainer.step, "extra": common["extra"], "path": path, "rng_restored": same_layout,
            "shared_adam_steps_fixed": fixed}


def export_hf(trainer, out_dir: str, weights: str = "policy", metadata_dir: str | None = None) -> str:
    """Write the policy (``weights="policy"``) or the EMA target (``"ema"``, cast to the model's
    dtype) as an HF directory that ``from_pretrained`` loads; config and tokenizer files are copied
    from ``metadata_dir`` (default: model.hf_path). Collective over all ranks (see
    popo_mega.model.hf.save_hf_checkpoint). Returns ``out_dir``."""
    from megatron.core import parallel_state as ps

    from popo_mega.model.hf import save_hf_checkpoint

    if weights not in ("policy", "ema"):
        raise ValueError(f"export_hf: weights must be 'policy' or 'ema', got {weights!r}")
    if weights == "ema" and trainer.ema is None:
        raise ValueError(f"export_hf: algorithm {trainer.algo.name!r} keeps no EMA")
    args = (trainer.model, trainer.arch, trainer.layout, out_dir, metadata_dir or trainer.cfg.model.hf_path)
    kw = {"tp_group": ps.get_tensor_model_parallel_group(), "pp_group": ps.get_pipeline_model_parallel_group(),
          "dp_rank": ps.get_data_parallel_rank()}
    if weights == "ema":
        with torch.no_grad(), trainer.ema.swapped_into(trainer.model):
            save_hf_checkpoint(*args, **kw)
    else:
        save_hf_checkpoint(*args, **kw)
    return out_dir
