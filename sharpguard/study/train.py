"""Train one (method, seed) of the study through sharpguard's own Lightning integration.

Every method is the same LightningModule (an MLP, SGD with momentum, cross entropy in ``training_step``);
what differs is what a user of sharpguard would change in their own Lightning code:

- ``sam`` / ``asam``: the :class:`~sharpguard.integrations.lightning.SharpnessAwareMinimization` callback;
- ``pgd-at`` / ``fast-at``: the :class:`~sharpguard.integrations.lightning.AdversarialTraining` callback
  with the method from :func:`sharpguard.adversarial.make_method` (it puts the adversarial inputs into the
  batch, so ``training_step`` is unchanged);
- ``trades``: a loss-changing method, so ``training_step`` returns
  :meth:`~sharpguard.integrations.lightning.AdversarialTrainingMixin.adversarial_loss` (what the docs advise
  for such methods: no discarded clean pass);
- ``weight-decay``: the optimizer's ``weight_decay``; ``dropout``: dropout layers in the model;
- ``spectral-norm``: :func:`sharpguard.adversarial.spectral_normalize` on the model;
- ``distillation``: the loss of :class:`sharpguard.adversarial.DefensiveDistillation`, first for a teacher
  at temperature T, then for the student on the teacher's soft labels (deployed at T = 1).

Every run has a :class:`~sharpguard.integrations.lightning.SharpnessMonitor` (lambda_max) and a
:class:`~sharpguard.integrations.lightning.RobustnessMonitor` (clean and PGD accuracy on held-out data)
attached, writing one JSON-lines history per run: the "over training" plots come from those files.
This module imports Lightning; the study imports it only when it trains.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._batches import default_loss_fn
from ..errors import require
from .config import StudyConfig
from .data import StudyData
from .models import make_mlp

require("pytorch_lightning", "lightning")

from sharpguard.integrations._lightning_namespace import pl  # noqa: E402
from sharpguard.integrations.lightning import (  # noqa: E402
    AdversarialTraining,
    AdversarialTrainingMixin,
    RobustnessMonitor,
    SharpnessAwareMinimization,
    SharpnessMonitor,
)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class StudyModule(AdversarialTrainingMixin, pl.LightningModule):
    """A classifier trained with SGD + momentum; ``loss_fn(model, batch)`` is cross entropy unless a method
    (distillation) replaces it, and ``adversarial_method`` (TRADES) replaces it through the mixin.
    ``forward`` maps inputs to logits, as the callbacks expect."""

    def __init__(self, model: nn.Module, *, lr: float, momentum: float, weight_decay: float = 0.0,
                 loss_fn: LossFn | None = None, adversarial_method: Any = None,
                 lr_milestones: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.lr_milestones = list(lr_milestones)  # epochs where the learning rate drops 10x (none by default)
        self.loss_fn = loss_fn or default_loss_fn
        self.adversarial_method = adversarial_method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.adversarial_method is not None:
            loss = self.adversarial_loss(batch)
        else:
            loss = self.loss_fn(self.model, batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=batch[0].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if not self.lr_milestones:
            return opt
        schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.lr_milestones, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


@dataclass
class TrainedRun:
    """A trained model (the plain ``nn.Module``, in eval mode) and what its training cost: ``seconds`` of
    training without the monitors' checks (a teacher's training included), and the monitors' time as a
    percentage of it."""

    model: nn.Module
    seconds: float
    steps: int
    monitor_overhead_pct: float | None


def describe_model(data: StudyData, config: StudyConfig) -> str:
    model = make_mlp(data.input_shape, data.n_classes, config.hidden)
    n = sum(p.numel() for p in model.parameters())
    dims = " -> ".join([str(math.prod(data.input_shape)), str(config.hidden), str(config.hidden), str(data.n_classes)])
    return (f"MLP {dims} (ReLU, {n} parameters), SGD lr={config.lr} momentum={config.momentum}, "
            f"batch {config.batch_size}")


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*(GPU available|TPU available|litlogger|LeafSpec).*")


def _loader(data: StudyData, config: StudyConfig, seed: int) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    generator = torch.Generator().manual_seed(seed)  # the shuffling order depends on the seed only
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator)


def _monitors(data: StudyData, config: StudyConfig, seed: int, total_steps: int, history: Path) -> list[Any]:
    every = max(1, total_steps // max(1, config.monitor_checks))
    n = config.monitor_probe_size
    train_probe = [(data.x_train[:n], data.y_train[:n])]
    held_out = [(data.x_test[:n], data.y_test[:n])]
    common = {"every_n_steps": every, "history": str(history), "alerts": None, "seed": seed}
    return [
        # loss_fn: the clean cross entropy the final measurement uses. Left unset, the monitor would take the
        # module's own training_step, which for TRADES is the adversarial loss with a random PGD start: a
        # random loss, whose Hessian-vector products the monitor (rightly) refuses.
        SharpnessMonitor(measures=("lambda_max",), probe=train_probe, loss_fn=default_loss_fn,
                         measure_kwargs={"lambda_max": {"tol": 1e-3, "max_iter": 20}}, **common),
        RobustnessMonitor(measures=("clean_acc", "pgd_acc"), probe=held_out, eps=config.eps,
                          alpha=config.train_attack_alpha, steps=config.train_attack_steps, **common),
    ]


def _fit(module: StudyModule, data: StudyData, config: StudyConfig, seed: int,
         callbacks: list[Any]) -> tuple[float, int]:
    _quiet_lightning()
    trainer = pl.Trainer(
        max_epochs=config.epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, _loader(data, config, seed))
    return time.perf_counter() - start, int(trainer.global_step)


def _monitor_seconds(callbacks: list[Any]) -> float:
    """Time the monitors spent measuring (their schedules time every check)."""
    return sum(cb.monitor.schedule.monitor_seconds for cb in callbacks if hasattr(cb, "monitor"))


def _times(factor: float, loss_fn: LossFn) -> LossFn:
    """``factor * loss_fn``. Distillation's loss at temperature T has logit gradients ``(softmax(z/T) - q) / T``;
    multiplying by T gives them the size of plain cross entropy's, so the same learning rate trains both
    (without it the runs stay far from convergence in the study's epochs)."""

    def scaled(model: nn.Module, batch: Any) -> torch.Tensor:
        return factor * loss_fn(model, batch)

    return scaled


def train_run(method: str, seed: int, data: StudyData, config: StudyConfig, history: Path) -> TrainedRun:
    """Train ``method`` with ``seed``; the monitors append to ``history``."""
    from ..adversarial import DefensiveDistillation, make_method, spectral_normalize

    pl.seed_everything(seed, verbose=False)
    model = make_mlp(data.input_shape, data.n_classes, config.hidden,
                     dropout=config.dropout if method == "dropout" else 0.0)
    if method == "spectral-norm":
        spectral_normalize(model)
    steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    callbacks: list[Any] = _monitors(data, config, seed, total_steps, history)
    optim = {"lr": config.lr, "momentum": config.momentum,
             "weight_decay": config.weight_decay if method == "weight-decay" else 0.0}
    loss_fn: LossFn | None = None
    adversarial_method: Any = None
    extra_seconds = 0.0
    attack = {"eps": config.eps, "seed": seed}
    if method == "sam":
        callbacks.append(SharpnessAwareMinimization(rho=config.rho))
    elif method == "asam":
        callbacks.append(SharpnessAwareMinimization(rho=config.asam_rho, variant="asam"))
    elif method == "pgd-at":
        callbacks.append(AdversarialTraining(make_method(
            "pgd-at", alpha=config.train_attack_alpha, steps=config.train_attack_steps, **attack)))
    elif method == "trades":
        adversarial_method = make_method(
            "trades", beta=config.trades_beta, alpha=config.train_attack_alpha, steps=config.train_attack_steps,
            **attack)
    elif method == "fast-at":
        callbacks.append(AdversarialTraining(make_method("fast-at", **attack)))
    elif method == "distillation":
        # Papernot et al. 2016: a teacher trained at temperature T, then the student on its soft labels.
        temperature = config.distillation_temperature
        teacher = make_mlp(data.input_shape, data.n_classes, config.hidden)
        teacher_loss = _times(temperature, DefensiveDistillation(temperature=temperature))
        extra_seconds, _ = _fit(StudyModule(teacher, loss_fn=teacher_loss, **optim), data, config, seed, [])
        loss_fn = _times(temperature, DefensiveDistillation(temperature=temperature, teacher=teacher.eval()))
    module = StudyModule(model, loss_fn=loss_fn, adversarial_method=adversarial_method, **optim)
    seconds, steps = _fit(module, data, config, seed, callbacks)
    monitoring = _monitor_seconds(callbacks)
    training = seconds - monitoring  # the method's own cost; the monitors' share is reported apart
    return TrainedRun(model=model.eval(), seconds=training + extra_seconds, steps=steps,
                      monitor_overhead_pct=100.0 * monitoring / training if training > 0 else None)


def train_model(data: StudyData, config: StudyConfig, seed: int, *, adversarial_method: Any = None,
                callbacks: Sequence[Any] = (), weight_decay: float = 0.0,
                lr_milestones: Sequence[int] = ()) -> TrainedRun:
    """Train the study's MLP with ``config``'s optimizer settings (``batch_size``, ``lr``, ``epochs``) through
    the same :class:`StudyModule` and Lightning ``Trainer`` as :func:`train_run`, without the monitors and
    with the caller's ``callbacks`` (a scenario's per-epoch measurements). ``adversarial_method`` (e.g.
    ``make_method("awp", base="pgd-at", ...)``) goes through :class:`AdversarialTrainingMixin`, as TRADES does;
    ``lr_milestones``: epochs where the learning rate drops 10x (piecewise decay, as in Rice et al. 2020)."""
    pl.seed_everything(seed, verbose=False)
    model = make_mlp(data.input_shape, data.n_classes, config.hidden)
    module = StudyModule(model, lr=config.lr, momentum=config.momentum, weight_decay=weight_decay,
                         adversarial_method=adversarial_method, lr_milestones=lr_milestones)
    seconds, steps = _fit(module, data, config, seed, list(callbacks))
    return TrainedRun(model=model.eval(), seconds=seconds, steps=steps, monitor_overhead_pct=None)


class EpochEnd(pl.Callback):
    """Calls ``fn(model, epoch)`` (epochs counted from 1) after every ``every``-th training epoch and the last;
    ``fn`` must be side-effect free (every sharpguard measurement is)."""

    def __init__(self, fn: Callable[[nn.Module, int], None], every: int = 1) -> None:
        super().__init__()
        self.fn, self.every = fn, max(1, int(every))
        self.seconds = 0.0

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        epoch = int(trainer.current_epoch) + 1
        if epoch % self.every == 0 or epoch == trainer.max_epochs:
            start = time.perf_counter()
            self.fn(pl_module.model, epoch)
            self.seconds += time.perf_counter() - start
