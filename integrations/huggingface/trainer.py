"""SharpGuardTrainer: the Trainer's own training_step at w, the step engine for the rest."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sharpguard._atomic import atomic_torch_save, load_tensors_only
from sharpguard.errors import CheckpointError, ConfigurationError, require

require("transformers", "hf")
require("accelerate", "hf")
from transformers import Trainer, TrainerCallback  # noqa: E402

from sharpguard.optim import SAMConfig, SAMEngine  # noqa: E402

from ..accelerate.sam import build_engine, check_distributed_type, clean_pass_context, finish_step  # noqa: E402
from .monitors import _checkpoint_folder, _MonitorCallback, fp16_ignored  # noqa: E402
from .monitors import logger  # noqa: E402  (transformers' library logger: set_verbosity and log_level reach it)


def _coerce_adversarial(value: Any) -> Callable[[nn.Module, Any], torch.Tensor] | None:
    """A method object ``method(model, batch) -> loss``, a name for ``make_method``, or a mapping
    ``{"method": name, **keywords}``."""
    if value is None:
        return None
    from sharpguard.adversarial import make_method

    if isinstance(value, str):
        return make_method(value)
    if isinstance(value, Mapping):
        kw = dict(value)
        name = kw.pop("method", None) or kw.pop("name", None)
        if not isinstance(name, str):
            raise ConfigurationError(
                "adversarial= as a mapping needs a 'method' key naming the method, "
                "e.g. {'method': 'freelb', 'steps': 3}."
            )
        return make_method(name, **kw)
    if callable(value):
        return value
    raise ConfigurationError(
        f"adversarial= must be a method name ('freelb', 'smart', 'fgm', ...), a mapping or a method object, "
        f"got {type(value).__name__}."
    )


class SharpGuardTrainerMixin:
    """Adds ``sam=`` and ``adversarial=`` to a ``transformers.Trainer`` subclass.

    ``class MyTrainer(SharpGuardTrainerMixin, MyExistingTrainer): ...`` -- put the mixin first.

    Args:
        sam: a mapping of SAM keywords (``{"rho": 0.05, "variant": "gsam", "alpha": 0.1}``; keys
            ``variant``, ``rho``, ``sync_perturbation``, ``nonfinite`` and the variant's own knobs;
            a missing ``rho`` is the variant's default), a variant name, or a :class:`SAMConfig`.
            ``None``: no SAM. Validated here, before the Trainer builds anything.
        sam_resume: when the checkpoint's SAM settings differ from ``sam=`` on resume: ``"error"``
            (default, names the settings), ``"checkpoint"`` (take the checkpoint's) or ``"current"``.
            Resume is all or nothing: a checkpoint folder whose ``sharpguard_sam.pt`` is missing, torn
            or holds anything but tensors and plain containers is refused naming the file before the
            Trainer loads anything; ``"current"`` continues with SAM's state started afresh, said once.
        adversarial: an embedding-space method of :mod:`sharpguard.adversarial` (``"freelb"``,
            ``"smart"``, ``"fgm"``, ``"embedding-pgd"``, ``"r3f"``), a mapping
            ``{"method": name, **keywords}``, or a method object ``method(model, batch) -> loss``.
            It replaces the training loss (evaluation keeps the model's plain loss).
    """

    def __init__(self, *args: Any, sam: SAMConfig | Mapping[str, Any] | str | None = None, adversarial: Any = None,
                 sam_resume: str = "error", **kwargs: Any):
        # Validate everything before the Trainer builds anything.
        from sharpguard._validation import one_of
        from sharpguard.optim.sam import RESUME_POLICIES

        self.sam_config = SAMConfig.coerce(sam) if sam is not None else None
        self.sam_resume = one_of("sam_resume", sam_resume, RESUME_POLICIES)
        self.adversarial_method = _coerce_adversarial(adversarial)
        self._sg_engine: SAMEngine | None = None
        self._sg_engine_optimizer: Any = None
        super().__init__(*args, **kwargs)
        self._sg_fp16_said = False
        if self.args.fp16 and not getattr(self.accelerator, "native_amp", True):
            # transformers accepts fp16=True on a CPU and then trains in fp32 with no scaler: say so, in the
            # Trainer's own channel (a warning shows at transformers' default verbosity)
            said = fp16_ignored(self.args, self.accelerator.device) or (
                "fp16=True cannot act on this device (no fp16 autocast and no GradScaler): training runs in fp32.")
            logger.warning(f"sharpguard: {said}")
            self._sg_fp16_said = True
        if self.sam_config is not None:
            check_distributed_type(self.accelerator)
        if self.adversarial_method is not None and getattr(self, "loss_is_scaled_for_ga", None) is None:
            # The methods return a per-batch mean: let the Trainer divide it for gradient accumulation.
            self.loss_is_scaled_for_ga = False
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, _MonitorCallback):
                callback.set_trainer(self)
        self._sg_resume_state: dict[str, Any] | None = None
        if self.sam_config is not None:
            super().add_callback(_SAMCheckpoint(self))

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, _MonitorCallback) and cb.trainer is None:
                cb.set_trainer(self)

    # -- SAM ---------------------------------------------------------------------------------------
    def _sharpguard_engine(self, model: nn.Module) -> SAMEngine | None:
        if self.sam_config is None:
            return None
        if self._sg_engine is None or self._sg_engine_optimizer is not self.optimizer:
            # Built on first use: the optimizer exists (and is prepared) only once training starts,
            # and a new train() call builds a new one.
            engine = build_engine(self.accelerator, self.optimizer, model, self.sam_config)
            # the Trainer's own convention for its run banner ("***** Running training *****")
            logger.info(f"sharpguard: SAM active -- {self.sam_config.describe()}.")
            if self._sg_resume_state is not None:
                engine.sam.load_sharpguard_state_dict(self._sg_resume_state, resume=self.sam_resume)
            self._sg_engine = engine
            self._sg_engine_optimizer = self.optimizer
        return self._sg_engine

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; on resume, the SAM variant's and the monitors' own state come back from the
        checkpoint folder too (wherever it is stored)."""
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # Trainer raises on None
            if (isinstance(resume_from_checkpoint, str) and self.sam_config is not None
                    and not self.args.save_only_model):
                # read and checked here, before the Trainer loads anything: all or nothing
                self._sg_resume_state = _SAMCheckpoint.read(resume_from_checkpoint, self.sam_resume)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._sg_resume_state = None
            if self._sg_engine is not None:
                logger.info(f"sharpguard: SAM spent -- {self._sg_engine.summary()}.")

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's own step at ``w``; on the sync micro-batch, also the SAM pass (module docs)."""
        engine = self._sharpguard_engine(model)
        if engine is None:
            return super().training_step(model, inputs, *args, **kwargs)
        engine.record(functools.partial(super().training_step, model, inputs, *args, **kwargs),
                      self.accelerator.unwrap_model(model))
        with clean_pass_context(self.accelerator, engine, model):
            loss = super().training_step(model, inputs, *args, **kwargs)
        if self.accelerator.sync_gradients:
            finish_step(self.accelerator, engine, model)
        return loss

    # -- adversarial training ----------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, **kwargs: Any):
        """The adversarial method's loss while training; the Trainer's own loss otherwise."""
        if self.adversarial_method is None or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        return self.adversarial_method(model, inputs)


class _SAMCheckpoint(TrainerCallback):
    """Writes the SAM variant's own state (step counter, LookSAM's ``g_v``, Friendly-SAM's EMA,
    knobs) into each checkpoint folder, beside the base optimizer the Trainer saves itself;
    :meth:`SharpGuardTrainerMixin.train` reads it back on resume (promise 3: complete checkpoints).
    """

    FILE = "sharpguard_sam.pt"

    def __init__(self, trainer: SharpGuardTrainerMixin):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        # the optimizer is not in a save_only_model checkpoint, so neither is the wrapper's state
        sam = getattr(self.trainer._sg_engine, "sam", None)
        if args.save_only_model or not hasattr(sam, "sharpguard_state_dict"):
            return control
        # on every rank: under FSDP the sharded variant gathers its buffers' shards (a collective)
        own = sam.sharpguard_state_dict()
        if args.should_save:
            folder = _checkpoint_folder(args, state)
            if os.path.isdir(folder):
                # atomic: a crash mid-save leaves no torn file beside a complete Trainer checkpoint
                atomic_torch_save(own, os.path.join(folder, self.FILE))
        return control

    @classmethod
    def read(cls, checkpoint: str, resume: str = "error") -> dict[str, Any] | None:
        """The SAM state saved in ``checkpoint`` (tensors only), or ``None`` to go on without it.

        A missing, torn or unsafe file is refused naming it, unless ``resume="current"``: then it is
        said once and SAM's own state (step counter, buffers) starts afresh.
        """
        path = os.path.join(checkpoint, cls.FILE)
        try:
            return load_tensors_only(
                path,
                what="the SAM variant's own state (step counter, knobs, buffers) that resuming this run needs",
                to_continue="Resume from a complete checkpoint folder, or pass sam_resume='current' to continue "
                "with SAM's state started afresh (step counter 0).",
            )
        except CheckpointError as exc:
            if resume != "current":
                raise
            warnings.warn(f"{exc} sam_resume='current': continuing with SAM's state started afresh.",
                          RuntimeWarning, stacklevel=3)
            return None


class SharpGuardTrainer(SharpGuardTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``sam=`` and ``adversarial=`` (see :class:`SharpGuardTrainerMixin`)."""


