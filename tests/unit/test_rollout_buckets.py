"""Weight-sync bucketing and the flattened-bucket byte layout; launcher command lines."""

import sys

import pytest
import torch

from popo_mega.rollout.sglang_launcher import embedded_server_command, router_command, sglang_server_command
from popo_mega.rollout.weight_sync import dtype_name, flatten_bucket, iter_buckets


def _named():
    return [("a", torch.zeros(10)),                          # 40 B fp32
            ("b", torch.zeros(5)),                           # 20 B
            ("c", torch.zeros(30)),                          # 120 B: larger than a 100 B bucket
            ("d", torch.zeros(4, dtype=torch.bfloat16)),     # 8 B, other dtype
            ("e", torch.zeros(3, dtype=torch.bfloat16)),     # 6 B
            ("f", torch.zeros(2))]                           # 8 B fp32 again


def test_buckets_respect_size_dtype_and_order():
    got = [[n for n, _ in b] for b in iter_buckets(_named(), bucket_bytes=100)]
    assert got == [["a", "b"], ["c"], ["d", "e"], ["f"]]
    assert [[n for n, _ in b] for b in iter_buckets(_named(), bucket_bytes=10**6)] == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert [[n for n, _ in b] for b in iter_buckets(_named(), bucket_bytes=1)] == [[n] for n in "abcdef"]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(_named(), bucket_bytes=0))
    with pytest.raises(TypeError, match="'x' is a list"):
        list(iter_buckets([("x", [1.0])]))


def test_flattened_bucket_is_the_tensors_bytes_in_order():
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([-1.5, 2.25], dtype=torch.float32)
    c = a.t()  # non-contiguous input must still be laid out in logical (row-major) order
    flat = flatten_bucket([("a", a), ("b", b), ("c", c)], torch.device("cpu"))
    assert flat.dtype == torch.uint8 and flat.numel() == (6 + 2 + 6) * 4
    # decode by hand: 4 bytes little-endian per float, offsets 0, 24, 32
    raw = bytes(flat.tolist())
    import struct
    values = struct.unpack("<14f", raw)
    assert list(values[:6]) == [0, 1, 2, 3, 4, 5] and list(values[6:8]) == [-1.5, 2.25]
    assert list(values[8:]) == [0, 3, 1, 4, 2, 5]
    assert dtype_name(torch.bfloat16) == "bfloat16" and getattr(torch, dtype_name(torch.float32)) is torch.float32


def test_launcher_commands_use_sglang_flag_names():
    cmd = sglang_server_command("/m", host="127.0.0.1", port=31000, tp_size=2, mem_fraction_static=0.7,
                                base_gpu_id=2, api_key="k", random_seed=3)
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags == {"--model-path": "/m", "--host": "127.0.0.1", "--port": "31000", "--tp-size": "2",
                     "--base-gpu-id": "2", "--mem-fraction-static": "0.7", "--api-key": "k", "--random-seed": "3"}
    emb = embedded_server_command("/m", port=31001, device="cpu", random_seed=3)
    assert emb[:3] == [sys.executable, "-m", "popo_mega.rollout.server"]
    shared = {"--model-path", "--host", "--port", "--random-seed"}
    assert shared <= set(emb[3::2]) and shared <= set(cmd[3::2])
    from popo_mega.rollout.server import parse_args
    args = parse_args(emb[3:])  # the embedded server accepts what the launcher builds
    assert (args.model_path, args.port, args.device, args.random_seed) == ("/m", 31001, "cpu", 3)
    assert args.strict_sglang and not args.enable_deterministic_inference  # SGLang's rules, SGLang's default
    det = parse_args(embedded_server_command("/m", extra_args=("--enable-deterministic-inference",))[3:])
    assert det.strict_sglang and det.enable_deterministic_inference
    r = router_command(["http://a:1", "http://b:2"], port=30000)
    assert r[:3] == [sys.executable, "-m", "sglang_router.launch_router"] and r[4:6] == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError, match="no worker URLs"):
        router_command([])


def test_sglang_detection_never_imports_sglang():
    """Importing sglang patches transformers in-process: detection must only look at files."""
    from popo_mega.rollout.sglang_launcher import launch_servers, sglang_available

    already = "sglang" in sys.modules
    found = sglang_available()
    assert already or "sglang" not in sys.modules
    if not found:  # the schema-only --no-deps install (or none) must not be mistaken for a server
        with pytest.raises(RuntimeError, match="sglang is not installed"):
            launch_servers("sglang", "/nonexistent")
    with pytest.raises(ValueError, match="kind must be"):
        launch_servers("vllm", "/nonexistent")
