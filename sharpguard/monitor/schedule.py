"""When a monitor runs: every ``n`` steps, or adaptively under a cost budget (docs/design.md promise 4).

The budget is a fraction of training wall time. The schedule measures training time between its own
calls (excluding the monitor's time) and the monitor's cost, and places the next check at the first step
where the cumulative monitor time would still be within ``budget`` of the cumulative training time:

    next = step + max(min_every, ceil(((T_monitor + c_last) / budget - T_train) / t_step))

where ``T_monitor`` is the steady-state monitor time, ``c_last`` the cost of the latest check and
``t_step`` an average step time. The first check comes early, at the first step whose time is known (not
before ``first_step``), so a broken setup shows in seconds (docs/design.md promise 9). It is a one-off,
stated cost (it also pays one-time set-up such as the micro-batch choice; a monitor's default quick
first check measures a reduced workload and passes a full check's estimated cost as ``planned_cost``,
which spaces the next check): it is kept apart as
:attr:`Schedule.first_check_seconds` and is not part of ``T_monitor``, so :attr:`Schedule.overhead_pct`
and the budget speak of the steady state, and a short run is not reported as hundreds of percent
over budget because of one check. Decisions are taken when the first step time is known and when a
check finishes (:attr:`Schedule.changed`), so distributed adapters agree on the schedule with one
broadcast of :attr:`next_step` at those steps (none on the others).
"""

from __future__ import annotations

import math
import time
from typing import Any

from .._validation import non_negative_int, positive_int, real
from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = ["Schedule"]


class Schedule:
    """Every ``every_n_steps`` steps, or adaptive under ``budget`` when ``every_n_steps`` is None.

    Args:
        every_n_steps: fixed interval (checks at steps ``n, 2n, ...``); ``None`` for the adaptive schedule.
        budget: share of training time the monitor may use (adaptive mode), ``0 < budget <= 1``.
        first_step: step of the first adaptive check.
        min_every / max_every: bounds on the adaptive interval, in steps.
    """

    @rules.checked(budget=rules.between(0.0, 1.0, low_open=True))
    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        budget: float = 0.05,
        first_step: int = 1,
        min_every: int = 1,
        max_every: int | None = None,
    ) -> None:
        if every_n_steps is not None:
            positive_int("every_n_steps", every_n_steps)
        budget = real("budget", budget)
        if not 0 < budget <= 1:
            raise ConfigurationError(f"budget is a fraction of training time in (0, 1], got {budget}; e.g. 0.05.")
        first_step = non_negative_int("first_step", first_step)
        min_every = positive_int("min_every", min_every)
        if max_every is not None:
            positive_int("max_every", max_every)
        if max_every is not None and max_every < min_every:
            raise ConfigurationError(
                f"need 1 <= min_every <= max_every, got min_every={min_every}, max_every={max_every}."
            )
        self.every_n_steps = every_n_steps
        self.budget = float(budget)
        self.min_every = int(min_every)
        self.max_every = max_every
        self.next_step = int(every_n_steps if every_n_steps is not None else max(first_step, 0))
        self.monitor_seconds = 0.0
        self.train_seconds = 0.0
        self.last_cost = 0.0
        self.step_seconds: float | None = None
        self.n_checks = 0
        #: cost and step of the first check (the one-off that shows the measurement works), kept apart
        #: from the steady state that :attr:`overhead_pct` and the budget cover
        self.first_check_seconds: float | None = None
        self.first_check_step: int | None = None
        # monitor and training time up to the end of the first check (set-up: probe capture, the check)
        self._setup_monitor_seconds = 0.0
        self._setup_train_seconds = 0.0
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._placed = every_n_steps is not None
        # adaptive: the step of the latest check and the step at which its gap is re-planned from the
        # step time measured since (one early step time can be far from the run's)
        self._check_step: int | None = None
        self._replan_at: int | None = None
        #: True when :attr:`next_step` was set from wall-clock measurements since the adapter last
        #: looked; distributed adapters broadcast ``next_step`` from rank 0 then (same step on all ranks)
        self.changed = False

    @property
    def adaptive(self) -> bool:
        return self.every_n_steps is None

    @property
    def steady_seconds(self) -> float:
        """Monitor time since the first check ended: later checks and every step's bookkeeping."""
        return max(self.monitor_seconds - self._setup_monitor_seconds, 0.0)

    @property
    def steady_train_seconds(self) -> float:
        """Training time since the first check ended."""
        return max(self.train_seconds - self._setup_train_seconds, 0.0)

    @property
    def overhead_pct(self) -> float:
        """Steady-state monitor time as a percentage of the training time since the first check ended
        (0 before then); the quantity the budget bounds. The first check is :attr:`first_check_seconds`."""
        train = self.steady_train_seconds
        return 100.0 * self.steady_seconds / train if train > 0 else 0.0

    @property
    def total_overhead_pct(self) -> float:
        """All monitor time, the first check included, as a percentage of training time so far."""
        return 100.0 * self.monitor_seconds / self.train_seconds if self.train_seconds > 0 else 0.0

    def tick(self, step: int, *, now: float | None = None) -> bool:
        """Account training time up to ``now``; return True when a check is due at ``step``.

        Call once per optimizer step; costs one ``perf_counter()``. An adapter passes the
        ``perf_counter()`` taken when its hook started as ``now`` and calls :meth:`leave` when the hook
        ends, so the hook's own time is counted as the monitor's, not as training time.
        """
        if now is None:
            now = time.perf_counter()
        if self._last_time is not None:
            dt = now - self._last_time
            self.train_seconds += dt
            if self._last_step is not None and step > self._last_step:
                per_step = dt / (step - self._last_step)
                self.step_seconds = per_step if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * per_step
        self._last_time, self._last_step = now, step
        if self.adaptive and self.step_seconds is None:
            return False  # the first adaptive check waits until a step time has been measured
        if not self._placed:
            # fail fast (docs/design.md promise 9): the first adaptive check runs at the first step whose
            # time is known (and whose probe holds data); a one-off kept apart from the steady state
            # that the budget bounds
            self._placed = True
            self.changed = True
        if self._replan_at is not None and step >= self._replan_at and step < self.next_step:
            self._replan(step)
        return step >= self.next_step

    def _gap(self, step_seconds: float) -> int:
        """Steps from now until the next check keeps the steady state within the budget (the next check
        assumed to cost as much as the latest)."""
        owed = (self.steady_seconds + self.last_cost) / self.budget - self.steady_train_seconds
        return math.ceil(owed / step_seconds)

    def _replan(self, step: int) -> None:
        """Re-place the pending check from the step time measured since the latest check, at steps that
        are the same on every rank (doubling distances from the check); never due at this very step, so
        ranks agree through the broadcast that :attr:`changed` triggers before it matters."""
        check_step = self._check_step if self._check_step is not None else step
        self._replan_at = check_step + 2 * max(step - check_step, 1)
        # set on every rank at this step, whatever its own clock says: each rank then joins the broadcast
        self.changed = True
        if not self.step_seconds:
            return
        low = check_step + self.min_every
        high = check_step + self.max_every if self.max_every is not None else None
        target = max(step + 1, low, step + self._gap(self.step_seconds))
        if high is not None:
            target = min(target, max(high, step + 1))
        self.next_step = target

    def leave(self) -> None:
        """The adapter hook that called :meth:`tick` ends: the time since then that no :meth:`record`
        covered (probe capture, loss bookkeeping, logging) is the monitor's overhead too.

        May be called more than once per hook; each call adds the time since the previous one.
        """
        if self._last_time is None:
            return
        now = time.perf_counter()
        self.monitor_seconds += now - self._last_time
        self._last_time = now

    def record(self, step: int, cost_seconds: float, *, planned_cost: float | None = None) -> int:
        """Register a check that took ``cost_seconds`` at ``step``; return the next check's step.

        ``planned_cost``: what the next check is expected to cost when it differs from this one (a quick
        first check is followed by a full one); the gap to the next check is set by it, so that check
        keeps the steady state within the budget too. Default: the next check costs ``cost_seconds``.
        """
        self.monitor_seconds += cost_seconds
        self.last_cost = cost_seconds if planned_cost is None else max(float(planned_cost), 0.0)
        if self.n_checks == 0:
            self.first_check_seconds, self.first_check_step = float(cost_seconds), int(step)
            self._setup_monitor_seconds, self._setup_train_seconds = self.monitor_seconds, self.train_seconds
        self.n_checks += 1
        # the monitor's own time is not training time
        self._last_time = time.perf_counter()
        if self.every_n_steps is not None:
            n = self.every_n_steps
            self.next_step = (step // n + 1) * n
            return self.next_step
        step_seconds = self.step_seconds
        if not step_seconds:  # no step measured yet: fall back to the mean step time, or a minimal gap
            step_seconds = self.train_seconds / max(step, 1) if self.train_seconds > 0 else None
        interval = self.min_every if not step_seconds else max(self.min_every, self._gap(step_seconds))
        if self.max_every is not None:
            interval = min(interval, self.max_every)
        self.next_step = step + interval
        self._check_step, self._replan_at = int(step), int(step) + 2
        self.changed = True
        return self.next_step

    def state_dict(self) -> dict[str, Any]:
        return {
            "every_n_steps": self.every_n_steps,
            "budget": self.budget,
            "next_step": self.next_step,
            "monitor_seconds": self.monitor_seconds,
            "train_seconds": self.train_seconds,
            "last_cost": self.last_cost,
            "step_seconds": self.step_seconds,
            "n_checks": self.n_checks,
            "placed": self._placed,
            "first_check_seconds": self.first_check_seconds,
            "first_check_step": self.first_check_step,
            "setup_seconds": [self._setup_monitor_seconds, self._setup_train_seconds],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("next_step", "monitor_seconds", "train_seconds", "last_cost", "step_seconds", "n_checks"):
            setattr(self, key, state[key])
        self._placed = bool(state.get("placed", True))
        # checkpoints written before the first check was kept apart count it in the steady state
        self.first_check_seconds = state.get("first_check_seconds")
        self.first_check_step = state.get("first_check_step")
        self._setup_monitor_seconds, self._setup_train_seconds = (
            float(v) for v in state.get("setup_seconds", (0.0, 0.0)))
        self._last_time = None  # the pause between save and load is not training time
        self._last_step = None
