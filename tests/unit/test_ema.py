"""fp32 EMA target (Eq. P6 of docs/algorithms.md): tracking a float64 reference, why fp32 is
needed, schedules, weight swapping and state_dict round trips."""

import io
import math

import pytest
import torch
from torch import nn

from popo_mega.algorithms.ema import EMA, momentum


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def _drift(model, gen, scale=1e-3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_fp32_tracks_float64_reference_and_bf16_does_not():
    model = _model()
    ema32 = EMA(model, tau=0.999)
    ema16 = EMA(model, tau=0.999, dtype=torch.bfloat16)   # what NOT to do: shows why fp32 is required
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(2000):
        _drift(model, gen)
        ema32.update(model)
        ema16.update(model)
        for n, p in model.named_parameters():           # second formulation, float64, written out
            ref[n] = 0.999 * ref[n] + 0.001 * p.detach().double()
    err32 = max(((t.double() - ref[n]).norm() / ref[n].norm()).item() for n, t in ema32.named_tensors())
    err16 = max(((t.double() - ref[n]).norm() / ref[n].norm()).item() for n, t in ema16.named_tensors())
    print(f"\nEMA tau=0.999 after 2000 updates, relative error vs float64: fp32 {err32:.2e}, bf16 {err16:.2e}")
    assert err32 < 1e-6
    assert err16 > 1e-2          # (1 - tau)(theta - xi) is below bf16 resolution: the bf16 EMA stalls
    assert all(t.dtype == torch.float32 for _, t in ema32.named_tensors())


def test_cosine_schedule_end_points_and_use_in_update():
    assert momentum(0, 0.99, "cosine", 100) == pytest.approx(0.99)
    assert momentum(50, 0.99, "cosine", 100) == pytest.approx(1 - 0.01 * 0.5)
    assert momentum(100, 0.99, "cosine", 100) == pytest.approx(1.0)
    assert momentum(250, 0.99, "cosine", 100) == pytest.approx(1.0)
    assert momentum(7, 0.995) == 0.995
    # update k uses tau_k: a one-parameter module, xi followed by hand in float64
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, tau=0.9, schedule="cosine", total_steps=4)
    xi = 0.0
    for k in range(6):
        with torch.no_grad():
            m.weight.fill_(float(k + 1))
        used = ema.update(m)
        tau_k = 1 - 0.1 * (math.cos(math.pi * min(k, 4) / 4) + 1) / 2
        assert used == pytest.approx(tau_k)
        xi = tau_k * xi + (1 - tau_k) * (k + 1)
        assert dict(ema.named_tensors())["weight"].item() == pytest.approx(xi, rel=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        EMA(m, schedule="cosine")
    with pytest.raises(ValueError, match="schedule"):
        EMA(m, schedule="linear")


def test_swapped_into_and_copy_to():
    model = _model()
    ema = EMA(model, tau=0.5)
    original = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)                              # xi = theta_0 + 0.5
    x = torch.randn(3, 32)
    online_out = model(x)
    bf16 = _model().to(torch.bfloat16)
    with ema.swapped_into(model):
        for p, p0 in zip(model.parameters(), original):
            assert torch.allclose(p, p0 + 0.5, atol=1e-6)
        ema_out = model(x)
    for p, p0 in zip(model.parameters(), original):        # restored
        assert torch.allclose(p, p0 + 1.0, atol=1e-6)
    assert torch.equal(model(x), online_out)
    assert not torch.allclose(ema_out, online_out)
    with ema.swapped_into(bf16):                          # cast to the module's dtype
        assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
        assert torch.allclose(next(bf16.parameters()).float(), original[0] + 0.5, atol=1e-2)
    with pytest.raises(RuntimeError):
        with ema.swapped_into(model):
            raise RuntimeError("boom")
    assert torch.allclose(next(model.parameters()), original[0] + 1.0, atol=1e-6)  # restored on error
    target = _model(seed=3)
    ema.copy_to(target)
    for p, p0 in zip(target.parameters(), original):
        assert torch.allclose(p, p0 + 0.5, atol=1e-6)


def test_state_dict_round_trip():
    model = _model()
    ema = EMA(model, tau=0.99, schedule="cosine", total_steps=50)
    gen = torch.Generator().manual_seed(2)
    for _ in range(7):
        _drift(model, gen, 1e-2)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    restored = EMA(_model(seed=9), tau=0.5)               # different init and settings
    restored.load_state_dict(torch.load(buf))
    assert restored.step == 7 and restored.current_momentum() == ema.current_momentum()
    for (n1, t1), (n2, t2) in zip(ema.named_tensors(), restored.named_tensors()):
        assert n1 == n2 and torch.equal(t1, t2)
    _drift(model, gen, 1e-2)                              # both continue identically
    ema.update(model)
    restored.update(model)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ema.named_tensors(), restored.named_tensors()))
    with pytest.raises(KeyError, match="parameter names"):
        EMA(nn.Linear(2, 2)).load_state_dict(ema.state_dict())


def test_mismatched_module_is_named():
    ema = EMA(_model())
    with pytest.raises(ValueError, match="missing"):
        ema.update(nn.Linear(32, 32))


def test_bucketed_update_matches_per_tensor_lerp():
    model = _model().to(torch.bfloat16)                   # bf16 parameters, upcast bucket by bucket
    ema = EMA(model, tau=0.9)
    ema._BUCKET_NUMEL = 40                                # force many buckets
    expected = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        _drift(model, gen, 1e-1)
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = expected[n] + 0.1 * (p.detach().float() - expected[n])
    for n, t in ema.named_tensors():
        assert t.dtype == torch.float32
        assert torch.allclose(t, expected[n], rtol=0, atol=1e-6), n
