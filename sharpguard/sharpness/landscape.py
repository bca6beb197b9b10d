"""Filter-normalized loss-landscape slices (Li, Xu, Taylor, Studer & Goldstein, NeurIPS 2018).

A direction ``d`` is drawn from N(0, I) and rescaled filter by filter, ``d_f <- d_f ||w_f|| / ||d_f||``
(a filter is one row ``[i]`` of a weight tensor: an output neuron, channel or embedding row), so a step
``alpha = 1`` moves every filter by its own norm and the picture is comparable across networks whose
weights differ in scale (Li et al., sec. 4). One-dimensional tensors (biases, BatchNorm and LayerNorm
affine parameters) get a zero direction, as the reference code's ``--xignore biasbn``. The slice is
``L(w + alpha d)`` (1-D) or ``L(w + alpha d1 + beta d2)`` (2-D) on a grid, computed on the model itself
inside the side-effect guards and restored by copy afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .._batches import LossFn
from ..errors import ConfigurationError, require
from .operator import ProbeLoss
from .perturbation import _probe, _settings
from .sharded import slice_generator
from .. import _validation as rules

__all__ = ["LossSlice", "filter_normalized_direction", "loss_slice_1d", "loss_slice_2d", "plot_loss_slice"]


@dataclass
class LossSlice:
    """Losses on a 1-D line (``betas is None``, ``losses[i]`` at ``alphas[i]``) or a 2-D plane
    (``losses[i, j]`` at ``(alphas[i], betas[j])``) through the current weights."""

    alphas: np.ndarray
    losses: np.ndarray
    betas: np.ndarray | None = None
    loss_at_center: float = float("nan")
    directions: list[torch.Tensor] = field(default_factory=list)
    definition: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ndim(self) -> int:
        return 1 if self.betas is None else 2


@rules.checked()
def filter_normalized_direction(
    probe: ProbeLoss, generator: torch.Generator, *, ignore_bias_bn: bool = True
) -> torch.Tensor:
    """A flat Gaussian direction rescaled filter-wise to the weights' filter norms (Li et al. 2018)."""
    if not isinstance(probe, ProbeLoss):
        raise ConfigurationError(f"probe must be a ProbeLoss, got {rules.shown(probe)}; build one with "
                                 "ProbeLoss(model, batches).")
    parts = []
    for p in probe.params:
        w = p.detach().to(probe.dtype)
        d = torch.randn(p.shape, generator=generator, dtype=probe.dtype).to(probe.device)
        if p.dim() <= 1:
            if ignore_bias_bn:
                d.zero_()
            else:  # the whole vector is one filter (not one filter per element, loss-landscapes#3); its
                # norms over every rank's slice of a sharded model (a row of a matrix is never split)
                d.mul_(probe._norm_tensor(w) / (probe._norm_tensor(d) + 1e-10))
        else:
            dims = tuple(range(1, p.dim()))
            d.mul_(
                torch.linalg.vector_norm(w, dim=dims, keepdim=True)
                / (torch.linalg.vector_norm(d, dim=dims, keepdim=True) + 1e-10)
            )
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def _coordinates(span: float, n_points: int) -> np.ndarray:
    if not (span > 0 and np.isfinite(span)):
        raise ConfigurationError(f"span must be a positive number, got {span!r}.")
    if not (isinstance(n_points, int) and n_points >= 2):
        raise ConfigurationError(f"n_points must be an integer >= 2, got {n_points!r}.")
    return np.linspace(-span, span, n_points)


def _directions(probe: ProbeLoss, given: Any, count: int, seed: int, ignore_bias_bn: bool) -> list[torch.Tensor]:
    if given is not None:
        given = list(given) if count > 1 else [given]
        if len(given) != count:
            raise ConfigurationError(f"pass {count} directions, got {len(given)}.")
        return [probe.as_vector(d, "direction") for d in given]
    # on a sharded model each rank draws its own slice of the directions
    generator = slice_generator(seed) if probe.supports_sharded else torch.Generator().manual_seed(int(seed))
    return [filter_normalized_direction(probe, generator, ignore_bias_bn=ignore_bias_bn) for _ in range(count)]


def _definition(given: bool, ignore_bias_bn: bool) -> str:
    if given:
        return "loss along user-given directions around w"
    zeroed = "bias/norm-layer directions zeroed" if ignore_bias_bn else "1-D tensors normalized as one filter"
    return f"loss along Gaussian filter-normalized directions around w (Li et al. 2018), {zeroed}"


@rules.checked()
def loss_slice_1d(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    direction: torch.Tensor | list[torch.Tensor] | None = None,
    span: float = 1.0,
    n_points: int = 21,
    seed: int = 0,
    ignore_bias_bn: bool = True,
    train: bool = False,
) -> LossSlice:
    """``L(w + alpha d)`` for ``alpha`` in ``linspace(-span, span, n_points)`` (``n_points`` forwards
    over the probe). ``direction`` (flat or per-parameter) replaces the random filter-normalized one
    and is used as given (e.g. a Hessian eigenvector). On a sharded (FSDP2) model every vector is this rank's
    slice (a given direction too, shaped like the local shards), each rank draws its own slice of a random
    direction, and the losses are the union's, the same on every rank."""
    alphas = _coordinates(span, n_points)
    start = time.perf_counter()
    probe = _probe(model, batches, loss_fn, train)
    with probe:
        (d,) = _directions(probe, direction, 1, seed, ignore_bias_bn)
        center = probe.loss()
        losses = []
        for a in alphas:
            probe.set_parameters(probe.w0 + float(a) * d)
            losses.append(probe.loss())
        probe.set_parameters(probe.w0)
    return LossSlice(
        alphas=alphas,
        losses=np.asarray(losses),
        loss_at_center=center,
        directions=[d],
        definition=_definition(direction is not None, ignore_bias_bn),
        settings=_settings(probe, span=span, n_points=n_points, seed=seed, ignore_bias_bn=ignore_bias_bn, train=train),
        seconds=time.perf_counter() - start,
    )


@rules.checked()
def loss_slice_2d(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    directions: tuple[Any, Any] | None = None,
    span: float = 1.0,
    n_points: int = 21,
    seed: int = 0,
    ignore_bias_bn: bool = True,
    train: bool = False,
) -> LossSlice:
    """``L(w + alpha d1 + beta d2)`` on an ``n_points x n_points`` grid (``n_points**2`` forwards)."""
    coords = _coordinates(span, n_points)
    start = time.perf_counter()
    probe = _probe(model, batches, loss_fn, train)
    with probe:
        d1, d2 = _directions(probe, directions, 2, seed, ignore_bias_bn)
        center = probe.loss()
        losses = np.empty((n_points, n_points))
        for i, a in enumerate(coords):
            for j, b in enumerate(coords):
                probe.set_parameters(probe.w0 + float(a) * d1 + float(b) * d2)
                losses[i, j] = probe.loss()
        probe.set_parameters(probe.w0)
    return LossSlice(
        alphas=coords,
        betas=coords.copy(),
        losses=losses,
        loss_at_center=center,
        directions=[d1, d2],
        definition=_definition(directions is not None, ignore_bias_bn),
        settings=_settings(probe, span=span, n_points=n_points, seed=seed, ignore_bias_bn=ignore_bias_bn, train=train),
        seconds=time.perf_counter() - start,
    )


@rules.checked()
def plot_loss_slice(result: LossSlice, ax: Any = None, *, levels: int = 20, **plot_kwargs: Any) -> Any:
    """Plot a 1-D slice as a curve or a 2-D slice as labelled contours; returns the matplotlib axes."""
    require("matplotlib", "study")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4) if result.ndim == 2 else (5, 3.5))
    if result.ndim == 1:
        ax.plot(result.alphas, result.losses, **plot_kwargs)
        ax.set_xlabel("alpha (step along the direction)")
        ax.set_ylabel("loss")
    else:
        cs = ax.contour(result.alphas, result.betas, result.losses.T, levels=levels, **plot_kwargs)
        ax.clabel(cs, inline=True, fontsize=7)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
        ax.set_aspect("equal")
    ax.set_title("filter-normalized loss slice" if "filter" in result.definition else "loss slice")
    return ax
