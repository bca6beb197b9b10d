"""Monitor callbacks: run a sharpguard.monitor monitor at optimizer-step ends and/or validation ends."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sharpguard.errors import ConfigurationError


from sharpguard.monitor import Monitor
from sharpguard.monitor import RobustnessMonitor as _CoreRobustnessMonitor
from sharpguard.monitor import SharpnessMonitor as _CoreSharpnessMonitor

from ._hooks import Callback, _loss_of

# --------------------------------------------------------------------------------------------------
# monitors
# --------------------------------------------------------------------------------------------------
class _MonitorCallback(Callback):
    """Runs a :class:`sharpguard.monitor.Monitor` at optimizer-step ends and/or at validation end.

    Metrics go to every logger the Trainer has (``logger.log_metrics`` at ``step=trainer.global_step``,
    independent of ``log_every_n_steps``: checks are sparse) and into ``trainer.callback_metrics`` through
    ``pl_module.log(..., logger=False)``, where ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and
    the progress bar find them. Under DDP every rank measures (the Hessian products all-reduce), the
    metrics are averaged across ranks, the adaptive schedule is broadcast from rank 0 after each check and
    a "stop" alert stops all ranks.
    """

    _core: type[Monitor] = Monitor

    def __init__(self, *, name: str | None = None, when: str = "train", prog_bar: bool = False, **monitor_kwargs: Any) -> None:
        super().__init__()
        if when not in ("train", "validation", "both"):
            raise ConfigurationError(f"when must be 'train', 'validation' or 'both', got {when!r}.")
        self.monitor = self._core(**monitor_kwargs)
        self.name = name
        self.when = when
        self.prog_bar = prog_bar
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, measures=",".join(self.monitor.measures))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.monitor.history.enabled = trainer.is_global_zero

    # -- probe capture from batches Lightning already drew (training batches: in on_step_end) -------
    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.when != "train" and not self.monitor.probe_ready and not trainer.sanity_checking:
            self.monitor.capture(batch)

    # -- checks -------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        started = time.perf_counter()  # this hook's whole time counts as the monitor's (honest cost)
        step = trainer.global_step
        if step == self._last_step:
            return  # an accumulation micro-batch: no optimizer step happened
        self._last_step = step
        if self.when == "validation":
            self.monitor.schedule.tick(step, now=started)  # training time, for monitor/overhead_pct
            self.monitor.schedule.leave()
            return
        loss = _loss_of(outputs) if isinstance(outputs, (Tensor, Mapping)) else None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metrics = self.monitor.on_step_end(step, pl_module, optimizer=optimizer, loss=loss, batch=batch, started=started)
        self._agree_on_schedule(trainer)
        if metrics:
            self._publish(trainer, pl_module, metrics, on_step=True)
            self.monitor.schedule.leave()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.when == "train" or trainer.sanity_checking or not self.monitor.probe_ready:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metrics = self.monitor.check(trainer.global_step, pl_module, optimizer=optimizer)
        self._publish(trainer, pl_module, metrics, on_step=False)

    def _agree_on_schedule(self, trainer: Any) -> None:
        """Adaptive schedules are set from wall-clock times, which differ across ranks: take rank 0's.

        The schedule changes only at the same steps on every rank (the first measured step, checks), so
        this collective runs at the same step everywhere.
        """
        schedule = self.monitor.schedule
        if schedule.changed:
            schedule.changed = False
            if trainer.world_size > 1:
                schedule.next_step = int(trainer.strategy.broadcast(schedule.next_step, src=0))

    def _publish(self, trainer: Any, pl_module: Any, metrics: dict[str, float], *, on_step: bool) -> None:
        strategy = trainer.strategy
        if trainer.world_size > 1:
            names = sorted(metrics)
            values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=pl_module.device)
            values = strategy.reduce(values, reduce_op="mean")
            metrics = dict(zip(names, values.tolist()))
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=on_step, on_epoch=not on_step, logger=False, prog_bar=self.prog_bar,
                          sync_dist=False, batch_size=1)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        stop = self.monitor.should_stop
        if trainer.world_size > 1:
            stop = strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict["monitor"])
        self._last_step = int(state_dict["last_step"])


class SharpnessMonitor(_MonitorCallback):
    """Log ``sharpness/*`` metrics (lambda_max, eos_ratio, ...) during training, within a cost budget.

    Keywords are those of :class:`sharpguard.monitor.SharpnessMonitor` (``measures``, ``every_n_steps``,
    ``budget``, ``probe``, ``probe_size``, ``alerts``, ``on_alert``, ``history``, ``rho``,
    ``measure_kwargs`` ...) plus ``name`` (distinguishes two instances in checkpoints), ``when``
    (``"train"``: after optimizer steps on the schedule; ``"validation"``: at every validation end;
    ``"both"``) and ``prog_bar``. ``on_alert="stop"`` sets ``trainer.should_stop``.
    """

    _core = _CoreSharpnessMonitor


class RobustnessMonitor(_MonitorCallback):
    """Log ``robustness/*`` metrics (clean/FGSM/PGD accuracy, input-gradient norm) during training.

    Keywords are those of :class:`sharpguard.monitor.RobustnessMonitor` (``measures``, ``eps``,
    ``alpha``, ``steps``, ``every_n_steps``, ``budget``, ``probe`` ...) plus ``name``, ``when`` and
    ``prog_bar`` (see :class:`SharpnessMonitor`). ``robustness/pgd_acc`` can drive
    ``ModelCheckpoint(monitor="robustness/pgd_acc", mode="max")`` (keep the most robust weights) and
    ``EarlyStopping(monitor="robustness/pgd_acc", mode="max")`` (Rice et al., ICML 2020).
    With ``when="validation"`` the check also runs in ``trainer.validate()`` (under inference mode).
    """

    _core = _CoreRobustnessMonitor
