"""Monitors in an Accelerate loop."""


from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sharpguard.errors import ConfigurationError, require
from sharpguard.monitor.driver import MonitorDriver, torch_comm

require("accelerate", "accelerate")



from sharpguard.optim import unwrap_optimizer as _unwrap_optimizer
from sharpguard import _validation as rules

from ._precision import say_fp16_ignored


def _logger() -> Any:
    """Accelerate's multi-process logger (``main_process_only=`` per call)."""
    from accelerate.logging import get_logger

    return get_logger(__name__)



# --------------------------------------------------------------------------------------------------
# public: monitors in an Accelerate loop
# --------------------------------------------------------------------------------------------------
class MonitorStep:
    """Run a :mod:`sharpguard.monitor` monitor after optimizer steps of an Accelerate loop.

    Call :meth:`step` right after ``optimizer.step()`` on every micro-batch; it does nothing on
    accumulation micro-steps (``accelerator.sync_gradients`` false), counts optimizer steps, and on
    the steps the monitor's schedule picks logs the metrics with ``accelerator.log`` (so they reach
    every tracker set up by ``accelerator.init_trackers``). Runs on every rank (the probe set is the
    same everywhere); the :class:`~sharpguard.monitor.MonitorDriver` averages metrics over ranks,
    agrees on the schedule and lets only the main process write the JSON-lines history.
    """

    @rules.checked()
    def __init__(self, accelerator: Any, monitor: Any, *, log: bool = True, total_steps: int | None = None):
        if not isinstance(log, bool):
            raise ConfigurationError(f"log must be True or False, got {log!r}.")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ConfigurationError(f"total_steps is the loop's number of optimizer steps (an integer >= 1) or None, "
                                     f"got {total_steps!r}.")
        self.accelerator = accelerator
        self.monitor = monitor
        self.log = log
        comm = torch_comm(accelerator.device) if accelerator.num_processes > 1 else None
        self.driver = MonitorDriver(monitor, comm, is_rank_zero=accelerator.is_main_process)
        if total_steps is not None and callable(getattr(monitor, "expect_steps", None)):
            monitor.expect_steps(total_steps, f"total_steps={total_steps}")
        self._finished = False
        say_fp16_ignored(accelerator)
        from .sam import guard_registered_state

        self._load_guard = guard_registered_state(accelerator, self, "the monitor's history tail, schedule, alerts, "
                                                  "probe", self._check_state)
        describe = getattr(monitor, "describe", None)
        if callable(describe):
            _logger().info(f"sharpguard: {describe()}", main_process_only=True)

    def finish(self) -> str:
        """Say what the monitor did (Accelerate's logger, main process): the first check apart, the steady
        state against the budget or why a short run has none; a warning when there is no steady state, when it
        is over the budget, or when no check was made. Call
        once after the loop; returns the summary line."""
        summary = getattr(self.monitor, "summary", None)
        line = summary() if callable(summary) else ""
        if not self._finished:
            self._finished = True
            if line:
                # a warning when there is no steady state or it is over the budget
                warns = getattr(self.monitor, "summary_warns", lambda: False)()
                (_logger().warning if warns else _logger().info)(f"sharpguard: {line}", main_process_only=True)
            for note in getattr(self.monitor, "end_notes", lambda: [])():
                _logger().warning(f"sharpguard: {note}", main_process_only=True)
        return line

    @property
    def global_step(self) -> int:
        """Optimizer steps counted so far."""
        return self.driver.global_step

    def step(self, model: nn.Module, *, optimizer: Any = None, loss: torch.Tensor | None = None,
             batch: Any = None) -> dict[str, float]:
        """After ``optimizer.step()``; returns the metrics measured at this step (empty if none)."""
        started = time.perf_counter()  # this call's whole time counts as the monitor's
        if not self.accelerator.sync_gradients:
            return {}
        model = self.accelerator.unwrap_model(model)
        opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
        metrics = self.driver.step(model, optimizer=opt, loss=loss, batch=batch, started=started)
        first = getattr(self.monitor, "first_check_line", None)
        line = first(metrics) if metrics and callable(first) else None
        if line is not None:
            _logger().info(f"sharpguard: {line}", main_process_only=True)
        if metrics and self.log and self.accelerator.trackers:
            self.accelerator.log(dict(metrics), step=self.global_step)
        if metrics:
            self.driver.leave()
        return dict(metrics)

    @property
    def should_stop(self) -> bool:
        """True once an alert with action "stop" fired on any rank (break out of your loop)."""
        return self.driver.should_stop

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """All-or-nothing: checked completely before anything changes. Registered with
        ``accelerator.register_for_checkpointing``, its file is read with ``weights_only=True`` and
        checked before Accelerate loads anything (a crafted, torn or missing part is refused, never run)."""
        self.driver.load_state_dict(state)

    def _check_state(self, state: Any) -> None:
        """The checks of :meth:`load_state_dict`, changing nothing (ConfigurationError)."""
        self.driver.check_state_dict(state)
