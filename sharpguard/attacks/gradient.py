"""White-box gradient attacks in input space: FGSM, PGD, APGD and APGD-T.

All of them differentiate with ``torch.autograd.grad`` with respect to the input only, so no
parameter's ``.grad`` is ever written (advertorch and the Fast-AT/AWP scripts call ``.backward()``
and throw the weight gradients away). They run inside :func:`attack_context` (modes saved and
restored per module, BN statistics untouched, grad enabled under ``no_grad``/``inference_mode``),
follow the device and dtype of ``x``, and draw random starts from their own generator.
"""

from __future__ import annotations

from collections.abc import Callable

import copy
import dataclasses
import math

import torch
from torch import nn

from .._batches import logits_of
from .._validation import non_negative
from ..errors import ConfigurationError
from . import _progress, geometry
from ._context import as_normal_tensor, attack_context, check_label_range, check_labels, check_steps
from .losses import NEEDS_LABELS, AttackLoss, dlr_targeted, resolve_loss
from .threat import ThreatModel, default_generator
from .. import _validation as rules

__all__ = ["fgsm", "pgd", "apgd", "apgd_targeted"]

Forward = Callable[[torch.Tensor], torch.Tensor]


def _threat(threat, norm, eps, bounds, mean, std) -> ThreatModel:
    if threat is not None:
        if not isinstance(threat, ThreatModel):
            raise ConfigurationError(f"threat must be a ThreatModel, got {type(threat).__name__}.")
        return threat
    return ThreatModel(norm=norm, eps=eps, bounds=bounds, mean=mean, std=std)


class _Problem:
    """What one attack call needs: pixel-space clean batch, labels, reference logits and a forward."""

    def __init__(self, model, x, y, tm: ThreatModel, loss: str | AttackLoss, reference_logits, targeted: bool,
                 check_range: bool = True):
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
            raise ConfigurationError("x must be a non-empty tensor with the batch in dimension 0.")
        if not x.dtype.is_floating_point:
            raise ConfigurationError(f"x must be a floating-point tensor, got dtype {x.dtype}.")
        self.loss_fn = resolve_loss(loss)
        self.y = check_labels(y, x.shape[0], required=self.loss_fn in NEEDS_LABELS or targeted)
        self.tm = tm
        self.model = model
        self.targeted = targeted
        self.x0 = tm.to_pixel(as_normal_tensor(x), check=check_range)
        self.reference = None
        self._classes_checked = False
        if reference_logits is not None:
            self.reference = as_normal_tensor(reference_logits)
        elif self.loss_fn not in NEEDS_LABELS:
            with torch.no_grad():  # label-free losses (KL) compare with the clean prediction, computed once
                self.reference = self.forward(self.x0)

    def restrict(self, index: torch.Tensor, loss_fn: AttackLoss | None = None) -> "_Problem":
        """The same problem on the examples ``index`` (and, if given, another per-example objective)."""
        sub = copy.copy(self)
        sub.x0 = self.x0[index]
        sub.y = None if self.y is None else self.y[index]
        sub.reference = None if self.reference is None else self.reference[index]
        if loss_fn is not None:
            sub.loss_fn = loss_fn
        return sub

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        # a view, not the leaf itself: torch's module trackers (FlopCounterMode, MemTracker) hook the
        # inputs of a module, and those hooks break autograd.grad with respect to a leaf input
        return logits_of(self.model(self.tm.from_pixel(u).view_as(u)))

    def check_classes(self, logits: torch.Tensor) -> None:
        """Labels against the model's number of outputs, once per attack (the first forward tells it)."""
        if not self._classes_checked and self.y is not None:
            check_label_range(self.y, logits.shape[-1])
        self._classes_checked = True

    def per_example(self, logits: torch.Tensor) -> torch.Tensor:
        self.check_classes(logits)
        values = self.loss_fn(logits, self.y, self.reference)
        if values.dim() == 0:
            values = values.expand(logits.shape[0])
        return -values if self.targeted else values

    def loss_and_grad(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, per-example objective, gradient w.r.t. ``u``): one forward, one input-only backward."""
        u = u.detach().requires_grad_(True)
        logits = self.forward(u)
        values = self.per_example(logits)
        (grad,) = torch.autograd.grad(values.sum(), u)
        return logits.detach(), values.detach(), grad

    def success(self, logits: torch.Tensor) -> torch.Tensor:
        if self.y is None:
            return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        hit = logits.argmax(-1) == self.y
        return hit if self.targeted else ~hit

    def keep_worst(self, best, candidate):
        """Per example, prefer a successful point, then the higher objective (restarts)."""
        if best is None:
            return candidate
        (u_b, s_b, l_b), (u_c, s_c, l_c) = best, candidate
        take = (s_c & ~s_b) | ((s_c == s_b) & (l_c > l_b))
        mask = take.reshape((-1,) + (1,) * (u_b.dim() - 1))
        return torch.where(mask, u_c, u_b), s_b | s_c, torch.where(take, l_c, l_b)

    def evaluate(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = self.forward(u)
            return self.success(logits), self.per_example(logits)


def _check_common(alpha: float, restarts: int) -> None:
    non_negative("alpha (the step size)", alpha)
    check_steps(restarts, "restarts")


@rules.checked()
def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float = 8 / 255,
    alpha: float = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool | str = True,
    *,
    restarts: int = 1,
    targeted: bool = False,
    loss: str | AttackLoss = "ce",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    generator: torch.Generator | None = None,
    threat: ThreatModel | None = None,
    model_mode: str = "eval",
    reference_logits: torch.Tensor | None = None,
    check_range: bool = True,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al., ICLR 2018, eq. 2.1/section 2.1) and its l2 version.

    Each step is ``u <- Proj_{B(x, eps) ∩ bounds}(u + alpha * d)``, with ``d = sign(g)`` for linf and
    ``g / ||g||_2`` per example for l2, ``g`` the input gradient of the summed per-example ``loss``.
    ``random_start``: ``True``/``"uniform"`` (uniform in the ball), ``"normal"`` (``0.001 N(0,1)`` as
    TRADES) or ``False``. ``restarts > 1`` keeps, per example, a successful point before a
    higher-loss one. ``targeted=True`` reads ``y`` as target classes and minimises the loss.
    ``threat`` (a :class:`ThreatModel`) replaces ``norm``/``eps``/``bounds``/``mean``/``std``.
    ``reference_logits`` feeds ``loss="kl"`` (default: the clean logits, one extra forward).
    ``check_range=False`` skips the input-range check (its one device synchronisation per call).
    Returns the adversarial batch in the space ``x`` was given in (normalized if ``mean``/``std``).
    Cost: ``restarts * steps`` forwards and input-only backwards (+1 forward per restart if > 1).
    """
    tm = _threat(threat, norm, eps, bounds, mean, std)
    tm.require_norm("pgd and fgsm")
    steps = check_steps(steps)
    _check_common(alpha, restarts)
    kind = {True: "uniform", False: None, "uniform": "uniform", "normal": "normal"}.get(random_start, "?")
    if kind == "?":
        raise ConfigurationError(f"random_start must be True, False, 'uniform' or 'normal', got {random_start!r}.")
    with attack_context(model, model_mode):
        problem = _Problem(model, x, y, tm, loss, reference_logits, targeted, check_range)
        x0 = problem.x0
        gen = None
        if kind is not None:
            gen = generator if generator is not None else default_generator(x0.device)
        best = None
        for _ in range(restarts):
            u = x0.clone() if kind is None else tm.random_start(x0, gen, kind)
            for _ in range(steps):
                _, _, grad = problem.loss_and_grad(u)
                u = tm.project(tm.ascent_step(u, grad, alpha), x0)
            if restarts > 1:
                best = problem.keep_worst(best, (u, *problem.evaluate(u)))
            else:
                best = (u,)
        return tm.from_pixel(best[0]).detach()


@rules.checked()
def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float = 8 / 255,
    *,
    alpha: float | None = None,
    norm: str = "linf",
    random_start: bool | str = False,
    targeted: bool = False,
    loss: str | AttackLoss = "ce",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    generator: torch.Generator | None = None,
    threat: ThreatModel | None = None,
    model_mode: str = "eval",
    reference_logits: torch.Tensor | None = None,
    check_range: bool = True,
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al., ICLR 2015): one step of length ``alpha`` (default ``eps``).

    With ``random_start=True`` and ``alpha=1.25 * eps`` this is FGSM-RS (Wong et al., ICLR 2020, Alg. 3).
    The step is projected back onto the ball and into bounds. Cost: 1 forward, 1 input-only backward.
    """
    tm = _threat(threat, norm, eps, bounds, mean, std)
    return pgd(
        model, x, y, alpha=tm.eps if alpha is None else alpha, steps=1, random_start=random_start,
        targeted=targeted, loss=loss, generator=generator, threat=tm, model_mode=model_mode,
        reference_logits=reference_logits, check_range=check_range,
    )


@rules.checked(rho=rules.probability)
def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float = 8 / 255,
    steps: int = 100,
    norm: str = "linf",
    *,
    restarts: int = 1,
    loss: str | AttackLoss = "ce",
    momentum: float = 0.75,
    rho: float = 0.75,
    eps_schedule: bool = True,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    generator: torch.Generator | None = None,
    threat: ThreatModel | None = None,
    model_mode: str = "eval",
    check_range: bool = True,
) -> torch.Tensor:
    """Auto-PGD (Croce & Hein, ICML 2020, Algorithm 1), APGD-CE by default (``loss="dlr"`` for APGD-DLR).

    Step size starts at ``2 eps`` and follows the iterate with momentum ``0.75`` (eq. 2). At the
    checkpoints ``w_j`` (first at ``0.22 N``, then shrinking by ``0.03 N`` down to ``0.06 N``) the step
    halves and the iterate restarts from the best point for every example whose loss increased in
    at most ``rho`` of the steps since the last checkpoint, or that did not improve and was not
    already halved (conditions 1 and 2 of section 3.2). Returns, per example, the first point found
    that is misclassified, else the highest-loss point. Cost: ``restarts * (steps + 1)`` forwards
    and input-only backwards.

    ``norm="l1"``: l1-APGD (Croce & Hein, ICML 2021, "Mind the box", Algorithm 2): the step moves
    along the sign of the ``k`` largest gradient coordinates, ``u + eta * sign(g_k) / ||sign(g_k)||_1``
    (eq. 6), followed by the exact projection onto the l1 ball intersected with the input box
    (:func:`~sharpguard.attacks.geometry.project_l1_box`); no momentum; every ``0.04 N`` steps the
    sparsity ``k`` follows the best point's (``||u_best - x||_0 / 1.5``) and the step size resets to
    ``eps`` when the sparsity fell by 5 % or more, else shrinks by 1.5 (down to ``eps / 10``).
    ``eps_schedule=True`` (AutoAttack's standard l1 setting) runs ``0.3 N, 0.3 N, 0.4 N`` steps at
    radii ``3 eps, 2 eps, eps`` from a Gaussian start, each stage starting from the previous best
    projected onto the smaller ball. ``momentum``/``rho`` are not used by l1-APGD. Cost with the
    schedule: ``restarts * (steps + 3)`` forwards and input-only backwards (one start per stage).
    """
    tm = _threat(threat, norm, eps, bounds, mean, std)
    steps = check_steps(steps)
    _check_common(0.0, restarts)
    with attack_context(model, model_mode):
        problem = _Problem(model, x, y, tm, loss, None, False, check_range)
        x0 = problem.x0
        gen = generator if generator is not None else default_generator(x0.device)
        best = None
        for _ in range(restarts):
            best = problem.keep_worst(best, _apgd_any(problem, gen, steps, momentum, rho, eps_schedule))
        return tm.from_pixel(best[0]).detach()


@rules.checked(rho=rules.probability)
def apgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    steps: int = 100,
    norm: str = "linf",
    *,
    n_target_classes: int = 9,
    restarts: int = 1,
    momentum: float = 0.75,
    rho: float = 0.75,
    eps_schedule: bool = True,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    generator: torch.Generator | None = None,
    threat: ThreatModel | None = None,
    model_mode: str = "eval",
    check_range: bool = True,
) -> torch.Tensor:
    """APGD-T (Croce & Hein, ICML 2020, section 4): APGD on the targeted DLR loss, one run per target class.

    The targets are the classes with the 2nd, 3rd, ... ``(n_target_classes + 1)``-th largest clean
    logit (at most ``n_classes - 1`` of them; AutoAttack uses 9). For each target (and each of
    ``restarts``), the APGD loop of :func:`apgd` maximises :func:`~sharpguard.attacks.losses.dlr_targeted`
    on the examples not yet misclassified; an example counts as broken when it is misclassified
    (any wrong class, not necessarily the target), and keeps the first such point. Examples
    misclassified on the clean input are returned unchanged. ``y`` holds the true labels.
    ``norm="l1"`` runs the l1-APGD loop of :func:`apgd` (with its ``eps_schedule``; AutoAttack uses 5
    target classes for l1).
    Cost: at most ``n_target_classes * restarts * (steps + 1)`` forwards and input-only backwards
    per example, plus one clean forward.
    """
    tm = _threat(threat, norm, eps, bounds, mean, std)
    steps = check_steps(steps)
    n_target_classes = check_steps(n_target_classes, "n_target_classes")
    _check_common(0.0, restarts)
    with attack_context(model, model_mode):
        problem = _Problem(model, x, y, tm, "dlr", None, False, check_range)
        x0 = problem.x0
        with torch.no_grad():
            clean = problem.forward(x0)
        problem.check_classes(clean)
        n_classes = clean.shape[-1]
        if n_classes < 4:
            raise ConfigurationError(
                f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {n_classes}; use apgd(loss='dlr')."
            )
        # Ascending sort, column -k: the k-th largest logit, as AutoAttack picks its targets.
        ranked = clean.sort(dim=-1).indices
        robust = clean.argmax(-1) == problem.y
        gen = generator if generator is not None else default_generator(x0.device)
        u_out = x0.clone()
        for k in range(2, min(n_target_classes, n_classes - 1) + 2):
            for _ in range(restarts):
                index = robust.nonzero().squeeze(1)  # one synchronisation per run, not per step
                if index.numel() == 0:
                    return tm.from_pixel(u_out).detach()
                targets = ranked[index, -k]
                sub = problem.restrict(index, lambda z, labels, _ref, t=targets: dlr_targeted(z, labels, t))
                u, success, _ = _apgd_any(sub, gen, steps, momentum, rho, eps_schedule)
                broken = index[success]
                u_out[broken] = u[success]
                robust[broken] = False
                _progress.tick(f"target {k - 1} of {min(n_target_classes, n_classes - 1)}")
        return tm.from_pixel(u_out).detach()


def _apgd_any(problem: _Problem, gen: torch.Generator, steps: int, momentum: float, rho: float, eps_schedule: bool):
    if problem.tm.norm != "l1":
        return _apgd_run(problem, gen, steps, momentum, rho)
    if not eps_schedule or steps < 3:
        return _apgd_l1_run(problem, gen, steps)[:3]
    return _apgd_l1_schedule(problem, gen, steps)


def _apgd_l1_schedule(problem: _Problem, gen: torch.Generator, steps: int):
    """AutoAttack's ``use_largereps`` for l1: radii 3, 2, 1 times eps for 30 %, 30 %, 40 % of the steps."""
    tm, x0 = problem.tm, problem.x0
    iters = [math.ceil(0.3 * steps), math.ceil(0.3 * steps)]
    iters.append(steps - sum(iters))
    u = x0 + torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    result = None
    for factor, n_steps in zip((3.0, 2.0, 1.0), iters):
        stage = copy.copy(problem)
        stage.tm = dataclasses.replace(tm, eps=factor * tm.eps)
        u = stage.tm.project(u, x0)
        *result, u = _apgd_l1_run(stage, gen, n_steps, u_init=u)
    return tuple(result)


def _l0(t: torch.Tensor) -> torch.Tensor:
    return (t != 0).flatten(1).sum(1).to(t.dtype)


class _Best:
    """APGD's per-example bookkeeping, shared by the l2/linf and the l1 loop: the first misclassified
    point (``first``), and the point of highest loss so far with its loss and gradient."""

    def __init__(self, problem: _Problem, u: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.problem, self.shape = problem, shape
        logits, loss, grad = problem.loss_and_grad(u)
        self.success = problem.success(logits)
        self.first = u.clone()
        self.u, self.grad, self.loss = u.clone(), grad.clone(), loss.clone()
        self.last_loss, self.last_grad = loss, grad

    def evaluate(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient at ``u`` (returned), folded into the records."""
        logits, loss, grad = self.problem.loss_and_grad(u)
        now = self.problem.success(logits)
        self.first = torch.where((now & ~self.success).reshape(self.shape), u, self.first)
        self.success = self.success | now
        improved = loss > self.loss
        mask = improved.reshape(self.shape)
        self.u = torch.where(mask, u, self.u)
        self.grad = torch.where(mask, grad, self.grad)
        self.loss = torch.where(improved, loss, self.loss)
        return loss, grad

    def result(self) -> torch.Tensor:
        """Per example the first misclassified point, else the best one."""
        return torch.where(self.success.reshape(self.shape), self.first, self.u)


def _apgd_l1_run(problem: _Problem, gen: torch.Generator, steps: int, u_init: torch.Tensor | None = None):
    """l1-APGD (Croce & Hein 2021, Algorithm 2) from a Gaussian start projected on the ball (or ``u_init``).

    Returns ``(u_out, success, loss_best, u_best)``: per example the first misclassified point, else the best.
    """
    tm, x0 = problem.tm, problem.x0
    n, eps = x0.shape[0], tm.eps
    shape = (n,) + (1,) * (x0.dim() - 1)
    n_features = x0[0].numel()
    if u_init is None:
        u = tm.project(x0 + torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype), x0)
        topk = torch.full((n,), 0.2, device=x0.device, dtype=x0.dtype)
        sparsity_old = torch.full((n,), float(n_features), device=x0.device, dtype=x0.dtype)
    else:
        u = tm.clamp(u_init)
        sparsity_old = _l0(u - x0)
        topk = sparsity_old / n_features / 1.5
    best = _Best(problem, u, shape)
    grad = best.last_grad
    step_size = torch.full(shape, eps, device=x0.device, dtype=x0.dtype)  # alpha = 1 for l1
    window, since = max(int(0.04 * steps), 1), 0
    for _ in range(steps):
        # Sparse steepest step: the sign of the top-k coordinates of |g|, scaled to l1 length step_size.
        magnitude = grad.abs().flatten(1)
        rank = ((1.0 - topk) * n_features).clamp(0, n_features - 1).long()
        threshold = magnitude.sort(dim=1).values.gather(1, rank[:, None]).reshape(shape)
        direction = (grad * (grad.abs() >= threshold)).sign()
        u = tm.project(u + step_size * direction / (geometry.per_example_norm(direction, "l1").to(u.dtype) + 1e-10), x0)
        _, grad = best.evaluate(u)

        since += 1
        if since == window:
            sparsity = _l0(best.u - x0)
            reset = sparsity / sparsity_old < 0.95
            topk = sparsity / n_features / 1.5
            step_size = torch.where(reset.reshape(shape), torch.full_like(step_size, eps), step_size / 1.5)
            step_size = step_size.clamp(eps / 10.0, eps)
            sparsity_old = sparsity
            rmask = reset.reshape(shape)
            u = torch.where(rmask, best.u, u)
            grad = torch.where(rmask, best.grad, grad)
            since = 0

    return best.result(), best.success, best.loss, best.u


def _apgd_run(problem: _Problem, gen: torch.Generator, steps: int, momentum: float, rho: float):
    tm, x0 = problem.tm, problem.x0
    n = x0.shape[0]
    shape = (n,) + (1,) * (x0.dim() - 1)
    checkpoint, min_len, decrement = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)

    # Start on the boundary of the ball (the reference implementation's init), then clamp into bounds.
    if tm.norm == "linf":
        t = torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype) * 2 - 1
    else:
        t = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    u = tm.clamp(x0 + tm.eps * t / geometry.per_example_norm(t, tm.norm).to(t.dtype).clamp_min(1e-12))

    best = _Best(problem, u, shape)
    grad = best.last_grad
    history = torch.empty(steps + 1, n, device=x0.device, dtype=best.loss.dtype)
    history[0] = best.last_loss
    step_size = torch.full(shape, 2.0 * tm.eps, device=x0.device, dtype=x0.dtype)
    u_prev = u.clone()
    halved_last = torch.ones(n, dtype=torch.bool, device=x0.device)
    loss_best_last = best.loss.clone()
    window, since = checkpoint, 0

    for i in range(steps):
        previous_move = u - u_prev
        u_prev = u
        a = momentum if i > 0 else 1.0
        z = tm.project(_step(tm, u, grad, step_size), x0)
        u = tm.project(u + (z - u) * a + previous_move * (1 - a), x0)
        loss, grad = best.evaluate(u)
        history[i + 1] = loss

        since += 1
        if since == window:
            increases = (history[i + 2 - window : i + 2] > history[i + 1 - window : i + 1]).sum(0)
            oscillating = increases <= window * rho
            stalled = ~halved_last & (loss_best_last >= best.loss)
            halve = oscillating | stalled
            halved_last = halve
            loss_best_last = best.loss.clone()
            hmask = halve.reshape(shape)
            step_size = torch.where(hmask, step_size / 2, step_size)
            u = torch.where(hmask, best.u, u)
            grad = torch.where(hmask, best.grad, grad)
            window, since = max(window - decrement, min_len), 0

    return best.result(), best.success, best.loss


def _step(tm: ThreatModel, u: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor) -> torch.Tensor:
    """``u + eta * d`` with a per-example step size ``eta``."""
    return u + step_size * geometry.ascent_direction(grad, tm.norm)
