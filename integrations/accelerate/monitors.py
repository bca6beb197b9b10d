"""Monitors in an Accelerate loop."""


from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sharpguard.errors import require

require("accelerate", "accelerate")


from sharpguard.optim import unwrap_optimizer as _unwrap_optimizer

# --------------------------------------------------------------------------------------------------
# public: monitors in an Accelerate loop
# --------------------------------------------------------------------------------------------------
class MonitorStep:
    """Run a :mod:`sharpguard.monitor` monitor after optimizer steps of an Accelerate loop.

    Call :meth:`step` right after ``optimizer.step()`` on every micro-batch; it does nothing on
    accumulation micro-steps (``accelerator.sync_gradients`` false), counts optimizer steps, and on
    the steps the monitor's schedule picks logs the metrics with ``accelerator.log`` (so they reach
    every tracker set up by ``accelerator.init_trackers``). Runs on every rank (the probe set is the
    same everywhere); only the main process writes the monitor's JSON-lines history.
    """

    def __init__(self, accelerator: Any, monitor: Any, *, log: bool = True):
        self.accelerator = accelerator
        self.monitor = monitor
        self.log = log
        self.global_step = 0
        history = getattr(monitor, "history", None)
        if history is not None and hasattr(history, "enabled"):
            history.enabled = history.enabled and accelerator.is_main_process

    def step(self, model: nn.Module, *, optimizer: Any = None, loss: torch.Tensor | None = None, batch: Any = None) -> dict[str, float]:
        """After ``optimizer.step()``; returns the metrics measured at this step (empty if none)."""
        started = time.perf_counter()  # this call's whole time counts as the monitor's
        if not self.accelerator.sync_gradients:
            return {}
        self.global_step += 1
        model = self.accelerator.unwrap_model(model)
        opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
        metrics = self.monitor.on_step_end(self.global_step, model, optimizer=opt, loss=loss, batch=batch, started=started)
        if metrics and self.log and self.accelerator.trackers:
            self.accelerator.log(dict(metrics), step=self.global_step)
            self.monitor.schedule.leave()
        return dict(metrics or {})

    @property
    def should_stop(self) -> bool:
        """True once an alert with action "stop" fired (break out of your loop)."""
        return bool(getattr(self.monitor, "should_stop", False))

    def state_dict(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.monitor.load_state_dict(state["monitor"])
