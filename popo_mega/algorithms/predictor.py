"""The predictor h_phi of POPO's similarity term (Eq. P3 in docs/algorithms.md).

    h_phi = [Linear -> LayerNorm -> ReLU] x (L - 1) -> Linear      hidden 1024, L = 2 (authors' defaults)

Xavier-uniform weights and zero biases; LayerNorm starts at weight 1, bias 0. It is trained
together with the policy (its parameters go into the same optimizer) and lives only where the
features are computed (the last pipeline stage); it is small and not model-parallel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Predictor"]


class Predictor(nn.Module):
    """MLP from the policy's pooled features f_theta [B, in_dim] to [B, out_dim]."""

    def __init__(self, in_dim: int, hidden: int = 1024, num_layers: int = 2, out_dim: int | None = None):
        """Args:
            in_dim:     feature width H of the policy's final-norm hidden state.
            hidden:     width of the hidden layers (default 1024).
            num_layers: L, the number of Linear layers (>= 1; default 2).
            out_dim:    output width; defaults to in_dim (the target features have width H).
        """
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden", hidden), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Predictor: {name} must be a positive int, got {value!r}")
        out_dim = in_dim if out_dim is None else out_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: Tensor) -> Tensor:
        """features: [B, in_dim] -> [B, out_dim]."""
        return self.net(features)
