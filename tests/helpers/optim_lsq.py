"""Float64 least squares with a hand-written gradient: the reference problem of the optimizer tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# --------------------------------------------------------------------------------------------------
# float64 least squares: f(x) = W x + b, L = 0.5 * mean_i ||f(x_i) - y_i||^2, gradient by hand
# --------------------------------------------------------------------------------------------------
RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 3))
Y = RNG.normal(size=(8, 2))
W0 = RNG.normal(size=(2, 3))
B0 = RNG.normal(size=2)


def lsq_grad(w):
    W, b = w
    r = X @ W.T + b - Y
    return [r.T @ X / len(X), r.mean(0)]


def norm(v):
    return np.sqrt(sum(float((t * t).sum()) for t in v))


def lsq_model():
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W0))
        model.bias.copy_(torch.from_numpy(B0))
    return model


def lsq_loss(model):
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def weights(model):
    return [model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()]
