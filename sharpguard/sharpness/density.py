"""Eigenvalue spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For a unit random vector ``v``, ``m`` Lanczos steps give nodes ``theta_j`` (Ritz values) and weights
``tau_j = (e_1^T s_j)^2`` (squared first components of the eigenvectors of ``T_m``), a Gauss quadrature
for ``v^T f(H) v`` that averages to ``tr f(H) / n`` (Golub & Meurant 1994; Ubaru, Chen & Saad, SIMAX
2017; used for neural-network Hessians by Ghorbani, Krishnan & Xiao, ICML 2019). Smoothing the nodes with a
Gaussian of width ``sigma`` and averaging over ``n_v`` vectors gives a density on a grid that integrates to
one. Unlike PyHessian's release (which calls the removed ``torch.eig``), ``T_m`` is diagonalized with a
symmetric float64 solver, and each run keeps only its Lanczos basis while it runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from torch import nn

from .._batches import LossFn
from ..errors import ConfigurationError, require
from .lanczos import BasisDevice, Krylov, _reduced_on, make_operator, rademacher, resolve_basis_device
from .operator import HVPMethod
from .. import _validation as rules

__all__ = ["SpectralDensity", "plot_spectral_density", "spectral_density"]


@dataclass
class SpectralDensity:
    """SLQ density: ``density[i]`` at ``grid[i]`` (integrates to 1); ``nodes[r]``, ``weights[r]`` are run
    ``r``'s quadrature (weights sum to 1 per run)."""

    grid: np.ndarray
    density: np.ndarray
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    sigma: float
    n_hvp: int
    hvp_method: str = "autograd"
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def moment(self, p: int = 1) -> float:
        """Quadrature estimate of ``tr(H^p) / n`` (the p-th moment of the eigenvalue distribution)."""
        return float(np.mean([np.sum(w * t**p) for t, w in zip(self.nodes, self.weights)]))

    def moment_stderr(self, p: int = 1) -> float:
        """Standard error of :meth:`moment` over the independent runs."""
        runs = [np.sum(w * t**p) for t, w in zip(self.nodes, self.weights)]
        return float(np.std(runs, ddof=1) / math.sqrt(len(runs))) if len(runs) > 1 else float("inf")

    def mass(self, low: float, high: float) -> float:
        """Quadrature estimate of the fraction of eigenvalues in ``[low, high]``."""
        return float(np.mean([np.sum(w[(t >= low) & (t <= high)]) for t, w in zip(self.nodes, self.weights)]))


@rules.checked(sigma=rules.positive)
def spectral_density(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    n_iter: int = 80,
    n_v: int = 4,
    n_grid: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    hvp: HVPMethod = "auto",
    train: bool = False,
    check_determinism: bool = True,
    cache_graph: bool | None = None,
    micro_batches: int | Literal["auto"] = "auto",
    basis_device: BasisDevice = "auto",
) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``n_v`` runs of ``n_iter`` steps (``n_v * n_iter`` products).

    ``sigma`` (default: 1% of the spread of the nodes) is the Gaussian smoothing width; the grid spans the
    nodes plus five ``sigma`` on each side. Resolution is about ``(lambda_max - lambda_min) / n_iter``.
    Each run keeps its whole Lanczos basis (``n_iter`` model-size vectors) on ``basis_device`` (``"auto"``:
    host memory when the model is on an accelerator); ``micro_batches`` (default ``"auto"``) bounds the
    products' graph as in :func:`~sharpguard.sharpness.hessian_eigenvalues`. On fake tensors
    (``FakeTensorMode``) the call is a cost-only run: all ``n_v * n_iter`` products, NaN nodes and density.
    On a sharded (FSDP2) model the products are finite differences of FSDP's gradients and each rank draws its
    own slice of every start vector (:func:`~sharpguard.sharpness.hessian_eigenvalues`' rules); every rank gets
    the same nodes and weights.
    """
    if not (isinstance(n_iter, int) and n_iter >= 1 and isinstance(n_v, int) and n_v >= 1):
        raise ConfigurationError(f"n_iter and n_v must be positive integers, got {n_iter!r} and {n_v!r}.")
    if not (isinstance(n_grid, int) and n_grid >= 2):
        raise ConfigurationError(f"n_grid must be an integer >= 2, got {n_grid!r}.")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigurationError(f"sigma must be a positive number, got {sigma!r}.")
    where = resolve_basis_device(basis_device, next(p for p in model.parameters()).device)
    start = time.perf_counter()
    op, reduce, generator = make_operator(
        model, batches, loss_fn, seed=seed, hvp=hvp, train=train, check_determinism=check_determinism,
        cache_graph=cache_graph, micro_batches=micro_batches, host_device=where,
    )
    if reduce is not None and where != op.device:
        reduce = _reduced_on(reduce, op.device)  # the collectives run where the products do (NCCL)
    nodes, weights = [], []
    with op:
        for _ in range(n_v):
            v = rademacher(op.size, generator, op.dtype, where)
            # no restart on breakdown: the quadrature of v is exact on its own Krylov space. The operator
            # takes the rows where they live (its host_device is `where`): no device copy of them
            kry = Krylov(op.matvec, v, n_iter, generator, restart=False, reduce=reduce, basis_device=where,
                         cost_only=op.cost_only)
            while kry.step():
                pass
            theta, s, _ = kry.ritz()
            nodes.append(theta)
            weights.append(s[0, :] ** 2)
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(1e-3 * abs(hi), 1e-6)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
    density = np.zeros_like(grid)
    for t, w in zip(nodes, weights):
        density += (w[None, :] * np.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2)).sum(axis=1)
    density /= n_v * sigma * math.sqrt(2 * math.pi)
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        n_hvp=op.n_hvp,
        hvp_method=str(op.method),
        seconds=time.perf_counter() - start,
        settings={"n_iter": n_iter, "n_v": n_v, "seed": seed, "train": train, "probe_examples": op.n_examples,
                  "micro_batches": op.micro_batches, "basis_device": str(where), "cost_only": op.cost_only},
    )


def plot_spectral_density(result: SpectralDensity, ax: Any = None, *, log: bool = True, **plot_kwargs: Any) -> Any:
    """Plot a :class:`SpectralDensity` on a matplotlib axes (created if ``None``) and return the axes.

    ``log=True`` uses a logarithmic density axis (clipped at 1e-8 of the peak), where the bulk near zero
    and the few outliers are both visible, as in Ghorbani et al. (2019), Fig. 1.
    """
    require("matplotlib", "study")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    density = result.density
    if log:
        density = np.maximum(density, 1e-8 * float(density.max()))
        ax.set_yscale("log")
    ax.plot(result.grid, density, **plot_kwargs)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title(f"spectral density ({result.settings.get('n_v')} runs x {result.settings.get('n_iter')} steps)")
    return ax
