"""Periodic adversarial robustness on a frozen probe set: clean, FGSM and PGD accuracy and the
input-gradient norm (GradAlign's practice: fixed examples, eval mode, PGD with alpha = eps/4; Andriushchenko
& Flammarion, NeurIPS 2020). The catastrophic-overfitting alert watches the PGD accuracy (Wong et al.,
ICLR 2020); the metric ``robustness/pgd_acc`` drives Lightning's ``ModelCheckpoint`` / ``EarlyStopping``
for Rice et al.'s (ICML 2020) early stopping against robust overfitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError
from .alerts import AlertRule, default_robustness_alerts
from .base import Monitor

__all__ = ["RobustnessMonitor"]


class RobustnessMonitor(Monitor):
    """Robust accuracy on a frozen probe set of ``(inputs, labels)`` batches.

    Measures (metric ``robustness/<name>``): ``clean_acc``, ``fgsm_acc``, ``pgd_acc`` (PGD-``steps``,
    ``restarts`` random starts), ``input_grad_norm`` (mean ``||grad_x L||_2``). Its share of training
    time is logged as ``monitor/robustness_overhead_pct`` (``monitor/overhead_pct`` is the sharpness
    monitor's).

    Args:
        eps / alpha / steps / norm / restarts: the threat model and PGD settings (``alpha`` defaults to
            ``eps / 4``).
        bounds / mean / std: the valid input range and, for models that normalise inside, the
            normalisation (see :class:`sharpguard.attacks.ThreatModel`).
        Other keywords: see :class:`~sharpguard.monitor.Monitor`.
    """

    MEASURES = ("clean_acc", "fgsm_acc", "pgd_acc", "input_grad_norm")
    DEFAULT_MEASURES = ("clean_acc", "pgd_acc")
    prefix = "robustness"
    overhead_metric = "monitor/robustness_overhead_pct"

    def __init__(
        self,
        measures: Sequence[str] | None = None,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        restarts: int = 1,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(measures, **kwargs)
        if eps <= 0:
            raise ConfigurationError(f"eps must be positive, got {eps}.")
        if steps < 1 or restarts < 1:
            raise ConfigurationError(f"steps and restarts must be >= 1, got {steps} and {restarts}.")
        self.eps = float(eps)
        self.alpha = float(alpha) if alpha is not None else self.eps / 4
        self.steps, self.norm, self.restarts = int(steps), norm, int(restarts)
        self.bounds, self.mean, self.std = bounds, mean, std

    def default_alerts(self) -> list[AlertRule]:
        return default_robustness_alerts()

    def passes(self) -> float:
        cost = {"clean_acc": 0.5, "fgsm_acc": 1.5, "pgd_acc": self.steps * self.restarts + 0.5, "input_grad_norm": 1.0}
        return sum(cost[m] for m in self.measures)

    def _settings(self, **extra: Any) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "bounds": list(self.bounds) if self.bounds else None, **extra}

    def _measure(self, model: nn.Module, batches: list[Any], optimizer: Any | None, batch: Any | None):
        from .. import attacks as A

        common = {"norm": self.norm, "bounds": self.bounds, "mean": self.mean, "std": self.std}
        metrics: dict[str, float] = {}
        settings: dict[str, dict[str, Any]] = {}
        want = set(self.measures)
        device = next(model.parameters()).device

        def generator() -> torch.Generator:
            # the same random starts at every check: consecutive checks differ only by the weights
            return torch.Generator(device=device).manual_seed(self.seed)

        if "clean_acc" in want:
            metrics["robustness/clean_acc"] = float(A.robust_accuracy(model, batches, None))
            settings["robustness/clean_acc"] = {"attack": "none"}
        if "fgsm_acc" in want:
            gen = generator()

            def fgsm(m, x, y):
                return A.fgsm(m, x, y, eps=self.eps, generator=gen, **common)

            metrics["robustness/fgsm_acc"] = float(A.robust_accuracy(model, batches, fgsm))
            settings["robustness/fgsm_acc"] = self._settings(attack="fgsm")
        if "pgd_acc" in want:
            gen = generator()

            def pgd(m, x, y):
                return A.pgd(m, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, restarts=self.restarts,
                             random_start=True, generator=gen, **common)

            metrics["robustness/pgd_acc"] = float(A.robust_accuracy(model, batches, pgd))
            settings["robustness/pgd_acc"] = self._settings(attack="pgd", alpha=self.alpha, steps=self.steps,
                                                            restarts=self.restarts)
        if "input_grad_norm" in want:
            metrics["robustness/input_grad_norm"] = float(A.input_grad_norm(model, batches))
            settings["robustness/input_grad_norm"] = {"definition": "mean ||grad_x CE||_2 over probe examples"}
        return metrics, settings
