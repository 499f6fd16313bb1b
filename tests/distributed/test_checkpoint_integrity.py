"""Damaged and crafted checkpoints (issue 15, items 7-8), TP=2 in two gloo processes.

A run saves step 1 and step 2; each case copies the checkpoints and damages step 2, then a fresh
trainer resumes from the root:

* a truncated shard, a truncated common.pt, a deleted .metadata, a crafted .metadata (with the
  manifest left as it was, and with the manifest rewritten to match, as whoever can write the
  directory could): step 2 is reported by the path of the file and skipped for step 1, the payload
  never runs (its marker file stays absent), and the resumed run's next step equals the
  uninterrupted run's step 2 bit for bit;
* a crafted RNG entry inside a shard, with .metadata and the manifest rewritten to match (it passes
  verification): torch DCP would unpickle it with weights_only=False; the load refuses it, the
  payload never runs, the error names the checkpoint;
* every checkpoint damaged: one error that lists each one tried; a damaged directory given
  explicitly: an error naming it.

Before the fix the first three ended in a bare EOFError / zip error / AssertionError naming no
path, and both crafted files ran their payload on resume.
"""

import io
import os
import pickle
import shutil
import warnings

import pytest
import torch

from tests.distributed.test_checkpoint_resume import OVER, _fresh
from tests.distributed.test_train_step import make_cfg, make_samples, snapshot
from tests.multiprocess import run_world

pytestmark = pytest.mark.slow   # one 2-process world, 10 trainers built: ~50 s of CPU, 170 s wall on the busy 2-core box

FALLBACK = ("truncated_shard", "truncated_common", "deleted_metadata", "crafted_metadata",
            "crafted_metadata_manifest_rewritten")


class RunsShell:
    """Unpickling this runs a shell command (what a crafted .metadata did on resume, issue 15)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_manifest(d):
    from popo_mega.train import checkpoint_manifest as cm

    cm.write_manifest(d, cm.hash_files(d, cm.files_of(d)))


def _trusted_metadata(d):
    with open(os.path.join(d, ".metadata"), "rb") as f:
        return pickle.load(f)   # written by this test's own run: trusted here


def _craft_rng_entry(d, marker):
    """Replace rank 1's RNG entry inside its shard by a torch.save'd payload; shift the offsets of
    the entries after it in that file, rewrite .metadata and the manifest to match."""
    meta = _trusted_metadata(d)
    (idx, info), = [(i, s) for i, s in meta.storage_data.items() if i.fqn.startswith("popo_rng_state/shard_0.1")]
    buf = io.BytesIO()
    torch.save(RunsShell(marker), buf)
    payload = buf.getvalue()
    path = os.path.join(d, info.relative_path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:info.offset] + payload + data[info.offset + info.length:])
    delta = len(payload) - info.length
    for i, s in meta.storage_data.items():
        if s.relative_path == info.relative_path and s.offset > info.offset:
            s.offset += delta
    info.length = len(payload)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    _rewrite_manifest(d)


def _damage(step_dir, case, marker):
    if case == "truncated_shard":
        shard = sorted(n for n in os.listdir(step_dir) if n.endswith(".distcp"))[-1]
        os.truncate(os.path.join(step_dir, shard), os.path.getsize(os.path.join(step_dir, shard)) // 2)
        return shard
    if case == "truncated_common":
        os.truncate(os.path.join(step_dir, "common.pt"), 1000)
        return "common.pt"
    if case == "deleted_metadata":
        os.remove(os.path.join(step_dir, ".metadata"))
        return ".metadata"
    if case.startswith("crafted_metadata"):
        with open(os.path.join(step_dir, ".metadata"), "wb") as f:
            pickle.dump(RunsShell(marker), f)
        if case.endswith("rewritten"):
            _rewrite_manifest(step_dir)
        return ".metadata"
    if case == "crafted_rng_entry":
        _craft_rng_entry(step_dir, marker)
        return None
    raise ValueError(case)


def _copy_and_damage(rank, root, case, base, steps=(2,)):
    """Rank 0 copies ``root`` to ``base/case`` and damages the given steps; returns the copy, the
    damaged file's name and the payload's marker path (absent unless the payload ran)."""
    import torch.distributed as dist

    where, marker, name = os.path.join(base, case), os.path.join(base, f"{case}.ran"), None
    if rank == 0:
        shutil.copytree(root, where)
        for step in steps:
            name = _damage(os.path.join(where, f"step_{step:08d}"), case, marker)
    dist.barrier()
    return where, name, marker


def _scenario(rank, world_size, path, base):
    from popo_mega.runtime import initialize
    from popo_mega.train import checkpoint as ckpt

    cfg = make_cfg(path, OVER, tensor=2)
    rt = initialize(2, 1, seed=0, device="cpu")
    samples = make_samples()
    root = os.path.join(base, "pristine")
    a = _fresh(cfg, rt)
    a.train_step(samples)
    ckpt.save_checkpoint(a, root, keep_last=5)
    step2 = {"stats": a.train_step(samples), **snapshot(a)}
    ckpt.save_checkpoint(a, root, keep_last=5)
    out = {"step2": step2, "listed": sorted(os.listdir(os.path.join(root, "step_00000002")))}

    for case in FALLBACK:
        where, name, marker = _copy_and_damage(rank, root, case, base)
        b = _fresh(cfg, rt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = ckpt.load_checkpoint(b, where)
        out[case] = {"info": info, "ran": os.path.exists(marker), "name": name, "where": where,
                     "warnings": [str(w.message) for w in caught if "fails verification" in str(w.message)],
                     "resumed": {"stats": b.train_step(samples), **snapshot(b)}}

    from torch.distributed.checkpoint.api import CheckpointException   # a BaseException

    where, _, marker = _copy_and_damage(rank, root, "crafted_rng_entry", base)
    try:
        ckpt.load_checkpoint(_fresh(cfg, rt), where)
        error = None
    except (Exception, CheckpointException) as e:
        error = f"{type(e).__name__}: {e} {getattr(e, '__notes__', '')}"
    out["crafted_rng_entry"] = {"error": error, "ran": os.path.exists(marker), "where": where}

    where, _, _ = _copy_and_damage(rank, root, "truncated_common", os.path.join(base, "all"), steps=(1, 2))
    for case, target in (("none_valid", where), ("explicit", os.path.join(where, "step_00000002"))):
        try:
            ckpt.load_checkpoint(_fresh(cfg, rt), target)
            out[case] = None
        except ckpt.CheckpointIntegrityError as e:
            out[case] = {"error": str(e), "where": where}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory, hf_path):
    base = tmp_path_factory.mktemp("ckpt_integrity")
    return run_world(_scenario, 2, hf_path, str(base)) + [str(base)]


@pytest.mark.parametrize("case", FALLBACK)
def test_damaged_latest_is_named_and_skipped_and_training_continues(results, case):
    *ranks, base = results
    for rank, r in enumerate(ranks):
        c = r[case]
        assert not c["ran"], f"{case}: the crafted payload ran"
        assert c["info"]["step"] == 1 and c["info"]["path"] == os.path.join(c["where"], "step_00000001")
        damaged = os.path.join(c["where"], "step_00000002", ranks[0][case]["name"])   # rank 0 damaged it
        if rank == 0:   # one warning line, naming the file
            assert len(c["warnings"]) == 1 and damaged in c["warnings"][0], c["warnings"]
        else:
            assert c["warnings"] == []
        u, s = r["step2"], c["resumed"]
        assert s["stats"]["loss"] == u["stats"]["loss"]
        for key in ("weights", "ema", "predictor"):
            for name in u[key]:
                assert torch.equal(u[key][name], s[key][name]), f"{case}: {key} {name} differs after the fallback"


def test_checkpoint_files_are_in_the_manifest(results):
    from popo_mega.train.checkpoint_manifest import MANIFEST

    listed = results[0]["listed"]
    assert MANIFEST in listed and "popo_checkpoint.json" in listed and ".metadata" in listed
    assert [n for n in listed if n.startswith("__1_")], listed   # rank 1's shards (it hashed them itself)


def test_crafted_entry_inside_a_shard_is_not_run(results):
    for r in results[:-1]:
        c = r["crafted_rng_entry"]
        assert not c["ran"], "torch DCP unpickled the crafted RNG entry with weights_only=False"
        assert c["error"] is not None and "Weights only load failed" in c["error"]
        assert os.path.join(c["where"], "step_00000002") in c["error"]


def test_no_valid_checkpoint_lists_every_one_tried(results):
    for r in results[:-1]:
        e = r["none_valid"]
        assert e is not None, "loaded a damaged checkpoint"
        for step in (2, 1):
            assert os.path.join(e["where"], f"step_{step:08d}", "common.pt") + ": 1000 bytes" in e["error"]
        assert e["error"].index("step_00000002") < e["error"].index("step_00000001")   # newest first
        x = r["explicit"]
        assert x is not None and x["error"].startswith(f"checkpoint {os.path.join(x['where'], 'step_00000002')} fails")


def test_what_we_save_loads_with_weights_only_and_no_allowlisted_class(results):
    """common.pt and every byte entry (our RNG state, the layers' _extra_state) unpickle with
    weights_only=True even with megatron's safe globals (numpy arrays etc.) removed."""
    from popo_mega.train.checkpoint_manifest import load_dcp_metadata
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    d = os.path.join(results[-1], "pristine", "step_00000002")
    meta = load_dcp_metadata(os.path.join(d, ".metadata"))
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        common = torch.load(os.path.join(d, "common.pt"), weights_only=True)
        entries = {}
        for idx, info in meta.storage_data.items():
            if isinstance(meta.state_dict_metadata[idx.fqn], BytesStorageMetadata):
                with open(os.path.join(d, info.relative_path), "rb") as f:
                    f.seek(info.offset)
                    entries[idx.fqn] = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)
    assert common["popo"]["step"] == 2
    rng = [v for k, v in entries.items() if k.startswith("popo_rng_state/")]
    assert len(rng) == 2 and all(v[0]["numpy"]["keys"].shape == (624,) for v in rng)   # megatron: [object]
