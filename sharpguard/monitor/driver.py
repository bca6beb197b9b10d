"""The framework-free monitor driver: what every adapter (Lightning, HF Trainer, Accelerate, a plain
loop) does around a :class:`~sharpguard.monitor.Monitor`, written once.

The driver owns step counting (one call per optimizer step; accumulation micro-batches repeat the
step and are ignored), the timing of the monitor's own time (the hook's start is passed in, and
:meth:`MonitorDriver.leave` closes it after the adapter has logged), rank-0 history, the one rule for
agreeing on the schedule across ranks, the averaging of metrics across ranks, "stop" alerts on any
rank, and the monitor's checkpoint state. An adapter supplies a :class:`Comm` built from its framework
(Lightning's strategy, Accelerate's state) and translates hooks and logging; nothing else.

The schedule rule (docs/design.md promise 8): an adaptive schedule is set from wall-clock time, which
differs across ranks. It changes only at steps that are the same on every rank (the first step whose
time is known, and the steps with a check), and :attr:`Schedule.changed` says so; the driver then
broadcasts rank 0's ``next_step``. No collective runs on the other steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = ["Comm", "LocalComm", "MonitorDriver"]


class Comm(Protocol):
    """The four collectives the driver needs, supplied by an adapter from its framework."""

    world_size: int

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""

    def mean_floats(self, values: list[float]) -> list[float]:
        """Element-wise mean over ranks (same length everywhere)."""

    def any_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""


class LocalComm:
    """One process: every collective is the identity."""

    world_size = 1

    def broadcast_int(self, value: int) -> int:
        return int(value)

    def mean_floats(self, values: list[float]) -> list[float]:
        return list(values)

    def any_true(self, flag: bool) -> bool:
        return bool(flag)


class MonitorDriver:
    """Drive one monitor from an adapter's hooks.

    Args:
        monitor: a :class:`~sharpguard.monitor.Monitor` (or any object with ``on_step_end``,
            ``state_dict`` and ``load_state_dict``).
        comm: the adapter's collectives (default: one process).
        is_rank_zero: only rank 0 writes the monitor's JSON-lines history.
    """

    @rules.checked()
    def __init__(self, monitor: Any, comm: Comm | None = None, *, is_rank_zero: bool = True) -> None:
        if not callable(getattr(monitor, "on_step_end", None)):
            raise ConfigurationError(
                f"monitor must be a sharpguard.monitor monitor (with on_step_end), got {type(monitor).__name__}."
            )
        self.monitor = monitor
        self.comm: Comm = comm or LocalComm()
        self.last_step = -1
        #: optimizer steps counted by :meth:`step` when the adapter does not give one
        self.global_step = 0
        self.set_comm(comm, is_rank_zero=is_rank_zero)

    def set_comm(self, comm: Comm | None, *, is_rank_zero: bool = True) -> None:
        """Attach the collectives once the framework has set up its processes."""
        self.comm = comm or LocalComm()
        self.set_rank_zero(is_rank_zero)
        if hasattr(self.monitor, "reduce_metrics"):
            # measured values are averaged inside the check, before alerts and history see them
            self.monitor.reduce_metrics = self._mean if self.comm.world_size > 1 else None

    def _mean(self, metrics: Mapping[str, float]) -> dict[str, float]:
        names = sorted(metrics)
        return dict(zip(names, self.comm.mean_floats([float(metrics[n]) for n in names]), strict=True))

    def set_rank_zero(self, is_rank_zero: bool) -> None:
        history = getattr(self.monitor, "history", None)
        if history is not None and hasattr(history, "enabled"):
            history.enabled = bool(is_rank_zero)

    # -- per optimizer step ----------------------------------------------------------------------
    def step(
        self,
        model: Any,
        *,
        step: int | None = None,
        optimizer: Any = None,
        loss: Any = None,
        batch: Any = None,
        started: float | None = None,
        measure: bool = True,
    ) -> dict[str, float]:
        """After an optimizer step; return the metrics (averaged over ranks) of a check, else ``{}``.

        ``step``: the framework's optimizer-step counter (a repeated value is an accumulation
        micro-batch and is ignored); ``None`` counts calls. ``measure=False`` only accounts training
        time (a monitor that checks at validation ends). Call :meth:`leave` after logging.
        """
        if started is None:
            started = time.perf_counter()
        if step is None:
            self.global_step += 1
            step = self.global_step
        elif step == self.last_step:
            return {}
        self.last_step = step
        schedule = getattr(self.monitor, "schedule", None)
        if not measure:
            if schedule is not None:
                schedule.tick(step, now=started)
                schedule.leave()
            return {}
        metrics = self.monitor.on_step_end(step, model, optimizer=optimizer, loss=loss, batch=batch, started=started)
        self._agree_on_schedule()
        return self._gather(metrics) if metrics else {}

    def check(self, step: int, model: Any, *, optimizer: Any = None) -> dict[str, float]:
        """A check now, ignoring the schedule (e.g. at validation end); metrics averaged over ranks."""
        metrics = self.monitor.check(step, model, optimizer=optimizer)
        return self._gather(metrics)

    def leave(self) -> None:
        """The adapter's hook ends: its time since ``started`` (logging included) is the monitor's."""
        schedule = getattr(self.monitor, "schedule", None)
        if schedule is not None:
            schedule.leave()

    @property
    def should_stop(self) -> bool:
        """True once a "stop" alert fired on any rank (agreed at the check that fired it)."""
        return bool(getattr(self, "_stop", False) or getattr(self.monitor, "should_stop", False))

    def _agree_on_schedule(self) -> None:
        schedule = getattr(self.monitor, "schedule", None)
        if schedule is None or not getattr(schedule, "changed", False):
            return
        schedule.changed = False
        if self.comm.world_size > 1:
            schedule.next_step = int(self.comm.broadcast_int(int(schedule.next_step)))

    def _gather(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Average a check's metrics over ranks and agree on "stop" (collectives at check steps only)."""
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.comm.world_size > 1:
            # what the check added after its measures (overhead_pct, alert flags) is averaged here;
            # the measured values were averaged inside the check
            done = getattr(self.monitor, "reduced_keys", frozenset())
            rest = {k: v for k, v in metrics.items() if k not in done}
            if rest:
                metrics.update(self._mean(rest))
            self._stop = self.comm.any_true(bool(getattr(self.monitor, "should_stop", False)))
        return metrics

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "last_step": self.last_step, "global_step": self.global_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Validate everything, then load (the monitor's own load is all-or-nothing too)."""
        steps = self.check_state_dict(state)
        self.monitor.load_state_dict(state["monitor"])
        self.last_step, self.global_step = steps["last_step"], steps["global_step"]

    def check_state_dict(self, state: Any) -> dict[str, int]:
        """Every check of :meth:`load_state_dict`, changing nothing: for a loader that must refuse a
        checkpoint before anything else is loaded (ConfigurationError). Returns the step fields."""
        if not isinstance(state, Mapping) or "monitor" not in state:
            raise ConfigurationError(
                "a monitor checkpoint is a mapping with a 'monitor' entry; pass what state_dict() returned."
            )
        steps = {}
        for key in ("last_step", "global_step"):
            value = state.get(key, -1 if key == "last_step" else 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ConfigurationError(f"monitor checkpoint field {key!r} must be an integer >= -1, got {value!r}.")
            steps[key] = value
        from .base import Monitor, _check_state

        if isinstance(self.monitor, Monitor):
            _check_state(self.monitor, state["monitor"])
        return steps


def torch_comm(device: Any = None, group: Any = None) -> Comm:
    """A :class:`Comm` over ``torch.distributed`` (the default group when initialised), else :class:`LocalComm`."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return LocalComm()
    return _TorchComm(device, group)


class _TorchComm:
    @rules.checked()
    def __init__(self, device: Any, group: Any) -> None:
        import torch.distributed as dist

        self.group = group
        self.device = device
        self.world_size = dist.get_world_size(group)
        self._src = dist.get_global_rank(group, 0) if group is not None else 0

    def _tensor(self, values: list[float], dtype: Any) -> Any:
        import torch
        import torch.distributed as dist

        device = self.device
        if device is None:
            nccl = dist.get_backend(self.group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return torch.tensor(values, dtype=dtype, device=device)

    def broadcast_int(self, value: int) -> int:
        import torch
        import torch.distributed as dist

        t = self._tensor([value], torch.int64)
        dist.broadcast(t, src=self._src, group=self.group)
        return int(t.item())

    def mean_floats(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        t = self._tensor(values, torch.float64)
        dist.all_reduce(t, group=self.group)
        return (t / self.world_size).tolist()

    def any_true(self, flag: bool) -> bool:
        import torch
        import torch.distributed as dist

        t = self._tensor([float(flag)], torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)


#: adapters that need a callable for logging take this shape
LogFn = Callable[[dict[str, float]], None]
