"""popo-convert on a corrupted safetensors checkpoint: an error naming the file, no traceback
(issue 15, item 11). CPU; a tiny random Qwen2 checkpoint; about 10 s (one subprocess).

Before: safetensors' own error ("Error while deserializing header: HeaderTooLarge") came as a
traceback from inside the conversion worker and named no file.
"""

import json
import os
import struct
import subprocess
import sys

import pytest

from popo_mega.model import convert_cli
from tests.tiny_models import qwen2_config, save_tiny


def _header_len(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _corrupt(path, how: str) -> None:
    """Damage a safetensors file: its first 8 bytes are the header length (little-endian u64), then
    that many bytes of JSON, then the tensor data."""
    raw = open(path, "rb").read()
    n = _header_len(path)
    if how == "length too large":
        raw = struct.pack("<Q", 2 ** 60) + raw[8:]
    elif how == "length too short":
        raw = struct.pack("<Q", n - 7) + raw[8:]
    elif how == "json":
        raw = raw[:8] + b"#" + raw[9:]          # the header's opening "{"
    elif how == "truncated":
        raw = raw[:8 + n + 10]                  # header intact, data cut
    elif how == "empty":
        raw = b""
    open(path, "wb").write(raw)


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_single")
    save_tiny(qwen2_config(), d)
    assert os.path.isfile(d / "model.safetensors") and _header_len(d / "model.safetensors") > 0
    return d


def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


@pytest.mark.parametrize("how", ["length too large", "length too short", "json", "truncated", "empty"])
@pytest.mark.parametrize("command", ["hf-to-mcore", "verify"])
def test_corrupted_single_file_names_it(single_dir, tmp_path, how, command):
    d = _copy(single_dir, tmp_path / "hf")
    bad = d / "model.safetensors"
    _corrupt(bad, how)
    argv = [command, str(d)] + ([str(tmp_path / "out")] if command == "hf-to-mcore" else [])
    with pytest.raises(SystemExit) as e:
        convert_cli.main(argv)
    msg = str(e.value.code)
    assert str(bad) in msg and "not a readable safetensors file" in msg, msg
    assert not (tmp_path / "out").exists()


def test_corrupted_shard_of_an_index_names_the_shard(tmp_path):
    d = tmp_path / "hf"
    save_tiny(qwen2_config(), d, max_shard_size="60KB")
    weight_map = json.load(open(d / "model.safetensors.index.json"))["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2, shards
    _corrupt(d / shards[-1], "json")
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["hf-to-mcore", str(d), str(tmp_path / "out")])
    msg = str(e.value.code)
    assert str(d / shards[-1]) in msg and str(d / shards[0]) not in msg, msg


def test_broken_index_names_the_index(tmp_path):
    d = tmp_path / "hf"
    save_tiny(qwen2_config(), d, max_shard_size="60KB")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["hf-to-mcore", str(d), str(tmp_path / "out")])
    assert str(d / "model.safetensors.index.json") in str(e.value.code)


def test_the_console_command_prints_one_line_and_no_traceback(single_dir, tmp_path):
    d = _copy(single_dir, tmp_path / "hf")
    _corrupt(d / "model.safetensors", "length too large")
    proc = subprocess.run([sys.executable, "-m", "popo_mega.model.convert_cli", "hf-to-mcore", str(d),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(d / "model.safetensors") in proc.stderr and "header too large" in proc.stderr, proc.stderr


@pytest.mark.parametrize("text", ['{"model_type": "qwen2", ', "[1, 2]", "\udcff"])
def test_broken_config_json_names_it(single_dir, tmp_path, text):
    d = _copy(single_dir, tmp_path / "hf")
    (d / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SystemExit) as e:
        convert_cli.main(["hf-to-mcore", str(d), str(tmp_path / "out")])
    assert str(d / "config.json") in str(e.value.code), e.value.code


def test_a_train_checkpoint_that_fails_its_manifest_is_not_converted(single_dir, tmp_path):
    """mcore-to-hf verifies a popo-train checkpoint (sizes, SHA-256) before unpickling anything in it
    (issue 15): a checkpoint without its manifest, or with a file that changed, is refused, naming it."""
    from popo_mega.train.checkpoint_manifest import MANIFEST, hash_files, write_manifest

    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / convert_cli.TRAIN_MARKER).write_text("{}")
    (ckpt / "common.pt").write_bytes(b"x" * 100)
    argv = ["mcore-to-hf", str(ckpt), str(tmp_path / "hf_out"), "--hf-dir", str(single_dir)]
    with pytest.raises(SystemExit) as e:
        convert_cli.main(argv)
    assert MANIFEST in str(e.value.code) and "not converted" in str(e.value.code)
    write_manifest(str(ckpt), hash_files(str(ckpt), [convert_cli.TRAIN_MARKER, "common.pt"]))
    (ckpt / "common.pt").write_bytes(b"y" * 100)  # same size, other bytes: only the hash tells
    with pytest.raises(SystemExit) as e:
        convert_cli.main(argv)
    assert str(ckpt / "common.pt") in str(e.value.code), e.value.code
    assert not (tmp_path / "hf_out").exists()
