"""Monitor callbacks: a :class:`sharpguard.monitor.MonitorDriver` driven from Lightning's hooks.

The driver owns step counting, timing, the budget, rank-0 history, the schedule broadcast, the
averaging across ranks and the checkpoint state; this module only translates Lightning's hooks, its
strategy's collectives and its loggers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from sharpguard._validation import one_of
from sharpguard.errors import ConfigurationError
from sharpguard.monitor import Monitor
from sharpguard.monitor import RobustnessMonitor as _CoreRobustnessMonitor
from sharpguard.monitor import SharpnessMonitor as _CoreSharpnessMonitor
from sharpguard.monitor.driver import MonitorDriver

from .._lightning_namespace import NAMESPACE
from ._hooks import Callback, _loss_of, _step_args, is_resuming_fit, refuse_missing_callback_state
from sharpguard import _validation as rules


class _StrategyComm:
    """The driver's collectives over a Lightning strategy (DDP, FSDP, ... as Lightning runs them)."""

    @rules.checked()
    def __init__(self, trainer: Any, device: torch.device) -> None:
        self.strategy = trainer.strategy
        self.world_size = int(trainer.world_size)
        self.device = device

    def broadcast_int(self, value: int) -> int:
        return int(self.strategy.broadcast(int(value), src=0))

    def mean_floats(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.strategy.reduce(t, reduce_op="mean").tolist()

    def any_true(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(bool(flag), all=False))


def _rank_zero_info(message: str) -> None:
    from importlib import import_module

    import_module(f"{NAMESPACE}.utilities").rank_zero_info(message)


def _rank_zero_warn(message: str) -> None:
    from importlib import import_module

    import_module(f"{NAMESPACE}.utilities").rank_zero_warn(message)


@contextlib.contextmanager
def _guarded_training_step(pl_module: Any) -> Iterator[None]:
    """Run the module's own ``training_step`` as a probe loss without side effects on the module.

    ``self.log`` / ``self.log_dict`` are silenced, and the module's own attributes (tensors and
    containers it rebinds or fills in ``training_step``, e.g. a carried hidden state) are restored
    afterwards. Parameters, buffers, modes and RNG are guarded by the monitor itself.
    """
    saved: dict[str, Any] = {}
    before = set(pl_module.__dict__)
    for key, value in pl_module.__dict__.items():
        if key in ("_parameters", "_buffers", "_modules") or key.startswith("_forward") or key.startswith("_backward"):
            continue
        if isinstance(value, Tensor):
            saved[key] = (value, value.detach().clone())
        elif isinstance(value, (list, dict, set)):
            saved[key] = (value, type(value)(value) if not isinstance(value, dict) else dict(value))
        elif isinstance(value, tuple) or value is None or isinstance(value, (int, float, bool, str)):
            saved[key] = (value, None)
    had_log = "log" in pl_module.__dict__, "log_dict" in pl_module.__dict__
    pl_module.log = lambda *a, **k: None
    pl_module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        for name, had in zip(("log", "log_dict"), had_log):
            if not had:
                pl_module.__dict__.pop(name, None)
        for key in [k for k in pl_module.__dict__ if k not in before]:
            del pl_module.__dict__[key]  # created by the probe's training_step
        for key, (obj, copy) in saved.items():
            pl_module.__dict__[key] = obj
            if isinstance(obj, Tensor) and copy is not None and not torch.equal(obj.detach(), copy):
                with torch.no_grad():
                    obj.copy_(copy)
            elif isinstance(obj, (list, set)):
                obj.clear()
                obj.update(copy) if isinstance(obj, set) else obj.extend(copy)
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(copy)


class _TrainingStepLoss:
    """``loss_fn(model, batch)`` = the module's own ``training_step`` loss, run guarded."""

    @rules.checked()
    def __init__(self, pl_module: Any, seed: int = 0) -> None:
        self.pl_module = pl_module
        self.seed = int(seed)

    def __call__(self, model: Any, batch: Any) -> Tensor:
        module = self.pl_module
        # a training_step that draws random numbers (an adversarial loss's random start, noise) gives
        # the same draws at every call of one check, so the probe loss is a fixed function the HVPs can
        # measure; fork_rng restores the global RNG afterwards
        devices = [module.device] if getattr(module, "device", torch.device("cpu")).type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _guarded_training_step(module):
            torch.manual_seed(self.seed)
            out = module.training_step(*_step_args(module, batch, 0))
        loss = _loss_of(out)
        if loss is None:
            raise ConfigurationError(
                f"{type(module).__name__}.training_step returned None for a probe batch, so the monitor has no loss; "
                "pass loss_fn=... to the monitor callback."
            )
        return loss


class _MonitorCallback(Callback):
    """Runs a :class:`sharpguard.monitor.Monitor` at optimizer-step ends and/or at validation end.

    Metrics go to every logger the Trainer has (``logger.log_metrics`` at the step Lightning uses
    for its own rows of the same batch, independent of ``log_every_n_steps``: checks are sparse)
    and into ``trainer.callback_metrics`` through ``pl_module.log(..., logger=False)``, where
    ``ModelCheckpoint(monitor=...)``, ``EarlyStopping`` and the progress bar find them. Under DDP
    every rank measures, the metrics are averaged across ranks and a "stop" alert stops all ranks.
    """

    _core: type[Monitor] = Monitor
    _uses_loss = False

    @rules.checked()
    def __init__(self, *, name: str | None = None, when: str = "train", prog_bar: bool = False, resume: str = "error",
                 **monitor_kwargs: Any) -> None:
        super().__init__()
        one_of("when", when, ("train", "validation", "both"))
        self.resume = one_of("resume", resume, ("error", "current"))
        self._own_loss = self._uses_loss and monitor_kwargs.get("loss_fn") is None
        self.monitor = self._core(**monitor_kwargs)
        self.driver = MonitorDriver(self.monitor)
        self.name = name
        self.when = when
        self.prog_bar = prog_bar

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, measures=",".join(self.monitor.measures))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.driver.set_comm(_StrategyComm(trainer, pl_module.device), is_rank_zero=trainer.is_global_zero)
        if self._own_loss and pl_module.automatic_optimization:
            # the probe loss is the module's own loss, whatever its batch and output look like
            self.monitor.loss_fn = _TrainingStepLoss(pl_module, self.monitor.seed)
        elif self._own_loss:
            # a manual-optimization training_step steps optimizers itself: it cannot serve as a loss
            self.monitor.warn_once(
                "manual-optimization", "the module uses manual optimization, so its training_step cannot be the probe "
                "loss; measuring the default loss (cross entropy of model(inputs), or model(**batch).loss). Pass "
                "loss_fn=lambda model, batch: ... to measure your loss.")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.when != "train":
            self.monitor.checks_at = "validation ends" if self.when == "validation" else None
        if self.when != "validation" and self.monitor.schedule.every_n_steps is not None:
            # the run's length, for the warning when every_n_steps exceeds it (only then asked for:
            # estimated_stepping_batches sets up the train dataloader early, as configure_optimizers may)
            max_steps = getattr(trainer, "max_steps", -1)
            if max_steps is not None and max_steps > 0:
                total, source = max_steps, f"max_steps={max_steps}"
            else:
                try:
                    total, source = trainer.estimated_stepping_batches, "trainer.estimated_stepping_batches"
                except Exception:  # a length Lightning cannot estimate: nothing to warn about
                    total, source = None, ""
            self.monitor.expect_steps(total, source)
        _rank_zero_info(f"sharpguard: {self.monitor.describe()}")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        _rank_zero_info(f"sharpguard: {self.monitor.summary()}")
        for note in self.monitor.end_notes():
            _rank_zero_warn(f"sharpguard: {note}")

    # -- probe capture from batches Lightning already drew (training batches: in on_step_end) -------
    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.when != "train" and not self.monitor.probe_ready and not trainer.sanity_checking:
            self.monitor.capture(batch)

    # -- checks -------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        started = time.perf_counter()  # this hook's whole time counts as the monitor's (honest cost)
        loss = _loss_of(outputs) if isinstance(outputs, (Tensor, Mapping)) else None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metrics = self.driver.step(pl_module, step=trainer.global_step, optimizer=optimizer, loss=loss, batch=batch,
                                   started=started, measure=self.when != "validation")
        if metrics:
            self._publish(trainer, pl_module, metrics, on_step=True)
            self.driver.leave()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # a training set smaller than the probe: measure with what one epoch gave, and say so
        if self.when != "validation" and not self.monitor.probe_ready:
            self.monitor.freeze_partial_probe("one epoch of training batches")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.when == "train" or trainer.sanity_checking:
            return
        if not self.monitor.probe_ready and not self.monitor.freeze_partial_probe("the validation set"):
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        metrics = self.driver.check(trainer.global_step, pl_module, optimizer=optimizer)
        self._publish(trainer, pl_module, metrics, on_step=False)

    def _publish(self, trainer: Any, pl_module: Any, metrics: dict[str, float], *, on_step: bool) -> None:
        line = self.monitor.first_check_line(metrics) if metrics else None
        if line is not None:  # the measurement works, at this cost: said once, as the HF and Accelerate front ends do
            _rank_zero_info(f"sharpguard: {line}")
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=on_step, on_epoch=not on_step, logger=False, prog_bar=self.prog_bar,
                          sync_dist=False, batch_size=1)
        # Lightning writes its own rows of this batch at fit_loop.epoch_loop._batches_that_stepped,
        # which is incremented after on_train_batch_end: use the same step so rows line up
        step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self.driver.should_stop:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Resume is all or nothing: a checkpoint without this monitor's state is refused (Lightning
        itself skips a callback whose entry is absent or empty), unless ``resume="current"``."""
        if is_resuming_fit(trainer) and not (checkpoint.get("callbacks") or {}).get(self.state_key):
            refuse_missing_callback_state(type(self).__name__, self.state_key, self.resume,
                                          "the monitor's history tail, schedule, alerts and probe",
                                          getattr(trainer, "ckpt_path", None))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """All or nothing: checked completely before anything changes."""
        self.driver.load_state_dict(state_dict)


class SharpnessMonitor(_MonitorCallback):
    """Log ``sharpness/*`` metrics (lambda_max, eos_ratio, ...) during training, within a cost budget.

    Keywords are those of :class:`sharpguard.monitor.SharpnessMonitor` (``measures``, ``every_n_steps``,
    ``budget``, ``probe``, ``probe_size``, ``alerts``, ``on_alert``, ``history``, ``rho``,
    ``measure_kwargs`` ...) plus ``name`` (distinguishes two instances in checkpoints), ``resume``
    (``"error"``, default: a checkpoint without this monitor's state is refused; ``"current"``: the
    monitor's state starts afresh, said once), ``when``
    (``"train"``: after optimizer steps on the schedule; ``"validation"``: at every validation end;
    ``"both"``) and ``prog_bar``. ``on_alert="stop"`` sets ``trainer.should_stop``. Without
    ``loss_fn=`` the probe loss is the module's own ``training_step`` (run with ``self.log`` silenced
    and the module's attributes restored), so any batch structure works.
    """

    _core = _CoreSharpnessMonitor
    _uses_loss = True


class RobustnessMonitor(_MonitorCallback):
    """Log ``robustness/*`` metrics (clean/FGSM/PGD accuracy, input-gradient norm) during training.

    Keywords are those of :class:`sharpguard.monitor.RobustnessMonitor` (``measures``, ``eps``,
    ``alpha``, ``steps``, ``input_key``, ``label_key``, ``every_n_steps``, ``budget``, ``probe`` ...)
    plus ``name``, ``when`` and ``prog_bar`` (see :class:`SharpnessMonitor`). ``robustness/pgd_acc``
    can drive ``ModelCheckpoint(monitor="robustness/pgd_acc", mode="max")`` (keep the most robust
    weights) and ``EarlyStopping(monitor="robustness/pgd_acc", mode="max")`` (Rice et al., ICML 2020).
    With ``when="validation"`` the check also runs in ``trainer.validate()`` (under inference mode).
    """

    _core = _CoreRobustnessMonitor
