"""The study's models: a small MLP (optionally with dropout) and an averaged-logits ensemble.

An MLP keeps every measurement cheap on CPU (about 9k parameters for 8x8 digits, so a Hessian-vector
product costs well under a millisecond) and works for any input shape a user's data set has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def make_mlp(input_shape: Sequence[int], n_classes: int, hidden: int = 64, dropout: float = 0.0) -> nn.Sequential:
    """``Flatten -> Linear -> ReLU [-> Dropout] -> Linear -> ReLU [-> Dropout] -> Linear``."""
    d_in = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for d in (d_in, hidden):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, n_classes))
    return nn.Sequential(*layers)


class LogitEnsemble(nn.Module):
    """The mean of its members' logits: ``f(x) = (1/K) sum_k f_k(x)``.

    Its parameters are all the members' parameters, so sharpness measures see the ensemble as one model
    whose Hessian couples the members through the shared softmax.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)
