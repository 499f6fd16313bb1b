"""The checkpoint manifest and the allow-list unpickler of torch DCP's ``.metadata``
(popo_mega/train/checkpoint_manifest.py), on small directories built here, no megatron (issue 15,
items 7-8). Expected sizes and hashes come from hashlib on the bytes the test wrote itself."""

import hashlib
import json
import os
import pickle
import re

import pytest
import torch

from popo_mega.train import checkpoint_manifest as cm

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")   # dcp.save in one process


def _dir(tmp_path):
    """A directory shaped like a 2-rank checkpoint: files of both ranks, a nested file, a DCP
    ``.metadata`` written by torch DCP itself (one tensor, one non-tensor entry)."""
    import torch.distributed.checkpoint as dcp

    d = tmp_path / "step_00000002"
    dcp.save({"w": torch.arange(6.0), "obj": {"a": 1}}, checkpoint_id=str(d), no_dist=True)
    (d / "common.pt").write_bytes(b"C" * 100)
    (d / "__1_0.distcp").write_bytes(b"R1" * 300)
    (d / "sub").mkdir()
    (d / "sub" / "x.pt").write_bytes(b"x")
    return d


def _write(d):
    """The manifest as save_checkpoint builds it: each rank hashes its own files."""
    names = cm.files_of(str(d))
    entries = {}
    for rank in range(2):
        entries.update(cm.hash_files(str(d), cm.files_hashed_by(names, rank, 2)))
    cm.write_manifest(str(d), entries)
    return names


def test_manifest_lists_every_file_once_with_size_and_sha256(tmp_path):
    d = _dir(tmp_path)
    names = _write(d)
    assert {"common.pt", ".metadata", "__1_0.distcp", "sub/x.pt"} <= set(names) and cm.MANIFEST not in names
    by0, by1 = cm.files_hashed_by(names, 0, 2), cm.files_hashed_by(names, 1, 2)
    assert by1 == ["__1_0.distcp"] and set(by0) | set(by1) == set(names) and not set(by0) & set(by1)
    raw = json.loads((d / cm.MANIFEST).read_text())
    assert raw["hash"] == "sha256" and sorted(raw["files"]) == names
    for name in names:
        data = (d / name).read_bytes()
        assert raw["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert cm.verify_checkpoint(str(d)) == []
    # split over 3 verifying ranks: each file checked once, and still no problem
    shares = [cm.share_of(raw["files"], r, 3) for r in range(3)]
    assert sorted(n for s in shares for n in s) == names
    assert all(cm.verify_checkpoint(str(d), r, 3) == [] for r in range(3))


@pytest.mark.parametrize("damage, expect", [
    ("truncate_shard", r"__1_0\.distcp: 300 bytes, the manifest says 600"),
    ("truncate_common", r"common\.pt: 50 bytes, the manifest says 100"),
    ("delete_metadata", r"/\.metadata: missing"),
    ("flip_byte", r"common\.pt: SHA-256 differs"),
    ("extra_file", r"stale\.distcp: not in the manifest"),
    ("no_manifest", r"popo_manifest\.json: missing"),
    ("garbled_manifest", r"popo_manifest\.json: unreadable"),
    ("manifest_bad_entry", r"entry 'common\.pt' is not"),
])
def test_damage_is_reported_by_path(tmp_path, damage, expect):
    d = _dir(tmp_path)
    _write(d)
    if damage == "truncate_shard":
        (d / "__1_0.distcp").write_bytes(b"R1" * 150)
    elif damage == "truncate_common":
        (d / "common.pt").write_bytes(b"C" * 50)
    elif damage == "delete_metadata":
        (d / ".metadata").unlink()
    elif damage == "flip_byte":
        (d / "common.pt").write_bytes(b"C" * 99 + b"D")
    elif damage == "extra_file":
        (d / "stale.distcp").write_bytes(b"s")
    elif damage == "no_manifest":
        (d / cm.MANIFEST).unlink()
    elif damage == "garbled_manifest":
        (d / cm.MANIFEST).write_text('{"format": 1, "files": {')
    elif damage == "manifest_bad_entry":
        raw = json.loads((d / cm.MANIFEST).read_text())
        raw["files"]["common.pt"]["size"] = "100"
        (d / cm.MANIFEST).write_text(json.dumps(raw))
    problems = [p for r in range(2) for p in cm.verify_checkpoint(str(d), r, 2)]
    assert len(problems) == 1 and str(d) in problems[0], problems
    assert re.search(expect, problems[0]), problems[0]


class _RunsShell:
    """Unpickling this runs ``os.system`` (what a crafted .metadata did on resume, issue 15)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_metadata_of_torch_itself_is_accepted(tmp_path):
    d = _dir(tmp_path)
    with open(d / ".metadata", "rb") as f:
        plain = pickle.load(f)   # the file torch wrote in this test: trusted here
    meta = cm.load_dcp_metadata(str(d / ".metadata"))
    assert type(meta) is type(plain) and meta.state_dict_metadata == plain.state_dict_metadata
    assert meta.storage_data == plain.storage_data


@pytest.mark.parametrize("where", ["top", "nested"])
def test_crafted_metadata_is_refused_without_running_it(tmp_path, where):
    d = _dir(tmp_path)
    marker = tmp_path / "ran"
    if where == "top":
        payload = pickle.dumps(_RunsShell(marker))
    else:   # a genuine Metadata with the payload hidden in one of its fields
        with open(d / ".metadata", "rb") as f:
            meta = pickle.load(f)
        meta.storage_meta = _RunsShell(marker)
        payload = pickle.dumps(meta)
    (d / ".metadata").write_bytes(payload)
    _write(d)   # the manifest rewritten too: whoever can write the directory can do that
    problems = cm.verify_checkpoint(str(d))
    assert not marker.exists(), "unpickling ran the payload"
    assert len(problems) == 1 and problems[0].startswith(str(d / ".metadata"))
    assert "refers to posix.system" in problems[0] or "refers to os.system" in problems[0]


def test_truncated_metadata_pickle_is_a_clear_problem(tmp_path):
    d = _dir(tmp_path)
    (d / ".metadata").write_bytes((d / ".metadata").read_bytes()[:40])
    _write(d)
    problems = cm.verify_checkpoint(str(d))
    assert len(problems) == 1 and "not a torch distributed-checkpoint metadata pickle" in problems[0]
