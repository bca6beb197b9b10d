"""Sharpness as a loss increase under weight perturbations (SAM-style, average-case, Keskar).

Definitions (``L`` the probe loss, ``w`` the trainable parameters, ``T = diag(|w| + eta)`` when
``adaptive``, else the identity):

* worst case (Foret et al., ICLR 2021, eq. 1; adaptive: Kwon et al., ICML 2021, eq. 6):
  ``max_{||T^-1 delta||_p <= rho} L(w + delta) - L(w)``, ``p`` in {2, inf}. Estimated from below by
  projected normalized-gradient ascent in ``u = T^-1 delta`` (as tml-epfl/sharpness-vs-generalization,
  Andriushchenko et al., ICML 2023): the first step is the closed-form first-order maximizer
  (``rho g/||g||`` or ``rho sign(g)``, the SAM / FGSM point), later steps have size ``rho/2``, halved
  whenever the loss fails to rise; the best iterate is reported. ``per_batch=True`` solves the problem on
  every probe batch separately and averages (m-sharpness with ``m`` the batch size; Foret et al., sec. 4).
* average case (Andriushchenko et al., 2023, eq. 3): ``E_{delta ~ N(0, sigma^2 T^2)} L(w + delta) - L(w)``,
  by Monte Carlo with a standard error.
* first order: ``rho ||T g||_q`` with ``q`` the dual norm of ``p`` (2 -> 2, inf -> 1), the linear
  approximation of the worst case; one gradient.
* Keskar et al. (ICLR 2017, Metric 2.1) with ``A = I``:
  ``100 (max_{|y_i| <= eps (|w_i| + 1)} L(w + y) - L(w)) / (1 + L(w))``, maximized by scipy's L-BFGS-B
  over the box (as the paper does) or, without scipy, by projected sign ascent; the solver is recorded.

Every result records its definition and settings (rho, steps, adaptive, norm, probe size), so numbers from
unlike definitions are never compared by accident. Sharpness of these kinds is not invariant to
reparametrization (Dinh et al., ICML 2017); the adaptive forms are invariant to elementwise rescaling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._batches import LossFn
from .._validation import one_of, positive
from ..errors import ConfigurationError
from .operator import ProbeLoss, has_fake_tensors, is_sharded
from .sharded import ShardedHVPOperator, slice_generator
from .. import _validation as rules

Norm = Literal["l2", "linf"]

__all__ = [
    "SharpnessResult",
    "average_sharpness",
    "first_order_sharpness",
    "keskar_sharpness",
    "worst_case_sharpness",
]


@dataclass
class SharpnessResult:
    """``value`` of the sharpness named by ``definition``, computed with ``settings``.

    ``loss`` is the probe loss at ``w``; ``perturbed_loss`` the loss at the perturbation found (worst and
    Keskar) or the mean perturbed loss (average); ``stderr`` is set for Monte Carlo estimates.
    """

    value: float
    definition: str
    settings: dict[str, Any]
    loss: float
    perturbed_loss: float
    stderr: float | None = None
    n_forward: int = 0
    n_backward: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _check_positive(name: str, value: float) -> None:
    positive(name, value)


def _check_norm(norm: str) -> None:
    one_of("norm", norm, ("l2", "linf"))


def _probe(model: nn.Module, batches: Any, loss_fn: LossFn | None, train: bool) -> ProbeLoss:
    """The probe loss a perturbation measure moves the weights of. An FSDP2 model gets the sharded operator's
    (:mod:`.sharded`): FSDP's own gradient, this rank's slice of every vector, norms summed over the ranks."""
    if not is_sharded(model):
        return ProbeLoss(model, batches, loss_fn, train=train)
    return ShardedHVPOperator(model, batches, loss_fn, train=train, check_determinism=False, micro_batches=1)


def _scale(probe: ProbeLoss, adaptive: bool, eta: float) -> torch.Tensor | None:
    """The diagonal of ``T`` (``|w| + eta``), or None for the identity."""
    return probe.w0.abs() + eta if adaptive else None


def _direction(probe: ProbeLoss, g: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Unit ascent direction of a linear function with gradient ``g`` in the ``norm`` ball (the 2-norm over
    every rank's slice of a sharded model). In a cost-only run (fake tensors, no value to read) the same
    tensor work, with the test kept on the device."""
    if norm == "linf":
        return torch.sign(g)
    n = probe._norm_tensor(g)
    if probe.cost_only:
        return torch.where(n > 0, g / n, torch.zeros_like(g))
    return g / n if float(n) > 0 else torch.zeros_like(g)


def _project(probe: ProbeLoss, u: torch.Tensor, rho: float, norm: Norm) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    if probe.cost_only:  # the radius test on the device (fake tensors have no value to read)
        n_t = probe._norm_tensor(u)
        return u * torch.where(n_t > rho, rho / n_t, torch.ones_like(n_t))
    n = probe.vector_norm(u)
    return u * (rho / n) if n > rho else u


def _ascent(probe: ProbeLoss, rho: float, steps: int, t: torch.Tensor | None, norm: Norm) -> tuple[float, float]:
    """Projected normalized-gradient ascent in ``u`` (``delta = T u``); returns (L(w), best L(w + delta)).

    In a cost-only run (``probe.cost_only``: fake tensors) the losses are NaN, so no step is ever halved:
    exactly ``steps`` gradients and one forward, as a real run without overshoot."""
    w0 = probe.w0
    u = torch.zeros_like(w0)
    step, previous = rho, -math.inf
    base = best = None
    for it in range(steps + 1):
        probe.set_parameters(w0 + (u if t is None else t * u))
        if it == steps:  # the last iterate only needs its loss
            loss = probe.loss()
        else:
            loss, g = probe.loss_and_grad()
        if base is None:
            base = best = loss
        best = max(best, loss)
        if it == steps:
            break
        if it > 1 and loss <= previous:
            step /= 2  # overshoot: shorten the step (APGD-style, Croce & Hein 2020)
        previous = loss
        u = _project(probe, u + step * _direction(probe, g if t is None else t * g, norm), rho, norm)
        if it == 0:
            step = rho / 2
    probe.set_parameters(w0)
    return float(base), float(best)


def _settings(probe: ProbeLoss, **kw: Any) -> dict[str, Any]:
    # ``cost_only`` only on fake tensors: a real run's settings are as they were
    flag = {"cost_only": True} if probe.cost_only else {}
    if probe.supports_sharded:
        flag["sharded"] = True  # the sharded operator's probe: the numbers are the union's, on every rank
    return {**kw, "probe_examples": probe.n_examples, "probe_batches": len(probe.batches), **flag}


@rules.checked()
def worst_case_sharpness(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    rho: float = 0.05,
    steps: int = 5,
    adaptive: bool = False,
    norm: Norm = "l2",
    per_batch: bool = False,
    eta: float = 0.0,
    train: bool = False,
) -> SharpnessResult:
    """``max_{||T^-1 delta||_p <= rho} L(w + delta) - L(w)`` by ``steps`` ascent steps (a lower bound).

    ``adaptive=True`` uses ``T = diag(|w| + eta)`` (ASAM's scale-invariant ball); ``per_batch=True``
    gives m-sharpness (one maximization per probe batch, averaged by batch size). ``steps=1`` is the
    SAM perturbation. Costs ``steps`` gradients and one extra forward per maximization.
    """
    _check_positive("rho", rho)
    _check_norm(norm)
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigurationError(f"steps must be a positive integer, got {steps!r}.")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ConfigurationError(f"eta must be a non-negative number, got {eta!r}.")
    if per_batch and is_sharded(model):
        raise ConfigurationError(
            "per_batch=True (m-sharpness) maximizes on each rank's own batch, but a sharded (FSDP2) model's "
            "gradient is every rank's at once; pass per_batch=False, or measure an unsharded copy."
        )
    start = time.perf_counter()
    probe = _probe(model, batches, loss_fn, train)
    with probe:
        t = _scale(probe, adaptive, eta)
        if per_batch:
            totals = torch.zeros(3, dtype=torch.float64, device=probe.device)  # sum n L, sum n L_adv, sum n
            for batch in probe.batches:
                sub = probe.restricted(batch)
                base, best = _ascent(sub, rho, steps, t, norm)
                probe.n_forward, probe.n_backward = sub.n_forward, sub.n_backward
                n = sub.n_examples
                totals += torch.tensor([n * base, n * best, n], dtype=torch.float64, device=probe.device)
            totals = probe._all_reduce(totals)
            base, best = probe._read(totals[0] / totals[2]), probe._read(totals[1] / totals[2])
        else:
            base, best = _ascent(probe, rho, steps, t, norm)
    kind = "adaptive " if adaptive else ""
    ball = "||T^-1 delta||" if adaptive else "||delta||"
    definition = (
        f"{kind}worst-case sharpness: max over {ball}_{norm[1:]} <= rho of L(w+delta) - L(w), "
        f"{'averaged over probe batches (m-sharpness)' if per_batch else 'on the whole probe'}; "
        f"lower bound by {steps}-step projected normalized-gradient ascent"
        + (", T = diag(|w| + eta)" if adaptive else "")
        + " (Foret et al. 2021; Kwon et al. 2021; Andriushchenko et al. 2023)"
    )
    return SharpnessResult(
        value=best - base,
        definition=definition,
        settings=_settings(
            probe, rho=rho, steps=steps, adaptive=adaptive, norm=norm, per_batch=per_batch, eta=eta, train=train
        ),
        loss=base,
        perturbed_loss=best,
        n_forward=probe.n_forward,
        n_backward=probe.n_backward,
        seconds=time.perf_counter() - start,
    )


@rules.checked()
def average_sharpness(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    sigma: float = 0.01,
    n_samples: int = 10,
    adaptive: bool = False,
    eta: float = 0.0,
    seed: int = 0,
    train: bool = False,
) -> SharpnessResult:
    """``E[L(w + delta)] - L(w)`` with ``delta ~ N(0, sigma^2 T^2)``: forward passes only.

    For small ``sigma`` this is about ``sigma^2 / 2 * tr(T H T)``. The noise comes from a private
    generator seeded with ``seed`` (the same on every rank); ``stderr`` is the Monte Carlo error.
    """
    _check_positive("sigma", sigma)
    if not (isinstance(n_samples, int) and n_samples >= 2):
        raise ConfigurationError(f"n_samples must be an integer >= 2 (for a standard error), got {n_samples!r}.")
    if not (eta >= 0 and math.isfinite(eta)):
        raise ConfigurationError(f"eta must be a non-negative number, got {eta!r}.")
    start = time.perf_counter()
    probe = _probe(model, batches, loss_fn, train)
    # on a sharded model each rank draws its own slice of the noise
    generator = slice_generator(seed) if probe.supports_sharded else torch.Generator().manual_seed(int(seed))
    with probe:
        t = _scale(probe, adaptive, eta)
        base = probe.loss()
        rises = []
        for _ in range(n_samples):
            noise = torch.randn(probe.size, generator=generator, dtype=probe.dtype).to(probe.device) * sigma
            probe.set_parameters(probe.w0 + (noise if t is None else t * noise))
            rises.append(probe.loss() - base)
        probe.set_parameters(probe.w0)
    mean = math.fsum(rises) / n_samples
    stderr = math.sqrt(math.fsum((r - mean) ** 2 for r in rises) / (n_samples - 1) / n_samples)
    kind = "adaptive " if adaptive else ""
    cov = "sigma^2 diag(|w| + eta)^2" if adaptive else "sigma^2 I"
    return SharpnessResult(
        value=mean,
        definition=f"{kind}average-case sharpness: E[L(w+delta)] - L(w), delta ~ N(0, {cov}), "
        f"Monte Carlo over {n_samples} draws (Andriushchenko et al. 2023)",
        settings=_settings(probe, sigma=sigma, n_samples=n_samples, adaptive=adaptive, eta=eta, seed=seed, train=train),
        loss=base,
        perturbed_loss=base + mean,
        stderr=stderr,
        n_forward=probe.n_forward,
        seconds=time.perf_counter() - start,
    )


@rules.checked()
def first_order_sharpness(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    norm: Norm = "l2",
    eta: float = 0.0,
    train: bool = False,
) -> SharpnessResult:
    """``rho * ||T g||_q`` (``q`` dual to ``norm``): the first-order worst case, one gradient."""
    _check_positive("rho", rho)
    _check_norm(norm)
    start = time.perf_counter()
    probe = _probe(model, batches, loss_fn, train)
    with probe:
        t = _scale(probe, adaptive, eta)
        base, g = probe.loss_and_grad()
        tg = g if t is None else t * g
        # over every rank's slice of a sharded model; NaN when cost-only
        norm_t = probe._norm_tensor(tg) if norm == "l2" else probe._sum_over_slices(tg.abs().sum())
        dual = probe._read(norm_t)
    kind = "adaptive " if adaptive else ""
    dual_name = "||T g||" if adaptive else "||g||"
    return SharpnessResult(
        value=rho * dual,
        definition=f"{kind}first-order sharpness: rho * {dual_name}_{'2' if norm == 'l2' else '1'} "
        f"(linearization of the {norm} worst case; Foret et al. 2021, eq. 2)",
        settings=_settings(probe, rho=rho, adaptive=adaptive, norm=norm, eta=eta, train=train),
        loss=base,
        perturbed_loss=base + rho * dual,
        n_forward=probe.n_forward,
        n_backward=probe.n_backward,
        seconds=time.perf_counter() - start,
    )


@rules.checked()
def keskar_sharpness(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    epsilon: float = 1e-3,
    max_iter: int = 10,
    solver: Literal["auto", "lbfgsb", "projected"] = "auto",
    train: bool = False,
) -> SharpnessResult:
    """Keskar et al.'s epsilon-sharpness (percent): ``100 (max_box L(w+y) - L(w)) / (1 + L(w))``.

    The box is ``|y_i| <= epsilon (|w_i| + 1)`` (``A = I``). ``solver="auto"`` uses scipy's L-BFGS-B
    (``max_iter`` iterations, as the paper) when scipy is installed, else projected sign ascent with
    ``max_iter`` steps. On fake tensors (``FakeTensorMode``) only the projected solver runs (a cost-only
    run: NaN value, ``cost_only`` in the settings).
    """
    _check_positive("epsilon", epsilon)
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigurationError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if solver not in ("auto", "lbfgsb", "projected"):
        raise ConfigurationError(f"solver must be 'auto', 'lbfgsb' or 'projected', got {solver!r}.")
    if solver in ("auto", "lbfgsb"):
        try:
            from scipy.optimize import minimize
        except ImportError:
            if solver == "lbfgsb":
                raise ConfigurationError("solver='lbfgsb' needs scipy; install it or pass solver='projected'.")
            minimize = None
        solver = "lbfgsb" if minimize is not None and not (solver == "auto" and is_sharded(model)) else "projected"
    if solver == "lbfgsb" and is_sharded(model):
        raise ConfigurationError(
            "scipy's L-BFGS-B needs the whole weight vector on one host, but each rank holds a slice of a sharded "
            "(FSDP2) model; pass solver='projected' (or 'auto', which takes it for a sharded model)."
        )
    if solver == "lbfgsb" and has_fake_tensors(model):
        raise ConfigurationError(
            "scipy's L-BFGS-B reads the loss and gradient on the host, which fake tensors (FakeTensorMode) do not "
            "have; pass solver='projected' for a cost-only run of max_iter gradients."
        )
    start = time.perf_counter()
    probe = _probe(model, batches, loss_fn, train)
    with probe:
        w0 = probe.w0
        bound = epsilon * (w0.abs() + 1.0)
        base, g0 = probe.loss_and_grad()
        best = base
        if solver == "lbfgsb":
            import numpy as np

            def objective(y: np.ndarray) -> tuple[float, np.ndarray]:
                nonlocal best
                probe.set_parameters(w0 + torch.as_tensor(y, dtype=probe.dtype, device=probe.device))
                loss, g = probe.loss_and_grad()
                best = max(best, loss)
                return -loss, -g.detach().cpu().double().numpy()

            b = bound.detach().cpu().double().numpy()
            minimize(
                objective,
                np.zeros_like(b),
                jac=True,
                method="L-BFGS-B",
                bounds=list(zip(-b, b)),
                options={"maxiter": max_iter},
            )
        else:
            y = torch.zeros_like(w0)
            g, step = g0, 1.0
            for _ in range(max_iter):
                y = torch.maximum(torch.minimum(y + step * bound * torch.sign(g), bound), -bound)
                probe.set_parameters(w0 + y)
                loss, g = probe.loss_and_grad()
                best = max(best, loss)
                step /= 2  # the first step reaches a box corner; later ones refine
        probe.set_parameters(w0)
    return SharpnessResult(
        value=100.0 * (best - base) / (1.0 + base),
        definition="Keskar epsilon-sharpness: 100 * (max_{|y_i| <= eps(|w_i|+1)} L(w+y) - L(w)) / (1 + L(w)), "
        f"A = I, maximized by {'scipy L-BFGS-B' if solver == 'lbfgsb' else 'projected sign ascent'} "
        "(Keskar et al. 2017, Metric 2.1)",
        settings=_settings(probe, epsilon=epsilon, max_iter=max_iter, solver=solver, train=train),
        loss=base,
        perturbed_loss=best,
        n_forward=probe.n_forward,
        n_backward=probe.n_backward,
        seconds=time.perf_counter() - start,
    )
