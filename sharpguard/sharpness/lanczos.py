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
from .._validation import positive, positive_int
from ..errors import ConfigurationError
from .operator import HVPMethod, HVPOperator, is_sharded
from .. import _validation as rules

Which = Literal["largest", "smallest", "both"]

__all__ = ["EigenResult", "default_max_basis", "hessian_eigenvalues", "lanczos"]


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

    The basis is a list of rows allocated one per step (never a growing matrix that is copied when it
    fills). Without ``max_basis`` it keeps every vector (``alphas``/``betas`` then hold the tridiagonal
    ``T``, as stochastic Lanczos quadrature needs). With ``max_basis`` it keeps at most that many vectors
    plus the next one: when the basis is full, :meth:`thick_restart` replaces it by a few Ritz vectors
    (Wu & Simon, SIAM J. Matrix Anal. Appl. 22(2), 2000, sec. 2), after which the projected matrix
    ``T = V^T H V`` is an arrowhead block followed by a tridiagonal tail; it is kept dense (it is at most
    ``max_basis`` square) and the Ritz residual ``||H y - theta y|| = beta_m |s_m|`` holds unchanged,
    because ``H V_m = V_m T_m + beta_m v_{m+1} e_m^T`` holds after each restart.

    On an invariant subspace (``beta`` ~ 0) the recurrence restarts from a random vector orthogonal to the
    basis when ``restart`` is true, with a zero coupling in ``T`` (so ``T`` stays the projection of H).
    ``peak_rows`` counts the most basis vectors held at once (the solver's memory in model-size vectors).
    """

    def __init__(
        self,
        matvec: Callable[[torch.Tensor], torch.Tensor],
        v0: torch.Tensor,
        max_steps: int,
        generator: torch.Generator,
        *,
        restart: bool = True,
        max_basis: int | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        basis_device: torch.device | str | None = None,
        cost_only: bool = False,
    ) -> None:
        self.matvec, self.generator, self.restart = matvec, generator, restart
        # ``reduce`` sums partial results over the shards of a sharded vector (each rank holds a slice
        # of every vector: FSDP); every inner product and norm goes through it, nothing else changes.
        self.reduce = reduce
        # ``cost_only``: tensors without values (FakeTensorMode). Every product and every vector operation
        # runs as it would, with the recurrence's scalars kept as tensors and never read: no convergence
        # test, no breakdown test, T and the Ritz values are NaN.
        self.cost_only = bool(cost_only)
        # the products run where v0 lives; the basis rows may live elsewhere (host memory: basis_device)
        self.device = v0.device
        self.basis_device = torch.device(basis_device) if basis_device is not None else v0.device
        if reduce is not None and self.basis_device != self.device:
            reduce = _reduced_on(reduce, self.device)  # the collectives run where the products do (NCCL)
            self.reduce = reduce
        self.n_local = v0.numel()
        if reduce is None or self.cost_only:  # a cost-only run reads no count: the local size stands in
            n = self.n_local
        else:
            n = round(float(reduce(torch.tensor(float(self.n_local), dtype=torch.float64))))
        self.n = n
        self.max_steps = max_steps
        self.max_basis = None if max_basis is None else max(2, min(int(max_basis), n))
        if self.cost_only:
            first = (v0 / self._norm_tensor(v0)).to(self.basis_device)
        else:
            norm = self._norm(v0)
            if not (norm > 0 and math.isfinite(norm)):
                raise ConfigurationError("the start vector is zero or not finite; pass a nonzero finite init.")
            first = (v0 / norm).to(self.basis_device)
        self.rows: list[torch.Tensor] = [first]
        self.peak_rows = 1
        self.alphas: list[float] = []  # diagonal of T in step order (the tridiagonal T without restarts)
        self.betas: list[float] = []  # couplings; betas[-1] is the current residual norm beta_m
        self._beta_t: torch.Tensor | None = None  # cost-only: the last coupling, as a tensor (never read)
        self._T = np.zeros((0, 0))  # the projected matrix on the current basis (dense, small)
        self._coupling: np.ndarray | None = None  # row coupling the next vector to the kept Ritz vectors
        self.n_steps = 0  # products taken (restarts do not reset it)
        self.n_restarts = 0
        self.exhausted = False
        self._anorm = 0.0
        self._eps = torch.finfo(v0.dtype).eps

    def _norm_tensor(self, w: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return torch.linalg.vector_norm(w)
        return self.reduce(torch.dot(w, w).to(torch.float64).reshape(1))[0].clamp_min(0).sqrt().to(w.dtype)

    def _norm(self, w: torch.Tensor) -> float:
        if self.reduce is None:
            return float(torch.linalg.vector_norm(w))
        return math.sqrt(max(float(self.reduce(torch.dot(w, w).to(torch.float64).reshape(1))[0]), 0.0))

    def _dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        out = a @ b
        return float(out) if self.reduce is None else float(self.reduce(out.to(torch.float64).reshape(1))[0])

    def _dot_tensor(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a @ b
        return out if self.reduce is None else self.reduce(out.to(torch.float64).reshape(1))[0].to(out.dtype)

    @property
    def m(self) -> int:
        """Size of the current projected matrix (the basis vectors with a computed product)."""
        return self._T.shape[0]

    @property
    def V(self) -> torch.Tensor:  # the textbook name; a stacked copy, for inspection only
        return torch.stack(self.rows[: self.m])

    def _orthogonalize(self, w: torch.Tensor, upto: int) -> torch.Tensor:
        # Classical Gram-Schmidt applied twice against rows[:upto] ("twice is enough": Giraud et al. 2005).
        # The coefficients stay on the device (no host sync per row); each row is read twice per pass.
        # Updates ``w`` in place (callers pass a vector they own): no model-size temporaries.
        basis = self.rows[:upto]
        for _ in range(2):
            coeffs = torch.stack([torch.dot(r, w) for r in basis])
            if self.reduce is not None:
                coeffs = self.reduce(coeffs)  # one collective per pass for all the rows
            for r, c in zip(basis, coeffs):
                w.addcmul_(r, c, value=-1.0)
        return w

    def _grow_T(self, alpha: float) -> None:
        j = self.m
        t = np.zeros((j + 1, j + 1))
        t[:j, :j] = self._T
        t[j, j] = alpha
        if j > 0:
            if self._coupling is not None:  # first step after a thick restart: the arrowhead row
                t[j, : len(self._coupling)] = self._coupling
                t[: len(self._coupling), j] = self._coupling
                self._coupling = None
            else:
                t[j, j - 1] = t[j - 1, j] = self.betas[-1]
        self._T = t

    def step(self) -> bool:
        """One Lanczos step (one product). Returns False when no further step is possible."""
        j = self.m
        if self.exhausted or self.n_steps >= self.max_steps:
            return False
        if self.max_basis is not None and j >= self.max_basis:
            return False  # full: the caller restarts (thick_restart) or stops
        if self.cost_only:
            return self._step_unread(j)
        q = self.rows[j]
        q_dev = q.to(self.device)  # the row itself when the basis is where the products run
        w = self.matvec(q_dev)
        self.n_steps += 1
        finite = torch.isfinite(w).all()
        if self.reduce is not None:  # every shard must agree, or one rank raises while the others wait
            finite = self.reduce((~finite).to(torch.float64).reshape(1))[0] == 0
        if not bool(finite):
            raise ConfigurationError("a Hessian-vector product is not finite; check the model and probe for overflow.")
        alpha = self._dot(q_dev, w)
        del q_dev
        # a vector we own (the matvec's result may be shared), moved to the basis; in place below
        w = w.to(self.basis_device).sub_(q, alpha=alpha) if w.device != self.basis_device else w.sub(q, alpha=alpha)
        if j > 0 and self._coupling is None:
            w.sub_(self.rows[j - 1], alpha=self.betas[-1])
        w = self._orthogonalize(w, j + 1)
        beta = self._norm(w)
        self._grow_T(alpha)
        self.alphas.append(alpha)
        self._anorm = max(self._anorm, float(np.abs(self._T[j]).sum()) + beta)
        if j + 1 >= self.n:
            self.betas.append(0.0)
            self.exhausted = True
            return True
        if beta <= 100 * self._eps * self._anorm:
            # Invariant subspace: the Ritz values found so far are exact eigenvalues.
            self.betas.append(0.0)
            if not self.restart:
                self.exhausted = True
                return True
            r = torch.randn(self.n_local, generator=self.generator, dtype=w.dtype, device="cpu").to(self.basis_device)
            r = self._orthogonalize(r, j + 1)
            self.rows.append(r / self._norm(r))
        else:
            self.betas.append(beta)
            self.rows.append(w.div_(beta))  # w is ours (made by the sub above): no second copy
        self.peak_rows = max(self.peak_rows, len(self.rows))
        return True

    def _step_unread(self, j: int) -> bool:
        """:meth:`step` on tensors without values: the same product and vector operations (alpha and beta
        stay tensors on the device), no finiteness or breakdown test, NaN in ``T``."""
        q = self.rows[j]
        q_dev = q.to(self.device)
        w = self.matvec(q_dev)
        self.n_steps += 1
        alpha = self._dot_tensor(q_dev, w)
        del q_dev
        w = torch.addcmul(w.to(self.basis_device), q, alpha.to(self.basis_device), value=-1.0)
        if j > 0 and self._coupling is None and self._beta_t is not None:
            w.addcmul_(self.rows[j - 1], self._beta_t, value=-1.0)
        w = self._orthogonalize(w, j + 1)
        beta = self._norm_tensor(w)
        self._grow_T(math.nan)
        self.alphas.append(math.nan)
        self.betas.append(math.nan)
        self._beta_t = beta
        if j + 1 >= self.n:
            self.exhausted = True
            return True
        self.rows.append(w.div_(beta))
        self.peak_rows = max(self.peak_rows, len(self.rows))
        return True

    @property
    def full(self) -> bool:
        """Whether the basis holds ``max_basis`` vectors, so the next step needs a restart."""
        return self.max_basis is not None and self.m >= self.max_basis and not self.exhausted

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of ``T`` and residual norms ``beta_m |s_{m,i}|``."""
        if self.cost_only:  # no values: NaN Ritz values; the identity stands in for T's eigenvectors
            m = self.m
            return np.full(m, math.nan), np.eye(m), np.full(m, math.nan)
        if self.n_restarts == 0:
            # tridiagonal: the symmetric tridiagonal solver, as before restarts existed
            a = np.asarray(self.alphas, dtype=np.float64)
            b = np.asarray(self.betas[:-1], dtype=np.float64)
            theta, s = _eigh_tridiagonal(a, b)
        else:
            theta, s = np.linalg.eigh(self._T)
        residuals = abs(self.betas[-1]) * np.abs(s[-1, :])
        return theta, s, residuals

    def _combine(self, s: np.ndarray) -> list[torch.Tensor]:
        """New rows ``V_m s_i`` for the columns of ``s``, written over the first rows in column chunks so
        that no second basis is ever allocated (the temporary is ``m x chunk``)."""
        m, keep = s.shape
        coeffs = torch.as_tensor(np.ascontiguousarray(s), dtype=self.rows[0].dtype, device=self.rows[0].device)
        chunk = 1 << 16
        for lo in range(0, self.n_local, chunk):
            hi = min(lo + chunk, self.n_local)
            block = torch.stack([r[lo:hi] for r in self.rows[:m]])  # m x chunk
            new = coeffs.T @ block  # keep x chunk
            for i in range(keep):
                self.rows[i][lo:hi] = new[i]
        return self.rows[:keep]

    def thick_restart(self, keep: list[int]) -> None:
        """Keep the Ritz vectors ``keep`` (indices into ascending :meth:`ritz` order) and the residual
        direction; ``T`` becomes ``diag(theta_keep)`` coupled to the next vector by ``beta_m s_{m,i}``
        (Wu & Simon 2000, eq. 2.3)."""
        theta, s, _ = self.ritz()
        beta = self.betas[-1]
        s_keep = s[:, keep]
        nxt = self.rows[self.m]
        self._combine(s_keep)
        del self.rows[len(keep) :]
        self.rows.append(nxt)
        self._T = np.diag(theta[keep])
        self._coupling = beta * s_keep[-1, :]
        self.n_restarts += 1

    def ritz_vectors(self, s: np.ndarray) -> torch.Tensor:
        """Rows ``V_m^T s_i`` for the columns of ``s``."""
        coeffs = torch.as_tensor(np.ascontiguousarray(s), dtype=self.rows[0].dtype, device=self.rows[0].device)
        out = torch.zeros((s.shape[1], self.n_local), dtype=self.rows[0].dtype, device=self.rows[0].device)
        for i, r in enumerate(self.rows[: self.m]):
            out.add_(coeffs[i][:, None] * r[None, :])
        return out


def _reduced_on(reduce: Callable[[torch.Tensor], torch.Tensor],
                device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``reduce`` for partial sums held on another device: moved to ``device`` for the collective, back after."""
    return lambda t: reduce(t.to(device)).to(t.device)


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


def default_max_basis(k: int, which: Which) -> int:
    """The default basis cap: ``2 * k + 3`` vectors for the largest eigenvalues (5 for ``k=1``: one
    model-size vector less than 6 for a few more products from a cold start, docs/sharpness.md, and a
    warm-started check rarely fills it), ``4 * wanted + 16`` for the
    smallest or both ends (the negative end converges slowly and restarts cost more there)."""
    if which == "largest":
        return 2 * k + 3
    wanted = 2 * k if which == "both" else k
    return 4 * wanted + 16


def check_max_basis(max_basis: int | None, k: int, which: Which) -> None:
    """Raise a :class:`ConfigurationError` unless ``max_basis`` is None or an integer >= wanted + 2."""
    wanted = 2 * k if which == "both" else k
    if max_basis is not None and not (
        isinstance(max_basis, int) and not isinstance(max_basis, bool) and max_basis >= wanted + 2
    ):
        raise ConfigurationError(
            f"max_basis must be None or an integer >= {wanted + 2} (the wanted eigenvalues plus two), "
            f"got {max_basis!r}."
        )


def _restart_indices(m: int, wanted: int, which: Which, max_basis: int) -> list[int]:
    """Which Ritz vectors (ascending indices) a thick restart keeps: the wanted end(s) of the spectrum
    and their nearest neighbours, about half the basis, so the next cycle starts from the best
    approximations the old basis held (Wu & Simon 2000, sec. 3)."""
    keep = min(m - 1, max(wanted + 1, max_basis // 2))
    if which == "largest":
        return list(range(m - keep, m))
    if which == "smallest":
        return list(range(keep))
    low = keep // 2
    return list(range(low)) + list(range(m - (keep - low), m))


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
    max_basis: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    basis_device: torch.device | str | None = None,
    cost_only: bool = False,
    stop_early: bool = True,
) -> dict[str, Any]:
    """Run Lanczos from ``v0`` until the wanted Ritz pairs meet ``tol`` or ``max_iter`` products.

    ``max_basis`` bounds the vectors kept (default :func:`default_max_basis`); when the basis is full
    it is thick-restarted (see :class:`Krylov`). The result's ``peak_rows`` is the most model-size
    vectors the solver held at once. ``reduce`` (sharded vectors): sums a tensor of per-shard partial
    inner products over the shards, e.g. an all-reduce over the FSDP group.
    ``basis_device`` keeps the basis rows there (host memory: ``"cpu"``) while the products
    run where ``v0`` is (a matvec that reads host-resident vectors itself, as
    :class:`~sharpguard.sharpness.HVPOperator` does for its ``host_device``, takes ``v0`` there too);
    ``cost_only`` runs on tensors without values (every operation, nothing read:
    NaN eigenvalues, never converged, so exactly ``max_iter`` products); ``stop_early=False`` takes
    all ``max_iter`` products even after convergence.
    """
    check_max_basis(max_basis, k, which)
    if max_basis is None:
        max_basis = default_max_basis(k, which)
    kry = Krylov(matvec, v0, max_iter, generator, max_basis=max_basis, reduce=reduce, basis_device=basis_device,
                 cost_only=cost_only)
    # the basis holds v0 / ||v0||; dropping our reference frees v0 itself unless a caller still holds it
    # (hessian_eigenvalues passes it without keeping one): one model-size vector less for the whole run
    del v0
    need = min(kry.n, 2 * k if which == "both" else k)
    idx: list[int] = []
    theta = residuals = s = None
    converged = False
    while kry.n_steps < max_iter and not kry.exhausted:
        if kry.full:  # restart only when another product follows, so the last Ritz pairs stay valid
            kry.thick_restart(_restart_indices(kry.m, need, which, max_basis))
        kry.step()
        if kry.m < need:
            continue
        theta, s, residuals = kry.ritz()
        idx = _wanted(theta, k, which)
        floor = 1e-3 * float(np.max(np.abs(theta)))
        converged = all(residuals[i] <= tol * max(abs(theta[i]), floor) for i in idx)
        if converged and stop_early:
            break
    if theta is None:  # max_iter smaller than the number of wanted values
        theta, s, residuals = kry.ritz()
        idx = _wanted(theta, k, which)
    return {
        "eigenvalues": [float(theta[i]) for i in idx],
        "residuals": [float(residuals[i]) for i in idx],
        "eigenvectors": list(kry.ritz_vectors(s[:, idx])) if return_eigenvectors else None,
        "converged": bool(converged),
        "n_iter": kry.n_steps,
        "n_restarts": kry.n_restarts,
        "peak_rows": kry.peak_rows,
    }


@dataclass
class EigenResult:
    """Extreme eigenvalues of the probe-loss Hessian.

    ``eigenvalues`` are in descending (algebraic) order: for ``which="smallest"`` the most negative is
    last; for ``"both"`` the top ``k`` come first and the bottom ``k`` last. ``residuals[i]`` is the Ritz
    residual ``||H y_i - lambda_i y_i||`` (an upper bound on the eigenvalue error); ``converged`` says
    whether all of them met the tolerance. A cost-only run (``cost_only``: fake tensors, see
    :func:`hessian_eigenvalues`) claims no eigenvalue: ``eigenvalues`` and ``residuals`` are NaN,
    ``converged`` is False and ``n_hvp`` is the exact number of products run. ``n_restarts`` counts thick restarts and
    ``basis_vectors`` the most model-size Lanczos vectors held at once (the solver's memory). ``eigenvectors`` (on
    request) are unit flat vectors over the trainable parameters in ``model.parameters()`` order - pass one back as
    ``init=`` to warm-start.
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
    n_restarts: int = 0
    basis_vectors: int = 0
    cost_only: bool = False

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue found (``eigenvalues[0]``)."""
        return self.eigenvalues[0]

    @property
    def lambda_min(self) -> float:
        """The smallest eigenvalue found (``eigenvalues[-1]``)."""
        return self.eigenvalues[-1]


def _check_common(k: int, tol: float, max_iter: int) -> None:
    positive_int("k", k)
    positive("tol", tol)
    positive_int("max_iter", max_iter)


def start_vector(op: HVPOperator, init: Any, generator: torch.Generator,
                 device: torch.device | None = None) -> torch.Tensor:
    """``init`` as a flat vector, or a standard normal vector drawn from ``generator``, on ``device`` (default
    the model's: host memory keeps it and its normalized copy off the device, two vectors at a check's start)."""
    where = op.device if device is None else device
    if init is not None:
        return op.as_vector(init, "init vector").to(where)
    return torch.randn(op.size, generator=generator, dtype=op.dtype, device="cpu").to(where)


#: entries per draw of :func:`rademacher`: its int64 transient is 8 MiB however large the model
RADEMACHER_CHUNK = 1 << 20


def rademacher(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``n`` independent signs (+-1 with probability 1/2, Hutchinson 1989) in ``dtype`` on ``device``.

    Drawn as integers on the host ``RADEMACHER_CHUNK`` at a time into a vector of ``dtype``: the same stream as
    one ``torch.randint(0, 2, (n,))`` (the CPU generator draws serially), without its whole int64 vector,
    twice a float32 parameter vector, on the host at once; on an accelerator the vector is made on the host and
    copied over whole (the generator is a CPU one)."""
    device = torch.device(device)
    z = torch.empty(n, dtype=dtype, device=device if device.type in ("cpu", "meta") else "cpu")
    for start in range(0, n, RADEMACHER_CHUNK):
        part = z[start:start + RADEMACHER_CHUNK]
        part.copy_(torch.randint(0, 2, (part.numel(),), generator=generator, device="cpu"))
    return z.mul_(2).sub_(1).to(device)


BasisDevice = Literal["auto"] | str | torch.device | None


def resolve_basis_device(basis_device: BasisDevice, device: torch.device) -> torch.device:
    """Where the Krylov basis lives for products that run on ``device``: ``"auto"`` is host memory when the
    products run on an accelerator (the basis is ``max_basis + 1`` float32 vectors of the model's size,
    24 bytes a parameter at the default, three times AdamW's state: with micro-batched products it is
    what remains of a check's device memory) and ``device`` itself otherwise; ``None`` is ``device``."""
    if basis_device is None:
        return device
    if isinstance(basis_device, str) and basis_device == "auto":
        return torch.device("cpu") if device.type != "cpu" else device
    try:
        return torch.device(basis_device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"basis_device must be 'auto', None or a device such as 'cpu', got {basis_device!r}."
        ) from exc


def fixed_product_count(fixed_products: int | None, cost_only: bool, max_iter: int, max_basis: int) -> int | None:
    """The products a Lanczos measure runs regardless of convergence: ``fixed_products``, or on fake tensors
    (nothing can be read, so nothing can converge) ``min(max_iter, max_basis + 1)``, the fewest that fill
    the bounded basis and restart it once (the check's memory peak); None for a normal run."""
    if fixed_products is not None:
        return positive_int("fixed_products", fixed_products)
    return min(max_iter, max_basis + 1) if cost_only else None


def make_operator(
    model: nn.Module, batches: Any, loss_fn: LossFn | None, *, seed: int, **kwargs: Any
) -> tuple[HVPOperator, Callable[[torch.Tensor], torch.Tensor] | None, torch.Generator]:
    """The operator a Lanczos measure runs on, the ``reduce`` its vectors need and the seeded generator.

    An FSDP2 model gets :class:`~sharpguard.sharpness.sharded.ShardedHVPOperator` (finite differences of
    FSDP's gradients; the vectors are this rank's slices, summed over the ranks by ``reduce``), with the
    generator offset by the rank so each rank draws its own slice of a random start vector.
    """
    if not is_sharded(model):
        return HVPOperator(model, batches, loss_fn, **kwargs), None, torch.Generator().manual_seed(int(seed))
    from .sharded import ShardedHVPOperator, slice_generator

    kwargs.pop("cache_graph", None)  # no graph to cache: every product is two gradient passes
    op = ShardedHVPOperator(model, batches, loss_fn, **kwargs)
    return op, op.reduce_sum, slice_generator(seed)


@rules.checked()
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
    micro_batches: int | Literal["auto"] = "auto",
    max_basis: int | None = None,
    basis_device: BasisDevice = "auto",
    fixed_products: int | None = None,
) -> EigenResult:
    """The ``k`` algebraically largest (and/or smallest) eigenvalues of the probe-loss Hessian.

    Lanczos with full reorthogonalization, stopped on Ritz residuals (see the module docstring).
    ``init`` warm-starts from a previous eigenvector (a monitor passes last call's top vector, which
    cuts the products per call to a handful when the Hessian moved little). ``max_iter`` caps the
    products. ``max_basis`` caps the Lanczos vectors held (default :func:`default_max_basis`, 5 for
    ``k=1``): a full basis is thick-restarted (Wu & Simon 2000), so the memory is ``max_basis + 1``
    vectors of the model's size whatever ``max_iter`` (``max_basis`` and the product during a
    product); pass ``max_basis=max_iter`` for plain Lanczos.
    ``micro_batches`` runs each probe batch as that many micro-batches
    (:class:`~sharpguard.sharpness.HVPOperator`): the double-backward graph then holds one micro-batch's
    activations. The default ``"auto"`` (:func:`~sharpguard.sharpness.auto_micro_batches`) splits as far
    as a check's extra memory must stay within a training step's on the same batch, and not at all
    where the whole batch's graph fits (then the graph is cached: a product is one double backward).
    ``basis_device`` holds the Lanczos basis (``"auto"``: host memory when the model is on an
    accelerator, see :func:`resolve_basis_device`; ``None``: the model's device).
    ``fixed_products=n`` runs exactly ``n`` products whatever the convergence (plus the determinism
    check's one). On fake tensors (a model built under ``FakeTensorMode``, FSDP2 on a fake process group)
    nothing can be read back, so the call is a cost-only run: every operation of a check runs, no
    eigenvalue is claimed (NaN; ``cost_only=True``), the determinism check runs its second product but
    compares nothing, and ``n_hvp`` is ``fixed_products`` (by default ``min(max_iter, max_basis + 1)``,
    enough to fill the basis and restart it once, the check's memory peak) plus that product. On a sharded
    (FSDP2) model every rank calls this with its own probe batches (the same number on every rank): the
    products are finite differences
    of FSDP's gradients and the vectors (``eigenvectors``, ``init``) are this rank's slices
    (:mod:`sharpguard.sharpness.sharded`). The model is left exactly
    as found (parameters, ``.grad``, buffers, modes, global RNG). ``n_hvp`` counts every product,
    including the determinism check's extra one.
    """
    if which not in ("largest", "smallest", "both"):
        raise ConfigurationError(f"which must be 'largest', 'smallest' or 'both', got {which!r}.")
    _check_common(k, tol, max_iter)
    check_max_basis(max_basis, k, which)
    if fixed_products is not None:
        positive_int("fixed_products", fixed_products)
    cap = max_basis if max_basis is not None else default_max_basis(k, which)
    where = resolve_basis_device(basis_device, next(p for p in model.parameters()).device)
    start = time.perf_counter()
    op, reduce, generator = make_operator(
        model, batches, loss_fn, seed=seed, hvp=hvp, train=train, check_determinism=check_determinism,
        cache_graph=cache_graph, micro_batches=micro_batches, host_device=where,
    )
    fixed = fixed_product_count(fixed_products, op.cost_only, max_iter, cap)
    if reduce is not None and where != op.device:
        reduce = _reduced_on(reduce, op.device)  # the collectives run where the products do (NCCL)
    with op:
        # every vector starts where the basis lives: the operator reads host-resident rows itself (its
        # host_device is `where`), so no Lanczos vector is ever copied to the device for a product
        out = lanczos(
            op.matvec,
            start_vector(op, init, generator, where),  # not kept here: the basis holds its normalized copy
            k=k,
            which=which,
            tol=tol,
            max_iter=max_iter if fixed is None else fixed,
            generator=generator,
            return_eigenvectors=return_eigenvectors,
            max_basis=max_basis,
            reduce=reduce,
            basis_device=where,
            cost_only=op.cost_only,
            stop_early=fixed is None,
        )
    settings = {
        "which": which,
        "k": k,
        "tol": tol,
        "max_iter": max_iter,
        "seed": seed,
        "warm_start": init is not None,
        "train": train,
        "micro_batches": op.micro_batches,
        "probe_examples": op.n_examples,
        "probe_batches": len(op.batches),
        "n_params": total_size(op, reduce),
        "sharded": reduce is not None,
        "max_basis": cap,
        "basis_device": str(where),
        "fixed_products": fixed,
        "cost_only": op.cost_only,
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
        n_restarts=out["n_restarts"],
        basis_vectors=out["peak_rows"],
        cost_only=op.cost_only,
    )


def total_size(op: HVPOperator, reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> int:
    """The trainable parameters over every shard (a cost-only run cannot read the sum: the ranks are alike)."""
    if reduce is None:
        return op.size
    if op.cost_only:
        return op.size * torch.distributed.get_world_size()
    return round(float(reduce(torch.tensor([float(op.size)], dtype=torch.float64))[0]))
