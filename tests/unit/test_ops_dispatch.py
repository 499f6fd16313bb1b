"""The kernels switch (auto | extension | reference): fallback, one warning naming the build command."""

import warnings

import pytest
import torch

from popo_mega.ops import _extension, clipped_surrogate, logprob_entropy
from tests.unit.test_ops_common import require_extension


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend the extension is not built (and cannot be JIT-built)."""
    monkeypatch.setitem(_extension._state, "tried", True)
    monkeypatch.setitem(_extension._state, "ok", False)
    monkeypatch.setitem(_extension._state, "jit_tried", True)
    monkeypatch.setitem(_extension._state, "error", "ImportError: test")
    monkeypatch.setitem(_extension._state, "warned", False)


def _inputs():
    return torch.randn(3, 5), torch.tensor([0, 4, 2])


def test_missing_extension_warns_once_with_build_command_and_falls_back(no_extension):
    logits, target = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lp1, _ = logprob_entropy(logits, target)
        clipped_surrogate(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.ones(3), 0.2, 0.2)
    msgs = [str(w.message) for w in caught if "popo_mega" in str(w.message)]
    assert len(msgs) == 1 and _extension.BUILD_COMMAND in msgs[0]
    torch.testing.assert_close(lp1, torch.log_softmax(logits, -1).gather(1, target[:, None]).squeeze(1))


def test_missing_extension_with_extension_impl_is_an_error(no_extension):
    with pytest.raises(RuntimeError, match="build it with"):
        logprob_entropy(*_inputs(), impl="extension")


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="'fused'"):
        logprob_entropy(*_inputs(), impl="fused")


def test_unsupported_dtype_falls_back_under_auto_and_errors_under_extension():
    require_extension()
    logits, target = _inputs()
    lp, _ = logprob_entropy(logits.double(), target)      # float64: no kernel, reference path
    assert lp.dtype == torch.float32
    with pytest.raises(RuntimeError, match="cannot run these inputs"):
        logprob_entropy(logits.double(), target, impl="extension")


def test_reference_impl_never_calls_the_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel called")
    monkeypatch.setattr(_extension, "load", boom)
    logprob_entropy(*_inputs(), impl="reference")
