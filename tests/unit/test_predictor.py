"""The predictor MLP h_phi of Eq. P3: structure, initialisation, forward/backward."""

import math

import pytest
import torch
from torch import nn

from popo_mega.algorithms.predictor import Predictor


def test_default_structure_is_linear_layernorm_relu_linear():
    torch.manual_seed(0)
    p = Predictor(in_dim=64)
    kinds = [type(m) for m in p.net]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert (p.net[0].in_features, p.net[0].out_features) == (64, 1024)
    assert p.net[1].normalized_shape == (1024,)
    assert (p.net[3].in_features, p.net[3].out_features) == (1024, 64)


def test_xavier_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    p = Predictor(in_dim=64, hidden=256, num_layers=3, out_dim=32)
    linears = [m for m in p.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 256), (256, 256), (256, 32)]
    for m in linears:
        bound = math.sqrt(6.0 / (m.in_features + m.out_features))        # Glorot & Bengio (2010)
        assert m.weight.abs().max().item() <= bound
        # U(-a, a) has std a / sqrt(3); with >= 8k samples the estimate is within 5%
        assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert torch.count_nonzero(m.bias).item() == 0
    for m in p.net:
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_single_layer_is_one_linear_and_forward_backward():
    p1 = Predictor(in_dim=8, num_layers=1)
    assert [type(m) for m in p1.net] == [nn.Linear]
    torch.manual_seed(1)
    p = Predictor(in_dim=8, hidden=16)
    x = torch.randn(5, 8, requires_grad=True)
    y = p(x)
    assert y.shape == (5, 8)
    # Second formulation of the forward pass, written out.
    h = torch.relu(nn.functional.layer_norm(x @ p.net[0].weight.T + p.net[0].bias, (16,),
                                            p.net[1].weight, p.net[1].bias))
    assert torch.allclose(y, h @ p.net[3].weight.T + p.net[3].bias, atol=1e-6)
    y.sum().backward()
    assert all(q.grad is not None for q in p.parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_layers"):
        Predictor(in_dim=8, num_layers=0)
    with pytest.raises(ValueError, match="hidden"):
        Predictor(in_dim=8, hidden=0)
