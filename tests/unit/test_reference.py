"""popo_mega.algorithms.reference.FrozenReference: the frozen initial policy of GRPO's KL term."""

import pytest
import torch
from torch import nn

from popo_mega.algorithms.reference import FrozenReference


def _model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)


def test_reference_is_theta0_in_the_model_dtype_and_never_moves():
    m = _model()
    theta0 = {k: v.clone() for k, v in m.state_dict().items()}
    ref = FrozenReference(m)
    assert all(t.dtype == torch.bfloat16 for _, t in ref.named_tensors())
    assert ref.nbytes() == sum(p.numel() for p in m.parameters()) * 2   # bf16: half an fp32 copy
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    m(x).square().sum().backward()
    opt.step()
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    assert any(not torch.equal(trained[k], theta0[k]) for k in theta0)
    with torch.no_grad(), ref.swapped_into(m):
        assert all(torch.equal(v, theta0[k]) for k, v in m.state_dict().items())   # bit-exact theta_0
        y_ref = m(x)
    assert all(torch.equal(v, trained[k]) for k, v in m.state_dict().items())      # restored
    assert all(torch.equal(t, theta0[k]) for k, t in ref.named_tensors())          # still theta_0
    fresh = _model()
    with torch.no_grad():
        assert torch.equal(y_ref, fresh(x))


def test_swap_is_undone_on_an_exception():
    m = _model(torch.float32)
    ref = FrozenReference(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    moved = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), ref.swapped_into(m):
        raise RuntimeError("boom")
    assert all(torch.equal(v, moved[k]) for k, v in m.state_dict().items())


def test_mismatched_module_is_refused():
    ref = FrozenReference(_model())
    with pytest.raises(ValueError, match="missing"):
        with ref.swapped_into(nn.Linear(8, 16)):
            pass
    with pytest.raises(ValueError, match="float32"):
        with ref.swapped_into(_model(torch.float32)):
            pass
    with pytest.raises(ValueError, match="no parameters"):
        FrozenReference(nn.ReLU())
