"""Hessian trace by Hutchinson's estimator and by Hutch++, each with a standard error.

Hutchinson (1989): ``tr(H) = E[z^T H z]`` for Rademacher ``z``; with ``m`` samples the standard error is
the sample standard deviation over ``sqrt(m)`` (variance ``2 ||H||_F^2 - 2 sum_i H_ii^2`` per sample).

Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021, Algorithm 1): spend ``m/3`` products on
``Y = H S`` (``S`` Rademacher), take ``Q = qr(Y)``, compute ``tr(Q^T H Q)`` exactly with ``m/3`` more
products, and estimate the trace of the deflated rest ``(I - QQ^T) H (I - QQ^T)`` by Hutchinson with the
last ``m/3``. The error falls like ``1/m`` instead of ``1/sqrt(m)`` when the spectrum decays (as Hessian
spectra do, with a few outliers). Its standard error is that of the Hutchinson part, conditional on Q.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._batches import LossFn
from ..errors import ConfigurationError
from .lanczos import make_operator
from .operator import HVPMethod, HVPOperator
from .. import _validation as rules

__all__ = ["TraceResult", "hessian_trace"]


@dataclass
class TraceResult:
    """``trace`` estimates ``tr(H)``; ``stderr`` is its standard error; ``samples`` are the Hutchinson
    quadratic forms used for it (for Hutch++, those of the deflated remainder)."""

    trace: float
    stderr: float
    n_hvp: int
    method: str
    hvp_method: str = "autograd"
    samples: list[float] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def _rademacher(n: int, cols: int, generator: torch.Generator, op: HVPOperator) -> torch.Tensor:
    z = torch.randint(0, 2, (cols, n), generator=generator, device="cpu").to(op.dtype).mul_(2).sub_(1)
    return z.to(op.device)


def _cholesky_qr(y: torch.Tensor, total: Any) -> torch.Tensor:
    """Orthonormal columns spanning ``y`` when its rows are sliced over ranks: CholeskyQR2 (Fukaya et al.,
    2014), whose only reductions are the small Gram matrices ``y^T y`` (the sketch has full column rank with
    probability 1; a tiny diagonal shift keeps a near-singular one factorable)."""
    q = y
    for _ in range(2):  # the second pass restores orthogonality lost to the Gram matrix's condition number
        gram = total(q.T @ q)
        gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * (
            torch.finfo(gram.dtype).eps * float(gram.diagonal().max())
        )
        r = torch.linalg.cholesky(gram, upper=True)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q


def _mean_stderr(samples: list[float]) -> tuple[float, float]:
    m = len(samples)
    mean = math.fsum(samples) / m
    if m < 2:
        return mean, float("inf")
    var = math.fsum((s - mean) ** 2 for s in samples) / (m - 1)
    return mean, math.sqrt(var / m)


@rules.checked()
def hessian_trace(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    n_hvp: int = 60,
    seed: int = 0,
    hvp: HVPMethod = "auto",
    train: bool = False,
    check_determinism: bool = True,
    cache_graph: bool | None = None,
    micro_batches: int = 1,
) -> TraceResult:
    """Estimate the trace of the probe-loss Hessian with ``n_hvp`` products (plus one for the check).

    ``method="hutch++"`` (default) splits the budget in thirds (needs ``n_hvp >= 3``);
    ``"hutchinson"`` uses all of it for Rademacher samples (needs ``n_hvp >= 2`` for a standard error).
    Side-effect free; the probe vectors come from a private generator seeded with ``seed``. On a sharded
    (FSDP2) model every rank calls it with its own probe batches; the vectors are its slices (Hutch++'s QR
    by CholeskyQR2 over the ranks), the products finite differences of FSDP's gradients.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ConfigurationError(f"method must be 'hutch++' or 'hutchinson', got {method!r}.")
    least = 3 if method == "hutch++" else 2
    if not (isinstance(n_hvp, int) and n_hvp >= least):
        raise ConfigurationError(f"{method} needs n_hvp >= {least} products for a standard error, got {n_hvp!r}.")
    start = time.perf_counter()
    op, reduce, generator = make_operator(
        model, batches, loss_fn, seed=seed, hvp=hvp, train=train, check_determinism=check_determinism,
        cache_graph=cache_graph, micro_batches=micro_batches,
    )

    def total(partial: torch.Tensor) -> torch.Tensor:
        """A sum over the slices of a sharded model's vectors (the identity otherwise)."""
        return partial if reduce is None else reduce(partial.to(torch.float64)).to(partial.dtype)

    with op:
        n_local = op.size
        n = n_local if reduce is None else round(float(total(torch.tensor([float(n_local)], dtype=torch.float64))[0]))
        if method == "hutchinson":
            z = _rademacher(n_local, n_hvp, generator, op)
            samples = [float(total((zi @ op.matvec(zi)).reshape(1))[0]) for zi in z]
            trace, stderr = _mean_stderr(samples)
        else:
            s = n_hvp // 3
            sketch = _rademacher(n_local, s, generator, op)
            y = torch.stack([op.matvec(si) for si in sketch], dim=1)  # n x s
            q = torch.linalg.qr(y)[0] if reduce is None else _cholesky_qr(y, total)  # orthonormal columns
            exact = math.fsum(float(total((qi @ op.matvec(qi)).reshape(1))[0]) for qi in q.T)
            g = _rademacher(n_local, n_hvp - 2 * s, generator, op)
            g = g - total(g @ q) @ q.T  # (I - QQ^T) g, row-wise
            samples = [float(total((gi @ op.matvec(gi)).reshape(1))[0]) for gi in g]
            rest, stderr = _mean_stderr(samples)
            if q.shape[1] >= n:  # Q spans everything: the deflated remainder is exactly zero
                rest, stderr = 0.0, 0.0
            trace = exact + rest
    return TraceResult(
        trace=trace,
        stderr=stderr,
        n_hvp=op.n_hvp,
        method=method,
        hvp_method=str(op.method),
        samples=samples,
        seconds=time.perf_counter() - start,
        settings={"n_hvp": n_hvp, "seed": seed, "train": train, "probe_examples": op.n_examples, "n_params": n,
                  "sharded": reduce is not None},
    )
