"""The monitor machinery shared by :class:`SharpnessMonitor` and :class:`RobustnessMonitor`.

A subclass only says which measures exist (:meth:`Monitor._measure`); this class owns the probe set,
the schedule and its cost accounting, the alert rules and their actions, the history, checkpoint state
and the side-effect-free execution (docs/design.md promise 1): every check runs in eval mode under
:func:`sharpguard._state.side_effect_free`, with gradients enabled even under ``torch.no_grad`` or
``torch.inference_mode`` (validation hooks), and with the monitor's own seeded generators.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._batches import BatchList, LossFn, apply_to_tensors, batch_size, default_loss_fn, move_to, split_batch
from .._state import side_effect_free
from .._validation import non_negative_int, positive_int
from ..attacks import _progress
from ..errors import ConfigurationError
from .alerts import Alert, AlertRule
from .history import MetricHistory
from .probe import ProbeSet
from .schedule import Schedule
from .. import _validation as rules

__all__ = ["Monitor", "MonitorAlertWarning"]

AlertAction = str | Callable[[Alert], Any]


class MonitorAlertWarning(UserWarning):
    """Category of the warnings a monitor emits when an alert fires."""


class Monitor:
    """Base class: probe set + schedule + measures + alerts + history.

    Args:
        measures: names of the measures to take (see the subclass's ``MEASURES``).
        probe: the probe batches (one batch or a list), a :class:`ProbeSet`, or ``None`` to capture the
            first ``probe_size`` examples of the batches passed to :meth:`capture` / :meth:`on_step_end`.
        probe_size / probe_batch_size: size of a captured probe set and of its batches. The default
            (``None``) sizes the probe to the work: as many whole training batches as keep one check
            within :attr:`CHECK_STEPS` training steps of the same run (at least one batch, at most
            256 examples beyond it), set when the first batch is seen.
        seed: seed of the monitor's own generators (random starts, probe vectors).
        every_n_steps: fixed schedule; ``None`` (default) for the adaptive schedule under ``budget``.
        budget: largest share of training time the monitor may use in adaptive mode (default 5%).
        first_step / min_every / max_every: see :class:`Schedule`.
        alerts: ``"default"``, ``None`` / ``[]`` for none, or a list of :class:`AlertRule`.
        on_alert: ``"warn"`` (default; ``warnings.warn`` + the ``alert/<name>`` flag), ``"stop"`` (also
            sets :attr:`should_stop`, which adapters turn into stopping training), ``"ignore"`` (flag
            only), a callable receiving the :class:`Alert`, or a list of these.
        history: path of the JSON-lines history (``None``: in memory only).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross entropy / ``model(**batch).loss``.
        probe_state_max_bytes: probe tensors up to this size are stored in :meth:`state_dict` (so a
            resumed run measures on the very same examples); larger probes are captured again.
        first_check: ``"quick"`` (default): the adaptive schedule's first check, made within the first
            steps to show that the measurement works, runs on a reduced workload (the first
            :attr:`QUICK_FRACTION` of the first probe batch; a subclass may loosen its solver's tolerance,
            see :meth:`quick_settings`), is labelled ``"check": "quick"`` in its history records and in the
            end line, and the full check follows on the schedule, warm-started where the measure allows.
            ``"full"``: the first check measures the whole probe like every later one.
        progress: show a check's progress on stderr (a tqdm bar over the measures, as ``sharpguard
            study`` does): ``True`` always, ``False`` never, ``None`` (default) only when stderr is a
            terminal, and then only for a check that lasts more than :attr:`PROGRESS_DELAY` seconds.
    """

    #: the cost of one default check the auto-sized probe aims at, in training steps of the same run
    CHECK_STEPS = 50
    #: the share of the first probe batch a quick first check measures on (at least one example)
    QUICK_FRACTION = 0.125
    #: with ``progress=None`` on a terminal, a check shows its bar once it has lasted this long (seconds)
    PROGRESS_DELAY = 2.0
    MEASURES: tuple[str, ...] = ()
    DEFAULT_MEASURES: tuple[str, ...] = ()
    prefix = ""
    #: where the monitor's share of training time is logged (distinct per monitor kind, so two
    #: monitors in one run do not overwrite each other's key)
    overhead_metric = "monitor/overhead_pct"

    @property
    def first_check_metric(self) -> str:
        """Where the first check's seconds are logged (beside :attr:`overhead_metric`, once)."""
        return self.overhead_metric.replace("overhead_pct", "first_check_s")

    @rules.checked(budget=rules.between(0.0, 1.0, low_open=True))
    def __init__(
        self,
        measures: Sequence[str] | None = None,
        *,
        probe: Any | None = None,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        seed: int = 0,
        every_n_steps: int | None = None,
        budget: float = 0.05,
        first_step: int = 1,
        min_every: int = 1,
        max_every: int | None = None,
        alerts: str | Iterable[AlertRule] | None = "default",
        on_alert: AlertAction | Sequence[AlertAction] = "warn",
        history: str | None = None,
        loss_fn: LossFn | None = None,
        probe_state_max_bytes: int = 4 << 20,
        first_check: str = "quick",
        progress: bool | None = None,
    ) -> None:
        if isinstance(measures, str):
            measures = (measures,)
        self._auto_probe = probe_size is None and probe is None
        probe_size = 256 if probe_size is None else positive_int("probe_size", probe_size)
        if probe_batch_size is not None:
            positive_int("probe_batch_size", probe_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"seed must be an integer, got {seed!r}.")
        non_negative_int("probe_state_max_bytes", probe_state_max_bytes)
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigurationError("loss_fn must be a callable loss_fn(model, batch) -> scalar, got "
                                     f"{type(loss_fn).__name__}.")
        if history is not None and not isinstance(history, (str, os.PathLike)):
            raise ConfigurationError(f"history must be a file path or None, got {type(history).__name__}.")
        measures = tuple(self.DEFAULT_MEASURES if measures is None else measures)
        unknown = [m for m in measures if m not in self.MEASURES]
        if unknown or not measures:
            raise ConfigurationError(
                f"unknown or empty measures {unknown or list(measures)}; choose among {list(self.MEASURES)}."
            )
        self.measures = measures
        if isinstance(probe, ProbeSet):
            self.probe = probe
        else:
            self.probe = ProbeSet(probe, size=probe_size, batch_size=probe_batch_size, seed=seed)
        self.seed = int(seed)
        self.schedule = Schedule(every_n_steps, budget=budget, first_step=first_step, min_every=min_every,
                                 max_every=max_every)
        if alerts == "default":
            self.alerts = self.default_alerts()
        elif alerts is None:
            self.alerts = []
        elif isinstance(alerts, str):
            raise ConfigurationError(f"alerts must be 'default', None or a list of AlertRule, got {alerts!r}.")
        else:
            self.alerts = list(alerts)
        actions = [on_alert] if isinstance(on_alert, str) or callable(on_alert) else list(on_alert)
        for action in actions:
            if isinstance(action, str) and action not in ("warn", "stop", "ignore"):
                raise ConfigurationError(f"on_alert must be 'warn', 'stop', 'ignore' or a callable, got {action!r}.")
        self.on_alert = actions
        if first_check not in ("quick", "full"):
            raise ConfigurationError(f"first_check must be 'quick' or 'full', got {first_check!r}.")
        if progress is not None and not isinstance(progress, bool):
            raise ConfigurationError(f"progress must be True, False or None (on a terminal only), got {progress!r}.")
        self.first_check = first_check
        self.progress = progress
        #: what the first check was, for the end line: ``{"check": "quick", ...}`` (None before it)
        self.first_check_settings: dict[str, Any] | None = None
        self._quick = False
        self._bar: Any = None
        self.history = MetricHistory(history)
        self.loss_fn = loss_fn or default_loss_fn
        self.probe_state_max_bytes = probe_state_max_bytes
        self.should_stop = False
        self.last_alerts: list[Alert] = []
        self.last_metrics: dict[str, float] = {}
        # running loss average: preallocated 0-dim device tensors for tensor losses (last loss, average,
        # count of finite losses), host floats for float losses; nothing per step is kept
        self._loss: torch.Tensor | None = None
        self._loss_avg_acc: torch.Tensor | None = None
        self._loss_n: torch.Tensor | None = None
        self._loss_on_device = False
        self._loss_avg: float | None = None
        self._loss_host: float | None = None
        self._loss_decay = 0.9
        self._probe_device: torch.device | None = None
        self._warned: set[str] = set()
        self._last_step = 0
        #: set by a distributed driver: averages a check's measured metrics over ranks before the
        #: alerts see them and the history records them (the same values, alerts and stops everywhere)
        self.reduce_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
        self.reduced_keys: frozenset[str] = frozenset()
        self._train_batch_size: int | None = None
        #: optimizer steps the run will take, when the front end knows it (:meth:`expect_steps`)
        self.run_steps: int | None = None
        #: set by an adapter whose checks run at validation ends, not on the step schedule
        self.checks_at: str | None = None

    # -- overridables ------------------------------------------------------------------------------
    def default_alerts(self) -> list[AlertRule]:
        return []

    def passes(self) -> float:
        """Estimated cost of one check in training steps per probe batch of the training batch size."""
        return 0.0

    def estimate_cost(self, step_seconds: float) -> float:
        """Estimated seconds of one check, from the measured step time (places the first adaptive check)."""
        batch = self._train_batch_size
        if batch is None and self.probe.ready:
            batch = batch_size(self.probe.batches[0])
        ratio = self.probe.size / batch if batch else 1.0
        return step_seconds * self.passes() * max(ratio, 1.0)

    def _measure(
        self, model: nn.Module, batches: list[Any], optimizer: Any | None, batch: Any | None
    ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """Return ``(metrics, settings per metric)``; runs inside the side-effect-free guards."""
        raise NotImplementedError

    # -- probe -------------------------------------------------------------------------------------
    @property
    def probe_ready(self) -> bool:
        return self.probe.ready

    def auto_probe_size(self, train_batch_size: int) -> int:
        """The default probe size for a training batch size: whole batches, one check within
        :attr:`CHECK_STEPS` training steps (``passes()`` counts one probe batch of that size)."""
        per_batch = max(self.passes(), 1e-9)
        n_batches = max(1, int(self.CHECK_STEPS // per_batch))
        return max(train_batch_size, min(n_batches * train_batch_size, 256))

    def capture(self, batch: Any) -> bool:
        """Copy examples of a batch training already drew into the probe set (no-op once complete)."""
        if self._train_batch_size is None:
            self._train_batch_size = batch_size(batch)
            if self._auto_probe and len(self.probe) == 0 and not self.probe.ready:
                self.probe.size = self.auto_probe_size(self._train_batch_size)
        if self.probe.ready:
            return True
        self._probe_device = None
        return self.probe.capture(batch)

    def set_probe(self, probe: Any) -> None:
        """Replace the probe set (a :class:`ProbeSet`, a batch or a list of batches)."""
        self.probe = probe if isinstance(probe, ProbeSet) else ProbeSet(probe, seed=self.seed)
        self._auto_probe = False
        self._probe_device = None

    def _probe_batches(self, model: nn.Module) -> list[Any]:
        device = next(model.parameters()).device
        if self._probe_device != device:
            self.probe.to(device)
            self._probe_device = device
        return BatchList(self.probe.batches)

    # -- the calls adapters make -------------------------------------------------------------------
    def on_step_end(
        self,
        step: int,
        model: nn.Module,
        optimizer: Any | None = None,
        loss: torch.Tensor | float | None = None,
        batch: Any | None = None,
        *,
        started: float | None = None,
    ) -> dict[str, float]:
        """Call after every optimizer step; returns the metrics of a check, or ``{}`` when none is due.

        Skipped steps cost a ``perf_counter()`` and, with ``loss``, one on-device running-average
        update (no host synchronisation). ``started`` is the ``time.perf_counter()`` at which the
        adapter's hook began (default: now); everything from then to the return, check or not, is
        counted as the monitor's time in ``monitor/overhead_pct`` and in the budget.
        """
        due = self.schedule.tick(step, now=started)
        self._last_step = step
        if batch is not None and (self._train_batch_size is None or not self.probe.ready):
            self.capture(batch)
        if due and len(self.probe) == 0 and not self.probe.ready:
            # never silent (docs/design.md promise 9): a check is due but nothing can be measured
            self.warn_once("no-probe", f"no check can run at step {step}: the probe set is empty; pass probe=[batches] "
                           "to the monitor or batch= to on_step_end so it can capture one.", step=step)
        due = due and self.probe.ready
        context: dict[str, float] = {}
        if loss is not None:
            if due:  # the current loss against the running average of the losses before it
                context = self._loss_context(loss)
            self._update_loss(loss)
        quick = (due and self.first_check == "quick" and self.schedule.n_checks == 0 and self.schedule.adaptive
                 and self.checks_at is None)
        metrics = self.check(step, model, optimizer=optimizer, batch=batch, _context=context,
                             _quick=quick) if due else {}
        self.schedule.leave()
        return metrics

    def check(
        self,
        step: int,
        model: nn.Module,
        optimizer: Any | None = None,
        batch: Any | None = None,
        *,
        _context: Mapping[str, float] | None = None,
        _quick: bool = False,
    ) -> dict[str, float]:
        """Measure now, evaluate alerts, append to the history, update the schedule; return the metrics.

        ``_quick`` (the adaptive schedule's first check with ``first_check="quick"``): measure the reduced
        workload of :meth:`quick_settings`, label it, and place the next check by a full check's cost.
        """
        start = time.perf_counter()
        with self._progress_bar(step, _quick):
            metrics, settings = self.measure(model, optimizer=optimizer, batch=batch, with_settings=True, _quick=_quick)
        if self.reduce_metrics is not None:
            metrics = self.reduce_metrics(metrics)
            self.reduced_keys = frozenset(metrics)
        context = dict(_context or {})
        self.last_alerts = []
        for rule in self.alerts:
            alert = rule.observe(step, metrics, context)
            rule.after_check(metrics, context)
            if alert is not None:
                self.last_alerts.append(alert)
        for rule in self.alerts:
            metrics[rule.flag_name] = float(rule.active)
        for alert in self.last_alerts:
            self._dispatch(alert)
        cost = time.perf_counter() - start
        if self.schedule.n_checks == 0:
            first = next((v for v in settings.values() if "tol" in v), next(iter(settings.values()), {}))
            self.first_check_settings = {k: first[k] for k in ("check", "probe_size", "of_probe", "tol", "converged",
                                                                "residual", "n_hvp") if k in first}
        planned = None
        if _quick:
            # the next check is a full one: space it by a full check's cost, not the quick one's - the larger
            # of the quick cost scaled to the whole probe and the cost model's estimate (both can fall short
            # of a cold full check: the re-planning and the checks after it correct the spacing)
            fs = self.first_check_settings or {}
            scaled = cost * max(fs.get("of_probe", 1) / max(fs.get("probe_size", 1), 1), 1.0)
            step_s = self.schedule.step_seconds
            planned = max(scaled, self.estimate_cost(step_s)) if step_s else scaled
        self.schedule.record(step, cost, planned_cost=planned)
        metrics[self.overhead_metric] = self.schedule.overhead_pct
        if self.schedule.n_checks == 1 and self.schedule.first_check_seconds is not None:
            metrics[self.first_check_metric] = self.schedule.first_check_seconds
        self.history.append(step, metrics, settings)
        self.last_metrics = metrics
        return metrics

    def measure(
        self,
        model: nn.Module,
        optimizer: Any | None = None,
        batch: Any | None = None,
        *,
        with_settings: bool = False,
        _quick: bool = False,
    ) -> Any:
        """Take every measure on the probe set now (no schedule, alerts or history); return the metrics.

        Works inside ``torch.no_grad()`` and ``torch.inference_mode()``.
        """
        batches = self._probe_batches(model)
        common: dict[str, Any] = {"probe_size": len(self.probe), "probe": self.probe.fingerprint, "seed": self.seed}
        if batch is not None:
            with torch.inference_mode(False):
                batch = move_to(_clone(batch), next(model.parameters()).device)
        self._quick = _quick
        try:
            with torch.inference_mode(False), torch.enable_grad(), \
                    side_effect_free(model, train=False, parameters=False):
                if _quick:
                    part = self.quick_batch(batches[0])
                    if part is not batches[0] and not self._runs_on(model, part):
                        part = batches[0]  # a loss that needs the whole batch (a state sized for it)
                    batches = BatchList([part])
                    common.update(check="quick", probe_size=batch_size(part), of_probe=len(self.probe),
                                  **self.quick_settings())
                metrics, settings = self._measure(model, batches, optimizer, batch)
        finally:
            self._quick = False
        settings = {name: {**common, **settings.get(name, {})} for name in metrics}
        return (metrics, settings) if with_settings else metrics

    # -- the quick first check ---------------------------------------------------------------------
    def quick_batch(self, batch: Any) -> Any:
        """The quick first check's probe: the first ``ceil(QUICK_FRACTION * n)`` examples of a probe batch."""
        n = batch_size(batch)
        keep = max(1, math.ceil(self.QUICK_FRACTION * n))
        if keep >= n:
            return batch
        try:
            return split_batch(batch, math.ceil(n / keep))[0]
        except ConfigurationError:  # a per-example tensor that is not batch-first: the whole batch
            return batch

    def _runs_on(self, model: nn.Module, batch: Any) -> bool:
        """Whether the probe loss runs on a part of a probe batch (one forward, no gradient); a loss whose
        state is sized for the training batch (a carried recurrent state) does not."""
        try:
            with torch.no_grad():
                self.loss_fn(model, batch)
        except ConfigurationError:
            raise
        except Exception:  # noqa: BLE001 - the quick check then measures the whole first batch
            return False
        return True

    def quick_settings(self) -> dict[str, Any]:
        """What else a quick first check changes (a subclass's looser solver tolerance), as settings."""
        return {}

    @property
    def quick(self) -> bool:
        """True while the quick first check measures (subclasses read it in :meth:`_measure`)."""
        return self._quick

    # -- progress ----------------------------------------------------------------------------------
    def _show_progress(self) -> tuple[bool, float]:
        """Whether a check shows a progress bar, and after how many seconds."""
        if self.progress is not None:
            return self.progress, 0.0
        return _progress.interactive(), self.PROGRESS_DELAY

    @contextlib.contextmanager
    def _progress_bar(self, step: int, quick: bool) -> Iterator[None]:
        """A tqdm bar over the measures of one check on stderr (see ``progress``); nothing when not shown."""
        show, delay = self._show_progress()
        if not show:
            yield
            return
        kind = "quick first check" if quick else "check"
        desc = f"sharpguard {type(self).__name__} {kind} at step {step}"
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = _DelayedBar(tqdm(total=len(self.measures), desc=desc, unit="measure", file=sys.stderr,
                                         delay=delay, leave=False, dynamic_ncols=True), delay)
        else:
            self._bar = _LineProgress(desc, delay)
        try:
            with _progress.reporting(self._progress_tick):
                yield
        finally:
            self._bar.close()
            self._bar = None

    def progress_stage(self, name: str) -> None:
        """A subclass starts measuring ``name`` (shown in the bar; a no-op without one)."""
        if self._bar is not None:
            self._bar.set_postfix_str(name, refresh=True)

    def progress_done(self, name: str, n: int = 1) -> None:
        """A subclass finished ``n`` measures (the last one ``name``)."""
        if self._bar is not None:
            self._bar.set_postfix_str(f"{name} done", refresh=False)
            self._bar.update(n)

    def _progress_tick(self, event: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(event, refresh=True)

    # -- helpers -----------------------------------------------------------------------------------
    def _update_loss(self, loss: torch.Tensor | float) -> None:
        """Fold a step's loss into the running average in place (docs/design.md promise 10).

        Nothing of the step is kept: a tensor loss is folded into two preallocated 0-dim device tensors
        (the average and the count of finite losses) with in-place kernels, so there is no host
        synchronisation and no allocation that outlives the call. Keeping each step's loss tensor alive
        instead pins glibc's heap above the freed activations, so RSS grows step after step on language
        models. ``avg <- d * avg + (1 - d) * l`` over finite ``l``; the first
        finite loss starts the average.
        """
        if isinstance(loss, torch.Tensor):
            value = loss.detach().reshape(()).float()
            if self._loss is None or self._loss.device != value.device:
                self._loss = torch.zeros((), device=value.device)
                self._loss_avg_acc = torch.zeros((), device=value.device)
                self._loss_n = torch.zeros((), device=value.device)
                if self._loss_avg is not None:  # carried over from a float/host average (resume)
                    self._loss_avg_acc.fill_(float(self._loss_avg))
                    self._loss_n.fill_(1.0)
            finite = torch.isfinite(value)
            d = self._loss_decay
            started = self._loss_n > 0
            updated = torch.where(started, self._loss_avg_acc * d + value * (1 - d), value)
            self._loss_avg_acc.copy_(torch.where(finite, updated, self._loss_avg_acc))
            self._loss_n.add_(finite.float())
            self._loss.copy_(value)
            self._loss_on_device = True
            return
        value = float(loss)
        avg = self._host_loss_avg()
        self._loss_avg = avg
        self._loss_on_device = False
        self._loss = None
        if math.isfinite(value):
            self._loss_avg = value if avg is None else self._loss_decay * avg + (1 - self._loss_decay) * value
        self._loss_host = value

    def _host_loss_avg(self) -> float | None:
        """The running average as a host float (one synchronisation; only at checks and saves)."""
        if getattr(self, "_loss_on_device", False) and self._loss is not None:
            if float(self._loss_n) == 0:
                return None
            return float(self._loss_avg_acc)
        return self._loss_avg

    def _host_last_loss(self) -> float | None:
        if getattr(self, "_loss_on_device", False) and self._loss is not None:
            return float(self._loss)
        return self._loss_host

    def _loss_context(self, loss: torch.Tensor | float) -> dict[str, float]:
        """The current loss and the running average of the earlier ones, as host floats."""
        context = {"loss": float(torch.as_tensor(loss).detach().float().reshape(()))}
        avg = self._host_loss_avg()
        if avg is not None:
            context["loss_avg"] = avg
        return context

    def _dispatch(self, alert: Alert) -> None:
        for action in self.on_alert:
            if action == "warn":
                warnings.warn(f"sharpguard alert at step {alert.step}: {alert.message}", MonitorAlertWarning,
                              stacklevel=3)
            elif action == "stop":
                self.should_stop = True
            elif callable(action):
                action(alert)

    def warn_once(self, key: str, message: str, step: int | None = None) -> None:
        """Say once why something cannot be done (docs/design.md promise 9): a warning and a history line.

        The history line is ``{"metric": "monitor/note", "value": 1.0, "settings": {"reason": ...}}``.
        """
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"sharpguard {type(self).__name__}: {message}", UserWarning, stacklevel=3)
            where = self._last_step if step is None else step
            self.history.append(max(int(where), 0), {"monitor/note": 1.0},
                                {"monitor/note": {"reason": message, "key": key}})

    def freeze_partial_probe(self, source: str) -> bool:
        """Measure with what a probe that cannot fill holds, and say so; False when it holds nothing."""
        if self.probe.ready:
            return True
        if len(self.probe) == 0:
            self.warn_once("probe-empty", f"no check can run: the probe set captured no examples from {source}; "
                           "pass probe=[batches] or check that the batches reach the monitor.")
            return False
        self.warn_once("probe-partial",
                       f"the probe set holds {len(self.probe)} of the {self.probe.size} examples asked for "
                       f"({source} has no more); measuring with those {len(self.probe)}.")
        self.probe.freeze()
        self._probe_device = None
        return True

    def estimated_check_steps(self) -> float | None:
        """Estimated cost of one check in training steps (None before the training batch size is known)."""
        batch = self._train_batch_size
        if batch is None and self.probe.ready:
            batch = batch_size(self.probe.batches[0])
        if not batch:
            if self._auto_probe:  # whole training batches, as many as keep a check within CHECK_STEPS
                per_batch = max(self.passes(), 1e-9)
                return per_batch * max(1, int(self.CHECK_STEPS // per_batch))
            return None
        return self.passes() * max(self.probe.size / batch, 1.0)

    def expect_steps(self, total_steps: int | float | None, source: str = "the run's length") -> None:
        """Tell the monitor how many optimizer steps the run will take (a front end that knows it).

        Warns at once when ``every_n_steps`` exceeds the run, so no check would ever be made.
        """
        if total_steps is None or not math.isfinite(float(total_steps)) or total_steps <= 0:
            return
        self.run_steps = int(total_steps)
        every = self.schedule.every_n_steps
        if every is not None and every > self.run_steps and self.checks_at is None:
            self.warn_once("every-exceeds-run", f"every_n_steps={every} exceeds this run's {self.run_steps} optimizer "
                           f"steps ({source}), so no check will run; pass every_n_steps <= {self.run_steps}, or leave "
                           "it None for the adaptive schedule (first check at the first measured step).", step=0)

    def describe(self) -> str:
        """One console line: what this monitor measures, on what probe, when and at what estimated cost."""
        every = self.schedule.every_n_steps
        cost = self.estimated_check_steps()
        if self.checks_at is not None:
            when = (f"at {self.checks_at} (not on the step schedule, so outside the "
                    f"{100 * self.schedule.budget:g}% budget)")
        elif every:
            when = f"every {every} steps (fixed: the {100 * self.schedule.budget:g}% budget does not apply)"
        else:
            if self.first_check == "quick":
                tol = self.quick_settings().get("tol")
                first = (f"a quick check on {self.QUICK_FRACTION:.1%} of the first probe batch"
                         f"{f' at tolerance {tol:g}' if tol else ''} that shows the measurement works")
            else:
                first = "a full check that shows the measurement works, at about a check's cost plus one-time set-up"
            when = (f"first check at the first measured step ({first}, reported apart as {self.first_check_metric}), "
                    f"then within {100 * self.schedule.budget:g}% of training time ({self.overhead_metric})")
        cost_txt = (f"~{cost:.0f} training steps per check (estimated)" if cost is not None
                    else f"~{self.passes():.0f} training steps per check per training-batch-sized probe "
                    "batch (estimated)")
        size = ("sized at the first batch to keep a check within ~"
                f"{self.CHECK_STEPS} training steps" if self._auto_probe and self._train_batch_size is None
                else f"of {self.probe.size} examples")
        return (f"{type(self).__name__} measures {', '.join(self.measures)} on a {self.probe.source} probe {size}, "
                f"{when}; {cost_txt}.")

    def summary(self) -> str:
        """One console line at the end: the first check apart, then the steady state against the budget,
        and in plain words why a run got no steady-state check."""
        s = self.schedule
        name = type(self).__name__
        budget = 100 * s.budget
        if s.n_checks == 0:
            return f"{name} made 0 checks in {s.train_seconds:.1f} s of training: {self._no_check_reason()}"
        step_s = s.step_seconds or (s.train_seconds / max(self._steps_done(), 1) if s.train_seconds > 0 else None)
        in_steps = (f" (~{s.first_check_seconds / step_s:.0f} training steps)" if step_s and s.first_check_seconds
                    else "")
        first = (f"first check at step {s.first_check_step}{self._first_check_label()}: "
                 f"{s.first_check_seconds or 0.0:.2f} s{in_steps}, reported apart as {self.first_check_metric}")
        steady = (f"steady state: {s.n_checks - 1} more check{'s' if s.n_checks != 2 else ''} and per-step bookkeeping "
                  f"took {s.steady_seconds:.2f} s = {s.overhead_pct:.1f}% of the {s.steady_train_seconds:.1f} s of "
                  f"training after it ({self.overhead_metric}; all included, {s.total_overhead_pct:.1f}% of "
                  f"{s.train_seconds:.1f} s)")
        if self.checks_at is not None:
            why = (f"checks ran at {self.checks_at}, one per validation, not on the step schedule, so the "
                   f"{budget:g}% budget does not bound them")
        elif s.every_n_steps is not None:
            why = f"every_n_steps={s.every_n_steps} fixes the interval, so the {budget:g}% budget does not bound it"
            if s.overhead_pct > budget and s.n_checks > 1 and step_s:
                per_check = (s.steady_seconds / (s.n_checks - 1)) / step_s
                why += (f"; above it: a check costs ~{per_check:.0f} training steps, so every_n_steps of about "
                        f"{math.ceil(per_check / s.budget)} (or None, the adaptive schedule) keeps within it")
        elif s.n_checks == 1 and s.next_step > self._steps_done():
            why = (f"the run ended at step {self._steps_done()}, before the next check was due at step {s.next_step}: "
                   f"the {budget:g}% budget spaces checks that far apart, so a run this short gets the first check "
                   "only and its steady state is the per-step bookkeeping")
        else:
            why = f"within the {budget:g}% budget" if s.overhead_pct <= budget + 1e-9 else (
                f"above the {budget:g}% budget: the checks cost more than the schedule estimated")
        return f"{name} made {s.n_checks} checks; {first}; {steady}; {why}."

    def _first_check_label(self) -> str:
        """`` (a quick check: ...)`` for a quick first check, from its recorded settings; else empty."""
        fs = self.first_check_settings or {}
        if fs.get("check") != "quick":
            return ""
        tol = f", tolerance {fs['tol']:g}" if "tol" in fs else ""
        if tol and fs.get("converged") is False and "residual" in fs:
            # not met within its products: the residual still bounds the error (an eigenvalue lies that close)
            tol += (f" not reached in {fs.get('n_hvp')} products, Ritz residual {fs['residual']:.2g} (an eigenvalue "
                    "lies within it)")
        return (f" (a quick check that proves the measurement end to end: {fs.get('probe_size')} of the probe's "
                f"{fs.get('of_probe')} examples{tol}; full checks on the whole probe follow on the schedule)")

    def first_check_line(self, metrics: Mapping[str, float]) -> str | None:
        """One console line right after the first check: ``first check done: <measure>=<value> in <s> s
        (quick, ...)``, from that check's metrics; None after any other check."""
        s = self.schedule
        if s.n_checks != 1 or s.first_check_seconds is None:
            return None
        keys = {m: f"{self.prefix}/{m}" if self.prefix else m for m in self.measures}
        values = [f"{m}={metrics[k]:.4g}" for m, k in keys.items() if k in metrics]
        fs = self.first_check_settings or {}
        if fs.get("check") == "quick":
            kind = f"quick, {fs.get('probe_size')} of the probe's {fs.get('of_probe')} examples"
            kind += f", tolerance {fs['tol']:g}" if "tol" in fs else ""
        else:
            kind = f"full, {self.probe.size} probe examples"
        adaptive = self.checks_at is None and s.every_n_steps is None
        then = (f"full checks follow within the {100 * s.budget:g}% budget" if adaptive
                else "the next follow the schedule")
        return (f"first check done: {', '.join(values) or 'no value'} in {s.first_check_seconds:.2f} s ({kind}; "
                f"{type(self).__name__} at step {s.first_check_step}; {then}).")

    def summary_warns(self) -> bool:
        """Whether :meth:`summary` is a warning: no steady state (the first check only) or a steady-state
        overhead above the budget. A run with no check warns through :meth:`end_notes` instead."""
        s = self.schedule
        return s.n_checks == 1 or (s.n_checks > 1 and s.overhead_pct > 100 * s.budget + 1e-9)

    def _no_check_reason(self) -> str:
        s = self.schedule
        if not self.probe.ready:
            return (f"the probe set holds {len(self.probe)} of its {self.probe.size} examples, and no check runs until "
                    "it is complete; pass probe=[batches] or a smaller probe_size.")
        if self.checks_at is not None:
            return f"checks run at {self.checks_at}, and none was reached."
        if s.every_n_steps is not None:
            return (f"every_n_steps={s.every_n_steps} is more than the {self._steps_done()} optimizer steps trained; "
                    "pass a smaller every_n_steps, or leave it None for the adaptive schedule.")
        return (f"the run took {self._steps_done()} optimizer step(s), and the first check waits for a measured step "
                "time (step 2 at the earliest).")

    def _steps_done(self) -> int:
        """The latest optimizer step seen (by :meth:`on_step_end`, or by the schedule alone)."""
        return max(self._last_step, self.schedule._last_step or 0)

    def end_notes(self) -> list[str]:
        """What the end of a run must say as a warning, not an info line: a monitor that made no check.

        Each note is also a ``monitor/note`` history record (once); the adapter warns through its
        framework's own channel (Lightning's rank-zero warning, transformers' or Accelerate's logger).
        """
        notes = []
        if self.schedule.n_checks == 0:
            notes.append(("no-check", f"{type(self).__name__} made no check: {self._no_check_reason()}"))
        for key, message in notes:
            if key not in self._warned:
                self._warned.add(key)
                self.history.append(max(int(self._steps_done()), 0), {"monitor/note": 1.0},
                                    {"monitor/note": {"reason": message, "key": key}})
        return [message for _, message in notes]

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """History tail, running averages, alert counters, schedule and probe (tensors if small)."""
        return {
            "measures": list(self.measures),
            "seed": self.seed,
            "schedule": self.schedule.state_dict(),
            "alerts": [rule.state_dict() for rule in self.alerts],
            "history": self.history.state_dict(),
            "probe": self.probe.state_dict(self.probe_state_max_bytes),
            "loss": self._host_last_loss(),
            "loss_avg": self._host_loss_avg(),
            "should_stop": self.should_stop,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; all or nothing.

        Every field is checked first (types, ranges, finiteness, the measures and alerts configured);
        on any problem one :class:`ConfigurationError` names the field and nothing has changed.
        """
        _check_state(self, state)
        self.seed = int(state["seed"])
        self.schedule.load_state_dict(state["schedule"])
        for rule, rule_state in zip(self.alerts, state["alerts"]):
            rule.load_state_dict(rule_state)
        self.history.load_state_dict(state["history"])
        self.probe.load_state_dict(state["probe"])
        self._probe_device = None
        self._loss = self._loss_avg_acc = self._loss_n = None
        self._loss_on_device = False
        self._loss_host = None if state["loss"] is None else float(state["loss"])
        self._loss_avg = None if state["loss_avg"] is None else float(state["loss_avg"])
        self.should_stop = bool(state["should_stop"])
        self._load_extra_state(state.get("extra") or {})

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        """Subclasses check their :meth:`_extra_state` here (raise ConfigurationError)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        every = self.schedule.every_n_steps
        when = f"every_n_steps={every}" if every else f"budget={self.schedule.budget:g}"
        return f"{type(self).__name__}(measures={list(self.measures)}, {when}, probe_size={self.probe.size})"


class _DelayedBar:
    """A tqdm bar that draws nothing before ``delay`` seconds (tqdm's ``refresh`` ignores its ``delay``),
    then redraws at every stage and measure done."""

    def __init__(self, bar: Any, delay: float) -> None:
        self.bar, self.delay, self._start = bar, delay, time.perf_counter()

    def _due(self) -> bool:
        return time.perf_counter() - self._start >= self.delay

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.bar.set_postfix_str(text, refresh=refresh and self._due())

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        if self._due():
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _LineProgress:
    """Progress without tqdm: one line per finished measure on stderr (after ``delay`` seconds)."""

    def __init__(self, desc: str, delay: float = 0.0) -> None:
        self.desc, self.delay, self._text, self._start = desc, delay, "", time.perf_counter()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self._text = text

    def update(self, n: int = 1) -> None:
        seconds = time.perf_counter() - self._start
        if seconds >= self.delay:
            print(f"{self.desc}: {self._text} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _bad(field: str, value: Any, want: str) -> ConfigurationError:
    return ConfigurationError(
        f"monitor checkpoint field {field!r} must be {want}, got {value!r}; the checkpoint is corrupt or from another "
        "monitor; nothing was loaded."
    )


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_real(value: Any, *, none: bool = False, low: float | None = None) -> bool:
    if value is None:
        return none
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return low is None or value >= low


def _check_state(monitor: Monitor, state: Any) -> None:
    """Check a whole monitor state before any of it is loaded (raises ConfigurationError)."""
    if not isinstance(state, Mapping):
        raise _bad("<state>", type(state).__name__, "a mapping returned by state_dict()")
    need = ("measures", "seed", "schedule", "alerts", "history", "probe", "loss", "loss_avg", "should_stop")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigurationError(f"the monitor checkpoint lacks {missing}; pass what state_dict() returned. "
                                 "Nothing was loaded.")
    measures = state["measures"]
    if not isinstance(measures, (list, tuple)) or not all(isinstance(m, str) for m in measures):
        raise _bad("measures", measures, "a list of measure names")
    if list(measures) != list(monitor.measures):
        raise ConfigurationError(
            f"this checkpoint's monitor measured {list(measures)}, this one measures {list(monitor.measures)}; "
            "configure the same measures (or give the monitors distinct names) to resume."
        )
    if not _is_int(state["seed"], low=-(2**63)):
        raise _bad("seed", state["seed"], "an integer")
    for key in ("loss", "loss_avg"):
        if not _is_real(state[key], none=True):
            raise _bad(key, state[key], "a finite number or None")
    if not isinstance(state["should_stop"], bool):
        raise _bad("should_stop", state["should_stop"], "True or False")
    # schedule
    sched = state["schedule"]
    if not isinstance(sched, Mapping):
        raise _bad("schedule", sched, "a mapping")
    for key in ("next_step", "n_checks"):
        if not _is_int(sched.get(key)):
            raise _bad(f"schedule.{key}", sched.get(key), "an integer >= 0")
    for key in ("monitor_seconds", "train_seconds", "last_cost"):
        if not _is_real(sched.get(key), low=0.0):
            raise _bad(f"schedule.{key}", sched.get(key), "a finite number >= 0")
    if not _is_real(sched.get("step_seconds"), none=True, low=0.0):
        raise _bad("schedule.step_seconds", sched.get("step_seconds"), "a finite number >= 0 or None")
    if "placed" in sched and not isinstance(sched["placed"], bool):
        raise _bad("schedule.placed", sched["placed"], "True or False")
    if not _is_real(sched.get("first_check_seconds"), none=True, low=0.0):
        raise _bad("schedule.first_check_seconds", sched.get("first_check_seconds"), "a finite number >= 0 or None")
    if sched.get("first_check_step") is not None and not _is_int(sched.get("first_check_step")):
        raise _bad("schedule.first_check_step", sched.get("first_check_step"), "an integer >= 0 or None")
    setup = sched.get("setup_seconds", (0.0, 0.0))
    if not isinstance(setup, (list, tuple)) or len(setup) != 2 or not all(_is_real(v, low=0.0) for v in setup):
        raise _bad("schedule.setup_seconds", setup, "two finite numbers >= 0")
    # alerts
    alerts = state["alerts"]
    if not isinstance(alerts, (list, tuple)) or len(alerts) != len(monitor.alerts):
        raise ConfigurationError(
            f"this checkpoint's monitor had {len(alerts) if isinstance(alerts, (list, tuple)) else alerts!r} alert "
            f"rules, this one has {len(monitor.alerts)}; configure the same alerts to resume. Nothing was loaded."
        )
    for i, (rule, rule_state) in enumerate(zip(monitor.alerts, alerts)):
        own = rule.state_dict()
        if not isinstance(rule_state, Mapping) or set(rule_state) != set(own):
            raise _bad(f"alerts[{i}]", rule_state, f"a mapping with keys {sorted(own)}")
        for key, value in rule_state.items():
            if key == "active":
                ok = isinstance(value, bool)
            elif key in ("hits", "clears", "n_fired", "seen"):
                ok = _is_int(value)
            else:
                ok = _is_real(value, none=True)
            if not ok:
                raise _bad(f"alerts[{i}].{key}", value, "a valid value of that alert's state")
    # history
    hist = state["history"]
    if not isinstance(hist, Mapping) or not isinstance(hist.get("records"), (list, tuple)):
        raise _bad("history", hist, "a mapping with a list of records")
    for j, rec in enumerate(hist["records"]):
        if (
            not isinstance(rec, Mapping)
            or not _is_int(rec.get("step"))
            or not isinstance(rec.get("metric"), str)
            or not (rec.get("value") is None or _is_real(rec.get("value")))
            or not isinstance(rec.get("settings", {}), Mapping)
        ):
            raise _bad(f"history.records[{j}]", rec,
                       "{'step': int >= 0, 'metric': str, 'value': finite float or None, 'settings': {...}}")
    # probe
    probe = state["probe"]
    if not isinstance(probe, Mapping):
        raise _bad("probe", probe, "a mapping")
    if not _is_int(probe.get("size"), low=1):
        raise _bad("probe.size", probe.get("size"), "an integer >= 1")
    if probe.get("batch_size") is not None and not _is_int(probe.get("batch_size"), low=1):
        raise _bad("probe.batch_size", probe.get("batch_size"), "an integer >= 1 or None")
    if not _is_int(probe.get("seed"), low=-(2**63)):
        raise _bad("probe.seed", probe.get("seed"), "an integer")
    if probe.get("source") not in ("captured", "given", "dataset"):
        raise _bad("probe.source", probe.get("source"), "'captured', 'given' or 'dataset'")
    if not _is_int(probe.get("held")) or not isinstance(probe.get("frozen"), bool):
        raise _bad("probe.held/frozen", (probe.get("held"), probe.get("frozen")), "an integer >= 0 and a bool")
    batches = probe.get("batches")
    if batches is not None:
        if not isinstance(batches, (list, tuple)) or not batches:
            raise _bad("probe.batches", type(batches).__name__, "None or a non-empty list of batches")
        held = 0
        for k, b in enumerate(batches):
            try:
                n = batch_size(b)
            except ConfigurationError:
                raise _bad(f"probe.batches[{k}]", type(b).__name__, "a batch of tensors") from None
            if n < 1:
                raise _bad(f"probe.batches[{k}]", f"{n} examples", "a batch with at least one example")
            held += n
        if held != probe["held"]:
            raise _bad("probe.held", probe["held"], f"the number of examples in probe.batches ({held})")
    extra = state.get("extra", {})
    extra = {} if extra is None else extra  # (no truth test: a corrupted field may be a tensor)
    if not isinstance(extra, Mapping):
        raise _bad("extra", extra, "a mapping")
    monitor._check_extra_state(extra)


def _clone(batch: Any) -> Any:
    """A detached copy of every tensor in a batch (the structure kept, namedtuples included)."""
    return apply_to_tensors(batch, lambda t: t.detach().clone())
