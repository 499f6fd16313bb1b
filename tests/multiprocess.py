"""Run a function in N local processes, the way torchrun would, for gloo tests of distributed maths.

    results = run_world(fn, world_size, *args)   # fn(rank, world_size, *args) in each process

Each process gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK set and one torch thread;
``fn`` initialises whatever it needs (``popo_mega.runtime.initialize`` or a plain gloo group).
Its return value is pickled back per rank. An exception in any rank fails the call with that
rank's traceback; a hang is cut at ``timeout`` seconds.
"""

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from popo_mega.runtime import free_port


def _entry(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise
    finally:
        if torch.distributed.is_initialized():
            try:
                from megatron.core import parallel_state
                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            torch.distributed.destroy_process_group()


def run_world(fn, world_size: int, *args, timeout: float = 300.0):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        import time
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"run_world({getattr(fn, '__name__', fn)}) did not finish in {timeout:.0f}s")
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            payload = torch.load(path, weights_only=False)
            if not payload["ok"]:
                raise AssertionError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
