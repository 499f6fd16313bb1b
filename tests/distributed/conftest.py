"""Fixtures shared by the gloo tests of the trainer."""

import pytest

from tests.tiny_models import qwen2_config, save_tiny


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    """A tiny random HF Qwen2 checkpoint directory (one per test module)."""
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    save_tiny(qwen2_config(), path)
    return str(path)
