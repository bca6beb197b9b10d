"""Extreme Hessian eigenvalues by the Lanczos method with full reorthogonalization.

Lanczos (1950) builds an orthonormal basis ``V_m`` of the Krylov space ``span{v, Hv, ..., H^{m-1} v}``
and the tridiagonal ``T_m = V_m^T H V_m``; its eigenpairs ``(theta_i, s_i)`` give Ritz pairs
``(theta_i, V_m s_i)`` with residual ``||H y_i - theta_i y_i|| = beta_m |s_{m,i}|`` (Parlett, *The
Symmetric Eigenvalue Problem*, 1998, sec. 13.1), which bounds the eigenvalue error: some eigenvalue of
``H`` lies within ``beta_m |s_{m,i}|`` of ``theta_i``. We stop when every wanted Ritz value has
``beta_m |s_{m,i}| <= tol * max(|theta_i|, 1e-3 ||T_m||)``.

Against power iteration (PyHessian), whose Rayleigh quotient error shrinks like ``(lambda_2/lambda_1)^(2t)``,
Lanczos converges like ``exp(-4 t sqrt(gamma))`` with ``gamma = (lambda_1 - lambda_2)/(lambda_2 - lambda_n)``
(Kaniel-Paige-Saad bound; Saad, *Numerical Methods for Large Eigenvalue Problems*, 2011, Thm. 6.4), which
matters most when the top eigenvalues cluster. Every new vector is orthogonalized twice against the whole
basis (classical Gram-Schmidt, "twice is enough": Giraud et al. 2005), so no ghost copies of converged
eigenvalues appear; ``T_m`` is diagonalized in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._batches import LossFn
from ..errors import ConfigurationError
from .operator import HVPMethod, HVPOperator

Which = Literal["largest", "smallest", "both"]

__all__ = ["EigenResult", "hessian_eigenvalues", "lanczos"]


def _eigh_tridiagonal(alphas: np.ndarray, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs (ascending) of the symmetric tridiagonal matrix with diagonal ``alphas``."""
    if len(alphas) == 1:
        return alphas.copy(), np.ones((1, 1))
    try:
        from scipy.linalg import eigh_tridiagonal
    except ImportError:  # scipy is optional in the core; numpy's dense eigh is fine for m <= ~500
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        return np.linalg.eigh(t)
    return eigh_tridiagonal(alphas, betas)


class Krylov:
    """Lanczos recurrence with full reorthogonalization, one step per Hessian-vector product.

    ``V`` grows in a preallocated buffer; ``alphas``/``betas`` are Python floats (float64). On an
    invariant subspace (``beta`` ~ 0) the recurrence restarts from a random vector orthogonal to the
    basis when ``restart`` is true, with a zero coupling in ``T`` (so ``T`` stays the projection of H).
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        v0: torch.Tensor,
        max_steps: int,
        generator: torch.Generator,
        *,
        restart: bool = True,
    ) -> None:
        n = v0.numel()
        self.matvec, self.generator, self.restart = matvec, generator, restart
        self.n = n
        self.max_steps = min(max_steps, n)
        norm = float(torch.linalg.vector_norm(v0))
        if not (norm > 0 and math.isfinite(norm)):
            raise ConfigurationError("the start vector is zero or not finite; pass a nonzero finite init.")
        self.V = torch.empty((min(self.max_steps + 1, 16), n), dtype=v0.dtype, device=v0.device)
        self.V[0] = v0 / norm
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.exhausted = False
        self._anorm = 0.0
        self._eps = torch.finfo(v0.dtype).eps

    @property
    def m(self) -> int:
        return len(self.alphas)

    def _orthogonalize(self, w: torch.Tensor, upto: int) -> torch.Tensor:
        basis = self.V[:upto]
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    def _ensure_capacity(self, rows: int) -> None:
        if rows > self.V.shape[0]:
            bigger = torch.empty(
                (min(max(rows, 2 * self.V.shape[0]), self.max_steps + 1), self.n),
                dtype=self.V.dtype,
                device=self.V.device,
            )
            bigger[: self.V.shape[0]] = self.V
            self.V = bigger

    def step(self) -> bool:
        """One Lanczos step (one product). Returns False when no further step is possible."""
        j = self.m
        if self.exhausted or j >= self.max_steps:
            return False
        q = self.V[j]
        w = self.matvec(q)
        if not bool(torch.isfinite(w).all()):
            raise ConfigurationError("a Hessian-vector product is not finite; check the model and probe for overflow.")
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - self.betas[-1] * self.V[j - 1]
        w = self._orthogonalize(w, j + 1)
        beta = float(torch.linalg.vector_norm(w))
        self.alphas.append(alpha)
        self._anorm = max(self._anorm, abs(alpha) + beta + (self.betas[-1] if self.betas else 0.0))
        if j + 1 >= self.n:
            self.betas.append(0.0)
            self.exhausted = True
            return True
        self._ensure_capacity(j + 2)
        if beta <= 100 * self._eps * self._anorm:
            # Invariant subspace: the Ritz values found so far are exact eigenvalues.
            self.betas.append(0.0)
            if not self.restart:
                self.exhausted = True
                return True
            r = torch.randn(self.n, generator=self.generator, dtype=w.dtype, device="cpu").to(w.device)
            r = self._orthogonalize(r, j + 1)
            self.V[j + 1] = r / torch.linalg.vector_norm(r)
        else:
            self.betas.append(beta)
            self.V[j + 1] = w / beta
        return True

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of ``T`` and residual norms ``beta_m |s_{m,i}|``."""
        a = np.asarray(self.alphas, dtype=np.float64)
        b = np.asarray(self.betas[:-1], dtype=np.float64)
        theta, s = _eigh_tridiagonal(a, b)
        residuals = abs(self.betas[-1]) * np.abs(s[-1, :])
        return theta, s, residuals

    def ritz_vectors(self, s: np.ndarray) -> torch.Tensor:
        """Rows ``V_m^T s_i`` for the columns of ``s``."""
        coeffs = torch.as_tensor(s, dtype=self.V.dtype, device=self.V.device)
        return coeffs.T @ self.V[: self.m]


def _wanted(theta: np.ndarray, k: int, which: Which) -> list[int]:
    """Indices (into ascending ``theta``) of the wanted Ritz values, in descending order."""
    m = len(theta)
    top = list(range(m - 1, max(m - 1 - k, -1), -1))
    bottom = list(range(min(k, m) - 1, -1, -1))
    if which == "largest":
        return top
    if which == "smallest":
        return bottom
    return sorted(set(top) | set(bottom), reverse=True)


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    *,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-4,
    max_iter: int = 100,
    generator: torch.Generator,
    return_eigenvectors: bool = False,
) -> dict[str, Any]:
    """Run Lanczos from ``v0`` until the wanted Ritz pairs meet ``tol`` or ``max_iter`` products."""
    kry = Krylov(matvec, v0, max_iter, generator)
    need = min(kry.n, 2 * k if which == "both" else k)
    idx: list[int] = []
    theta = residuals = s = None
    converged = False
    while kry.step():
        if kry.m < need:
            continue
        theta, s, residuals = kry.ritz()
        idx = _wanted(theta, k, which)
        floor = 1e-3 * float(np.max(np.abs(theta)))
        converged = all(residuals[i] <= tol * max(abs(theta[i]), floor) for i in idx)
        if converged:
            break
    if theta is None:  # max_iter smaller than the number of wanted values
        theta, s, residuals = kry.ritz()
        idx = _wanted(theta, k, which)
    return {
        "eigenvalues": [float(theta[i]) for i in idx],
        "residuals": [float(residuals[i]) for i in idx],
        "eigenvectors": list(kry.ritz_vectors(s[:, idx])) if return_eigenvectors else None,
        "converged": bool(converged),
        "n_iter": kry.m,
    }


@dataclass
class EigenResult:
    """Extreme eigenvalues of the probe-loss Hessian.

    ``eigenvalues`` are in descending (algebraic) order: for ``which="smallest"`` the most negative is
    last; for ``"both"`` the top ``k`` come first and the bottom ``k`` last. ``residuals[i]`` is the Ritz
    residual ``||H y_i - lambda_i y_i||`` (an upper bound on the eigenvalue error); ``converged`` says
    whether all of them met the tolerance. ``eigenvectors`` (on request) are unit flat vectors over the
    trainable parameters in ``model.parameters()`` order - pass one back as ``init=`` to warm-start.
    """

    eigenvalues: list[float]
    residuals: list[float]
    n_hvp: int
    converged: bool
    eigenvectors: list[torch.Tensor] | None = None
    hvp_method: str = "autograd"
    n_iter: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue found (``eigenvalues[0]``)."""
        return self.eigenvalues[0]

    @property
    def lambda_min(self) -> float:
        """The smallest eigenvalue found (``eigenvalues[-1]``)."""
        return self.eigenvalues[-1]


def _check_common(k: int, tol: float, max_iter: int) -> None:
    if not (isinstance(k, int) and k >= 1):
        raise ConfigurationError(f"k must be a positive integer, got {k!r}.")
    if not (tol > 0 and math.isfinite(tol)):
        raise ConfigurationError(f"tol must be a positive number, got {tol!r}.")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigurationError(f"max_iter must be a positive integer, got {max_iter!r}.")


def start_vector(op: HVPOperator, init: Any, generator: torch.Generator) -> torch.Tensor:
    """``init`` as a flat vector, or a standard normal vector drawn from ``generator``."""
    if init is not None:
        return op.as_vector(init, "init vector")
    return torch.randn(op.size, generator=generator, dtype=op.dtype, device="cpu").to(op.device)


def hessian_eigenvalues(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-4,
    max_iter: int = 100,
    init: torch.Tensor | list[torch.Tensor] | None = None,
    return_eigenvectors: bool = False,
    seed: int = 0,
    hvp: HVPMethod = "auto",
    train: bool = False,
    check_determinism: bool = True,
    cache_graph: bool | None = None,
) -> EigenResult:
    """The ``k`` algebraically largest (and/or smallest) eigenvalues of the probe-loss Hessian.

    Lanczos with full reorthogonalization, stopped on Ritz residuals (see the module docstring).
    ``init`` warm-starts from a previous eigenvector (a monitor passes last call's top vector, which
    cuts the products per call to a handful when the Hessian moved little). ``max_iter`` caps the
    products and the memory (``max_iter + 1`` vectors of the model's size). The model is left exactly
    as found (parameters, ``.grad``, buffers, modes, global RNG). ``n_hvp`` counts every product,
    including the determinism check's extra one.
    """
    if which not in ("largest", "smallest", "both"):
        raise ConfigurationError(f"which must be 'largest', 'smallest' or 'both', got {which!r}.")
    _check_common(k, tol, max_iter)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(int(seed))
    op = HVPOperator(
        model, batches, loss_fn, hvp=hvp, train=train, check_determinism=check_determinism, cache_graph=cache_graph
    )
    with op:
        v0 = start_vector(op, init, generator)
        out = lanczos(
            op.matvec,
            v0,
            k=k,
            which=which,
            tol=tol,
            max_iter=max_iter,
            generator=generator,
            return_eigenvectors=return_eigenvectors,
        )
    settings = {
        "which": which,
        "k": k,
        "tol": tol,
        "max_iter": max_iter,
        "seed": seed,
        "warm_start": init is not None,
        "train": train,
        "probe_examples": op.n_examples,
        "probe_batches": len(op.batches),
        "n_params": op.size,
    }
    return EigenResult(
        eigenvalues=out["eigenvalues"],
        residuals=out["residuals"],
        n_hvp=op.n_hvp,
        converged=out["converged"],
        eigenvectors=out["eigenvectors"],
        hvp_method=str(op.method),
        n_iter=out["n_iter"],
        seconds=time.perf_counter() - start,
        settings=settings,
    )
