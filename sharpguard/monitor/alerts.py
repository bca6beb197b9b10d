"""Alert rules with hysteresis, evaluated on each monitor check.

A rule *fires* when its condition has held for ``patience`` consecutive checks, stays *active* (its
``alert/<name>`` flag logs 1.0) and does not fire again until it has been clear for ``clear_patience``
consecutive checks -- so a metric hovering at a threshold raises one alert, not one per check.

Rules (docs/monitors.md, "Alerts (with hysteresis)"):

* :class:`EdgeOfStabilityAlert` -- ``sharpness/eos_ratio > 1`` (lambda_max above 2/lr, Cohen et al.,
  ICLR 2021) for several checks; clears below ``clear_below``.
* :class:`SurgeAlert` -- a metric (lambda_max) ``factor`` times above its running average of earlier
  checks (curvature surges precede loss spikes).
* :class:`LossSpikeAlert` -- the training loss ``factor`` times above its running average *and* the
  curvature rising since the previous check.
* :class:`CatastrophicOverfittingAlert` -- PGD accuracy dropping by more than ``drop`` (absolute)
  since the previous check (Wong et al., ICLR 2020 use 0.2 for fast adversarial training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = [
    "Alert",
    "AlertRule",
    "EdgeOfStabilityAlert",
    "SurgeAlert",
    "LossSpikeAlert",
    "CatastrophicOverfittingAlert",
    "default_sharpness_alerts",
    "default_robustness_alerts",
]


@dataclass(frozen=True)
class Alert:
    """One fired alert: which rule, at which step, on which metric and value, and why."""

    name: str
    step: int
    metric: str
    value: float
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AlertRule:
    """Base class: subclasses implement :meth:`condition` (and optionally :meth:`cleared`).

    ``condition(metrics, context)`` returns True/False, or None when the metrics it needs are absent
    from this check (the rule's counters do not move). ``context`` holds values that are not logged
    metrics (``"loss"``, ``"loss_avg"``: the training loss at the check and its running average).
    """

    name = "alert"
    metric = ""

    @rules.checked()
    def __init__(self, *, patience: int = 1, clear_patience: int = 1) -> None:
        if patience < 1 or clear_patience < 1:
            raise ConfigurationError(
                f"patience and clear_patience must be >= 1, got {patience} and {clear_patience}."
            )
        self.patience = patience
        self.clear_patience = clear_patience
        self.active = False
        self.hits = 0
        self.clears = 0
        self.n_fired = 0

    @property
    def flag_name(self) -> str:
        return f"alert/{self.name}"

    def condition(self, metrics: Mapping[str, float], context: Mapping[str, float]) -> bool | None:
        raise NotImplementedError

    def cleared(self, metrics: Mapping[str, float], context: Mapping[str, float]) -> bool | None:
        cond = self.condition(metrics, context)
        return None if cond is None else not cond

    def message(self, metrics: Mapping[str, float], context: Mapping[str, float]) -> str:
        return f"{self.metric} = {metrics.get(self.metric)}"

    def observe(self, step: int, metrics: Mapping[str, float], context: Mapping[str, float]) -> Alert | None:
        """Update the hysteresis state with one check; return an :class:`Alert` when the rule fires."""
        if not self.active:
            cond = self.condition(metrics, context)
            if cond is None:
                return None
            self.hits = self.hits + 1 if cond else 0
            if self.hits >= self.patience:
                self.active, self.hits, self.clears = True, 0, 0
                self.n_fired += 1
                value = float(metrics.get(self.metric, context.get(self.metric, math.nan)))
                return Alert(self.name, int(step), self.metric, value, self.message(metrics, context))
            return None
        clear = self.cleared(metrics, context)
        if clear is None:
            return None
        self.clears = self.clears + 1 if clear else 0
        if self.clears >= self.clear_patience:
            self.active, self.clears = False, 0
        return None

    def after_check(self, metrics: Mapping[str, float], context: Mapping[str, float]) -> None:
        """Update running statistics (called after :meth:`observe`, every check)."""

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "hits": self.hits, "clears": self.clears, "n_fired": self.n_fired}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.active, self.hits = bool(state["active"]), int(state["hits"])
        self.clears, self.n_fired = int(state["clears"]), int(state["n_fired"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(patience={self.patience}, clear_patience={self.clear_patience})"


class EdgeOfStabilityAlert(AlertRule):
    """``sharpness/eos_ratio`` above ``threshold`` for ``patience`` consecutive checks.

    The ratio is lambda_max over the step size's stability threshold (2/lr for gradient descent,
    (2 + 2 beta)/lr with heavy-ball momentum beta; Cohen et al., ICLR 2021). Clears once the ratio stays
    below ``clear_below`` (a hysteresis band below the threshold).
    """

    name = "eos"
    metric = "sharpness/eos_ratio"

    @rules.checked()
    def __init__(self, threshold: float = 1.0, *, patience: int = 3, clear_below: float = 0.9, clear_patience: int = 2):
        super().__init__(patience=patience, clear_patience=clear_patience)
        if clear_below > threshold:
            raise ConfigurationError(f"clear_below ({clear_below}) must not exceed threshold ({threshold}).")
        self.threshold, self.clear_below = float(threshold), float(clear_below)

    def condition(self, metrics, context):
        value = metrics.get(self.metric)
        return None if value is None or not math.isfinite(value) else value > self.threshold

    def cleared(self, metrics, context):
        value = metrics.get(self.metric)
        return None if value is None or not math.isfinite(value) else value < self.clear_below

    def message(self, metrics, context):
        return (
            f"edge of stability: {self.metric} = {metrics[self.metric]:.3g} > {self.threshold:g} for "
            f"{self.patience} consecutive checks (lambda_max above the step size's stability threshold); "
            "consider lowering the learning rate."
        )


class SurgeAlert(AlertRule):
    """A metric ``factor`` times above its exponential running average over earlier checks.

    The average (decay ``decay``) starts after the first check; the rule is armed after ``warmup`` checks.
    """

    name = "lambda_surge"

    @rules.checked()
    def __init__(
        self,
        metric: str = "sharpness/lambda_max",
        factor: float = 3.0,
        *,
        decay: float = 0.9,
        warmup: int = 3,
        patience: int = 1,
        clear_patience: int = 1,
    ) -> None:
        super().__init__(patience=patience, clear_patience=clear_patience)
        if factor <= 1:
            raise ConfigurationError(f"a surge factor must be > 1, got {factor}.")
        if not 0 <= decay < 1:
            raise ConfigurationError(f"decay must be in [0, 1), got {decay}.")
        self.metric, self.factor, self.decay, self.warmup = metric, float(factor), float(decay), int(warmup)
        if metric != "sharpness/lambda_max":
            self.name = metric.split("/")[-1] + "_surge"
        self.average: float | None = None
        self.seen = 0

    def condition(self, metrics, context):
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value) or self.average is None or self.seen < self.warmup:
            return None if value is None else False
        return abs(value) > self.factor * abs(self.average)

    def message(self, metrics, context):
        return (
            f"{self.metric} surged to {metrics[self.metric]:.4g}, {self.factor:g}x above its running average "
            f"{self.average:.4g}; curvature surges often precede loss spikes."
        )

    def after_check(self, metrics, context):
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.average = value if self.average is None else self.decay * self.average + (1 - self.decay) * value
        self.seen += 1

    def state_dict(self):
        return {**super().state_dict(), "average": self.average, "seen": self.seen}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.average, self.seen = state["average"], int(state["seen"])


class LossSpikeAlert(AlertRule):
    """The training loss ``factor`` times above its running average while curvature rises.

    Needs the adapter to pass ``loss`` to ``on_step_end``; the running average is kept by the monitor
    on the device (no host synchronisation on steps without a check). "Rising" means the curvature
    metric (lambda_max) grew by more than ``rise`` (relative) since the previous check.
    """

    name = "loss_spike"
    metric = "loss"

    @rules.checked()
    def __init__(
        self,
        factor: float = 2.0,
        *,
        curvature: str = "sharpness/lambda_max",
        rise: float = 0.1,
        patience: int = 1,
        clear_patience: int = 1,
    ) -> None:
        super().__init__(patience=patience, clear_patience=clear_patience)
        if factor <= 1:
            raise ConfigurationError(f"a loss-spike factor must be > 1, got {factor}.")
        self.factor, self.curvature, self.rise = float(factor), curvature, float(rise)
        self.previous_curvature: float | None = None

    def condition(self, metrics, context):
        loss, avg, curv = context.get("loss"), context.get("loss_avg"), metrics.get(self.curvature)
        if loss is None or avg is None or curv is None or self.previous_curvature is None:
            return None
        if not math.isfinite(loss):
            return True
        return loss > self.factor * avg and curv > (1 + self.rise) * self.previous_curvature

    def message(self, metrics, context):
        return (
            f"loss spike: training loss {context['loss']:.4g} is over {self.factor:g}x its running average "
            f"{context['loss_avg']:.4g} while {self.curvature} rose from {self.previous_curvature:.4g} to "
            f"{metrics[self.curvature]:.4g}."
        )

    def after_check(self, metrics, context):
        curv = metrics.get(self.curvature)
        if curv is not None and math.isfinite(curv):
            self.previous_curvature = curv

    def state_dict(self):
        return {**super().state_dict(), "previous_curvature": self.previous_curvature}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.previous_curvature = state["previous_curvature"]


class CatastrophicOverfittingAlert(AlertRule):
    """PGD accuracy drops by more than ``drop`` (absolute, accuracies in [0, 1]) between checks.

    ``reference="previous"`` compares with the previous check (Wong et al.'s early stop),
    ``"best"`` with the best value so far (Rice et al., ICML 2020, robust overfitting). Clears once the
    accuracy is back within ``drop / 2`` of the reference.
    """

    name = "catastrophic_overfitting"

    @rules.checked()
    def __init__(
        self,
        drop: float = 0.2,
        *,
        metric: str = "robustness/pgd_acc",
        reference: str = "previous",
        patience: int = 1,
        clear_patience: int = 1,
    ) -> None:
        super().__init__(patience=patience, clear_patience=clear_patience)
        if not 0 < drop <= 1:
            raise ConfigurationError(f"drop is an absolute accuracy drop in (0, 1], got {drop}.")
        if reference not in ("previous", "best"):
            raise ConfigurationError(f"reference must be 'previous' or 'best', got {reference!r}.")
        self.drop, self.metric, self.reference = float(drop), metric, reference
        self.previous: float | None = None
        self.best: float | None = None
        self._ref_at_fire: float | None = None

    def _ref(self) -> float | None:
        return self.previous if self.reference == "previous" else self.best

    def condition(self, metrics, context):
        value, ref = metrics.get(self.metric), self._ref()
        if value is None or ref is None:
            return None
        hit = value < ref - self.drop
        if hit:
            self._ref_at_fire = ref
        return hit

    def cleared(self, metrics, context):
        value, ref = metrics.get(self.metric), self._ref_at_fire
        if value is None or ref is None:
            return None
        return value >= ref - self.drop / 2

    def message(self, metrics, context):
        return (
            f"catastrophic overfitting: {self.metric} fell to {metrics[self.metric]:.3f} from "
            f"{self._ref_at_fire:.3f} ({self.reference} check); keep the most robust checkpoint or stop."
        )

    def after_check(self, metrics, context):
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.previous = value
        self.best = value if self.best is None else max(self.best, value)

    def state_dict(self):
        return {**super().state_dict(), "previous": self.previous, "best": self.best, "ref_at_fire": self._ref_at_fire}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.previous, self.best, self._ref_at_fire = state["previous"], state["best"], state["ref_at_fire"]


def default_sharpness_alerts() -> list[AlertRule]:
    """Edge of stability (3 checks), lambda_max surge (3x its average), loss spike with rising curvature."""
    return [EdgeOfStabilityAlert(), SurgeAlert(), LossSpikeAlert()]


def default_robustness_alerts() -> list[AlertRule]:
    """Catastrophic overfitting: PGD accuracy down by more than 0.2 since the previous check."""
    return [CatastrophicOverfittingAlert()]
