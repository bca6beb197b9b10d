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
from .lanczos import BasisDevice, make_operator, rademacher, resolve_basis_device, total_size
from .operator import HVPMethod
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


def _cholesky_qr(y: torch.Tensor, total: Any, cost_only: bool = False) -> torch.Tensor:
    """Orthonormal columns spanning ``y`` when its rows are sliced over ranks: CholeskyQR2 (Fukaya et al.,
    2014), whose only reductions are the small Gram matrices ``y^T y`` (the sketch has full column rank with
    probability 1; a tiny diagonal shift keeps a near-singular one factorable)."""
    q = y
    for _ in range(2):  # the second pass restores orthogonality lost to the Gram matrix's condition number
        gram = total(q.T @ q)
        shift = gram.diagonal().max() if cost_only else float(gram.diagonal().max())  # cost-only: not read
        gram = gram + torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) * (
            torch.finfo(gram.dtype).eps * shift
        )
        r = torch.linalg.cholesky(gram, upper=True)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
    return q


def _householder_q(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the tall ``y`` (``n x s``, ``s`` small), as ``torch.linalg.qr(y)[0]``,
    formed in ``y``'s own storage: Householder QR (Golub & Van Loan, Matrix Computations, 4th ed., Alg. 5.2.1)
    by rank-one updates, then Q accumulated backward over the reflectors where they lie (LAPACK's ``dorg2r``).
    Returns a view of ``y`` (its first ``min(n, s)`` columns); no model-size memory is allocated. LAPACK's QR
    through torch (``linalg.qr``, ``householder_product``, ``ormqr``) copies its operands and takes a workspace
    of the full height (16 model-size vectors with MKL's ``orgqr``: hundreds of GB of host memory at 7B), which
    a sketch of a few vectors does not need. No value is read on the host."""
    n, s = y.shape
    k = min(n, s)  # Q is n x min(n, s), as the reduced QR's
    taus = []
    for j in range(k):
        v = y[j:, j]  # becomes the reflector v = x - alpha e1, alpha = -sign(x_0) ||x||
        below = torch.linalg.vector_norm(v[1:])
        norm = torch.linalg.vector_norm(v)
        v[0] += torch.where(v[0] >= 0, norm, -norm)  # no cancellation: the signs agree
        # nothing below the diagonal: no reflection (H = I), as LAPACK's larfg, so Q's signs are LAPACK's
        tau = torch.where(below > 0, 2.0 / (v @ v), torch.zeros_like(norm))
        if j + 1 < s:
            rest = y[j:, j + 1:]
            rest.addr_(v, (v @ rest) * tau, alpha=-1)
        taus.append(tau)
    # Q = H_1 ... H_k I[:, :k], from the last reflector back. Before step j the columns right of j hold
    # H_{j+1} ... H_k e_i, zero above their own diagonal; column j still holds its reflector v_j (rows j..n),
    # and H_j e_j = e_j - tau_j v_j[0] v_j replaces it, with R's entries above it zeroed.
    for j in reversed(range(k)):
        v = y[j:, j]
        if j + 1 < k:
            block = y[j:, j + 1:k]
            block.addr_(v, (v @ block) * taus[j], alpha=-1)
        v.mul_(-taus[j] * v[0])
        v[0] += 1
        y[:j, j].zero_()
    return y[:, :k]


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
    micro_batches: int | Literal["auto"] = "auto",
    basis_device: BasisDevice = "auto",
) -> TraceResult:
    """Estimate the trace of the probe-loss Hessian with ``n_hvp`` products (plus one for the check).

    ``method="hutch++"`` (default) splits the budget in thirds (needs ``n_hvp >= 3``);
    ``"hutchinson"`` uses all of it for Rademacher samples (needs ``n_hvp >= 2`` for a standard error).
    Side-effect free; the probe vectors come from a private generator seeded with ``seed``. On a sharded
    (FSDP2) model every rank calls it with its own probe batches; the vectors are its slices (Hutch++'s QR
    by CholeskyQR2 over the ranks), the products finite differences of FSDP's gradients.
    ``micro_batches`` (default ``"auto"``, as :func:`~sharpguard.sharpness.hessian_eigenvalues`) bounds the
    products' graph so a check stays within a training step's memory; the probe vectors are drawn one at a
    time and Hutch++'s sketch and basis (``n_hvp // 3`` model-size vectors each) live on ``basis_device``
    (``"auto"``: host memory when the model is on an accelerator; see
    :func:`~sharpguard.sharpness.lanczos.resolve_basis_device`). On fake tensors (``FakeTensorMode``)
    the call is a cost-only run: the same ``n_hvp`` products and vector work, no value read (``trace``,
    ``stderr`` and ``samples`` are NaN, ``settings["cost_only"]`` is True; the determinism check's second
    product runs, its comparison does not).
    """
    if method not in ("hutch++", "hutchinson"):
        raise ConfigurationError(f"method must be 'hutch++' or 'hutchinson', got {method!r}.")
    least = 3 if method == "hutch++" else 2
    if not (isinstance(n_hvp, int) and n_hvp >= least):
        raise ConfigurationError(f"{method} needs n_hvp >= {least} products for a standard error, got {n_hvp!r}.")
    where = resolve_basis_device(basis_device, next(p for p in model.parameters()).device)
    start = time.perf_counter()
    op, reduce, generator = make_operator(
        model, batches, loss_fn, seed=seed, hvp=hvp, train=train, check_determinism=check_determinism,
        cache_graph=cache_graph, micro_batches=micro_batches, host_device=where,
    )

    def total(partial: torch.Tensor) -> torch.Tensor:
        """A sum over the slices of a sharded model's vectors (the identity otherwise)."""
        if reduce is None:
            return partial
        # the collective runs where the products do (NCCL), whatever device holds the partial sum
        return reduce(partial.to(device=op.device, dtype=torch.float64)).to(device=partial.device, dtype=partial.dtype)

    def quadratic_form(u: torch.Tensor) -> float:
        """``u^T H u`` (one product), read back unless the run is cost-only."""
        return op._read(total((u @ op.matvec(u)).reshape(1))[0])

    with op:
        n_local = op.size
        n = total_size(op, reduce)
        # one random vector at a time (the generator's stream is the same as drawing them as one block), on
        # basis_device: in host memory the products read it there (HVPOperator.matvec), and the device holds
        # no probe vector or product at all; on the device, one of each, never n_hvp model-size vectors
        if method == "hutchinson":
            samples = [quadratic_form(rademacher(n_local, generator, op.dtype, where)) for _ in range(n_hvp)]
            trace, stderr = _mean_stderr(samples)
        else:
            s = n_hvp // 3
            # the sketch Y = H S and its basis Q (s model-size vectors each) live on basis_device
            y = torch.empty((s, n_local), dtype=op.dtype, device=where).T  # column-major: columns contiguous
            for i in range(s):
                y[:, i] = op.matvec(rademacher(n_local, generator, op.dtype, where))
            if reduce is not None:
                q = _cholesky_qr(y, total, cost_only=op.cost_only)
            else:
                q = _householder_q(y)  # orthonormal columns, in y's storage
            del y
            exact = math.fsum(quadratic_form(q[:, i]) for i in range(q.shape[1]))
            samples = []
            for _ in range(n_hvp - 2 * s):
                gi = rademacher(n_local, generator, op.dtype, where)
                gi = gi - q @ total(q.T @ gi)  # (I - QQ^T) g
                samples.append(quadratic_form(gi))
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
                  "sharded": reduce is not None, "micro_batches": op.micro_batches, "cost_only": op.cost_only,
                  "basis_device": str(where)},
    )
