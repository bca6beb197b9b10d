"""Measure one trained model: clean, FGSM and PGD-20 accuracy on the test set; four sharpness measures of
the training loss, relative flatness of the penultimate layer (Petzka et al. 2021; Walter et al. 2026), the
sharpness of the robust loss (Stutz et al. 2021) and the input-space curvature (CURE) on a fixed probe
set; and the confidence and curvature at the test set's PGD examples. Every measurement is side-effect free (it leaves
weights, gradients, modes and the global RNG as it found them), so measuring order does not matter."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._batches import logits_of
from .config import StudyConfig
from .models import LogitEnsemble


def probe_batches(x: torch.Tensor, y: torch.Tensor, size: int,
                  batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``size`` examples as fixed batches: a frozen probe set (the split is already shuffled)."""
    x, y = x[:size], y[:size]
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def _attack_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_000 + seed)


def _safe(fn: Callable[[], float]) -> float | None:
    """A measurement that fails numerically (e.g. a non-finite loss of a diverged model) is missing, not a crash."""
    from ..errors import NonFiniteLossError

    try:
        value = float(fn())
    except NonFiniteLossError:
        return None
    return value if math.isfinite(value) else None


def worst_case_attack(*attacks: Callable[..., torch.Tensor]) -> Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                                                         torch.Tensor]:
    """An attack that runs every one of ``attacks`` and keeps, per example, the first adversarial input that
    is misclassified: robust accuracy under it is the fraction of examples that survive all of them."""

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        worst = x.clone()
        fooled = torch.zeros(len(y), dtype=torch.bool, device=x.device)
        for a in attacks:
            x_adv = a(model, x, y)
            with torch.no_grad():
                wrong = logits_of(model(x_adv)).argmax(-1) != y
            take = wrong & ~fooled
            worst[take] = x_adv[take]
            fooled |= wrong
        return worst

    return attack


def measure_model(model: nn.Module, test: list, probe: list, config: StudyConfig, seed: int = 0) -> dict[str, Any]:
    """The study's metrics of ``model`` (all floats, ``None`` if a measurement failed)."""
    from .. import sharpness as S
    from ..attacks import fgsm, pgd, robust_accuracy

    eps = config.eps

    def attacks() -> tuple[Callable[..., torch.Tensor], ...]:
        """Fresh attacks: each evaluation draws the same random starts, so the PGD runs inside ``robust_acc``
        are exactly those of ``pgd_acc`` and ``pgd_margin_acc`` (robust_acc <= each of them, as a law)."""
        pgd_attack = functools.partial(pgd, eps=eps, alpha=config.eval_pgd_alpha, steps=config.eval_pgd_steps,
                                       generator=_attack_generator(seed))
        # PGD on the Carlini-Wagner margin: its gradient does not vanish when the softmax saturates, which is
        # how defensive distillation fools PGD on cross entropy (Carlini & Wagner, 2016).
        margin_attack = functools.partial(pgd, eps=eps, alpha=config.eval_pgd_alpha, steps=config.eval_pgd_steps,
                                          loss="margin", generator=_attack_generator(seed + 1))
        return functools.partial(fgsm, eps=eps), pgd_attack, margin_attack

    geometry: dict[str, Any] = {}

    def geo(key: str) -> float:
        """The adversarial-geometry measurement, taken once (PGD-20 on the test set) and read per field."""
        if not geometry:
            g = S.adversarial_geometry(model, test, eps=eps, attack_steps=config.eval_pgd_steps,
                                       n_curvature=config.curvature_examples, seed=seed)
            geometry.update(vars(g))
        value = geometry[key]
        return float("nan") if value is None else value

    return {
        "clean_acc": _safe(lambda: robust_accuracy(model, test, None)),
        "pgd_acc": _safe(lambda: robust_accuracy(model, test, attacks()[1])),
        "fgsm_acc": _safe(lambda: robust_accuracy(model, test, attacks()[0])),
        "pgd_margin_acc": _safe(lambda: robust_accuracy(model, test, attacks()[2])),
        "robust_acc": _safe(lambda: robust_accuracy(model, test, worst_case_attack(*attacks()))),
        "lambda_max": _safe(lambda: S.hessian_eigenvalues(model, probe, k=1, tol=1e-3, max_iter=40,
                                                          seed=seed).eigenvalues[0]),
        "trace": _safe(lambda: S.hessian_trace(model, probe, n_hvp=config.trace_hvps, seed=seed).trace),
        "worst_case_sharpness": _safe(lambda: S.worst_case_sharpness(
            model, probe, rho=config.sharpness_rho, steps=config.sharpness_steps).value),
        "adaptive_sharpness": _safe(lambda: S.worst_case_sharpness(
            model, probe, rho=config.adaptive_sharpness_rho, steps=config.sharpness_steps, adaptive=True).value),
        # An ensemble has no single penultimate layer feeding its logits: relative flatness is undefined.
        "relative_flatness": None if isinstance(model, LogitEnsemble) else _safe(
            lambda: S.relative_flatness(model, probe, method="closed_form").value),
        "robust_sharpness": _safe(lambda: S.robust_sharpness(
            model, probe, eps=eps, attack_steps=config.train_attack_steps, rho=config.sharpness_rho,
            steps=config.sharpness_steps, seed=seed).value),
        "input_curvature": _safe(lambda: S.input_hessian_eigenvalue(
            model, probe, n_examples=config.curvature_examples, seed=seed).mean),
        "adv_confidence": _safe(lambda: geo("adv_confidence_fooled")),
        "adv_input_curvature": _safe(lambda: geo("adv_curvature")),
    }


SLICE_DIRECTION_SEED = 0  # the random direction of every loss slice: the same for every model


def loss_slice(model: nn.Module, probe: list, n_points: int = 21, span: float = 1.0) -> tuple[list[float], list[float]]:
    """The training loss along one filter-normalized random direction (Li et al., 2018), same seed for every model."""
    from ..sharpness import loss_slice_1d

    s = loss_slice_1d(model, probe, span=span, n_points=n_points, seed=SLICE_DIRECTION_SEED)
    return [float(a) for a in s.alphas], [float(v) for v in s.losses]
