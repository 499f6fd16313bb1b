"""Fixtures shared across test folders (kept small: folder-specific ones live beside their tests)."""

import pytest


@pytest.fixture(scope="session")
def real_qwen25_checkpoint(tmp_path_factory):
    """Qwen2.5's real tokenizer beside a tiny Qwen2.5-architecture model at vocab 151,936
    (tests/real_checkpoints.py); built once per session in about a second."""
    from tests.real_checkpoints import build_checkpoint

    return build_checkpoint("qwen2.5", str(tmp_path_factory.mktemp("real_qwen25")), seed=0)


@pytest.fixture(scope="session")
def real_llama3_checkpoint(tmp_path_factory):
    """Llama-3.2's real tokenizer beside a tiny Llama-architecture model at vocab 128,256."""
    from tests.real_checkpoints import build_checkpoint

    return build_checkpoint("llama3", str(tmp_path_factory.mktemp("real_llama3")), seed=1)


@pytest.fixture(scope="session")
def real_qwen3_checkpoint(tmp_path_factory):
    """Qwen2.5's real tokenizer (Qwen3 keeps its vocabulary) beside a tiny Qwen3-architecture model."""
    from tests.real_checkpoints import build_checkpoint

    return build_checkpoint("qwen3", str(tmp_path_factory.mktemp("real_qwen3")), seed=2)


@pytest.fixture(scope="session")
def real_qwen3_moe_checkpoint(tmp_path_factory):
    """Qwen2.5's real tokenizer beside a tiny Qwen3-MoE model (4 experts, top-2) at vocab 151,936."""
    from tests.real_checkpoints import build_checkpoint

    return build_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("real_qwen3_moe")), seed=3)
