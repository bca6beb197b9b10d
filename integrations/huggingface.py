"""Hugging Face Trainer integration: SAM and embedding-space adversarial training, and monitors.

::

    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    trainer = SharpGuardTrainer(
        model=model, args=args, train_dataset=train,
        sam={"rho": 0.05, "variant": "asam"},            # any variant of sharpguard.optim.make_sam
        adversarial="freelb",                            # or make_method("smart", ...); both together allowed
        callbacks=[SharpnessMonitorCallback(every_n_steps=200)],
    )

Why a Trainer subclass for SAM: the Trainer calls ``optimizer.step()`` with no closure after
clipping, and no callback sees the batch or the loss, so the only place that can run a second
forward/backward is ``training_step``. :class:`SharpGuardTrainerMixin` overrides just
``training_step`` (calling ``super()`` with ``*args, **kwargs`` passed through, so the
``num_items_in_batch`` argument and later signature changes survive) and ``compute_loss`` (for
``adversarial=`` only). Per optimizer step:

1. each micro-batch runs the Trainer's own ``training_step`` at ``w`` (loss, GA scaling,
   ``accelerator.backward``) and is kept;
2. on the micro-batch where ``accelerator.sync_gradients`` is true, that clean backward runs under
   ``no_sync`` (per-worker perturbation, as in the SAM paper), the SAM variant moves the weights to
   ``w + e``, and every kept micro-batch is replayed through the Trainer's ``training_step`` at
   ``w + e`` (``no_sync`` on all but the last); the weights are restored by copy.

The Trainer then clips (the final, SAM gradient), steps the base optimizer, runs the scheduler and
zeroes the gradients as usual. The logged ``loss`` is the loss at ``w``. See
:mod:`sharpguard.integrations.accelerate` for fp16, FSDP and DeepSpeed (refused).

The monitor callbacks are plain ``TrainerCallback``\\ s that work with any Trainer. They hold the
trainer (``set_trainer``; :class:`SharpGuardTrainer` calls it, a plain ``Trainer`` is found when
training begins) so their metrics go through ``Trainer.log``: into ``state.log_history`` and every
``report_to`` integration. Their probe set is drawn from the training dataset by index with a
private generator (the DataLoader is never iterated), every measurement is side-effect free (a
monitored run trains to bitwise the same weights), and their state is written into each checkpoint
folder and read back on resume.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sharpguard.errors import ConfigurationError, require

require("transformers", "hf")
require("accelerate", "hf")
from transformers import Trainer, TrainerCallback  # noqa: E402

from .accelerate import SAMConfig, _build_sam, _PerturbedReplay, _unwrap_optimizer, check_distributed_type  # noqa: E402

__all__ = [
    "SAMConfig",
    "SharpGuardTrainer",
    "SharpGuardTrainerMixin",
    "SharpnessMonitorCallback",
    "RobustnessMonitorCallback",
]


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
                "adversarial= as a mapping needs a 'method' key naming the method, e.g. {'method': 'freelb', 'steps': 3}."
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
            ``variant``, ``rho``, ``sync_perturbation``, and the variant's own knobs) or a
            :class:`SAMConfig`. ``None``: no SAM.
        adversarial: an embedding-space method of :mod:`sharpguard.adversarial` (``"freelb"``,
            ``"smart"``, ``"fgm"``, ``"embedding-pgd"``, ``"r3f"``), a mapping
            ``{"method": name, **keywords}``, or a method object ``method(model, batch) -> loss``.
            It replaces the training loss (evaluation keeps the model's plain loss).
    """

    def __init__(self, *args: Any, sam: SAMConfig | Mapping[str, Any] | None = None, adversarial: Any = None, **kwargs: Any):
        # Validate everything before the Trainer builds anything.
        self.sam_config = SAMConfig.coerce(sam) if sam is not None else None
        self.adversarial_method = _coerce_adversarial(adversarial)
        self._sg_engine: _PerturbedReplay | None = None
        self._sg_engine_optimizer: Any = None
        self._sg_window: list[tuple[Any, tuple, dict]] = []
        super().__init__(*args, **kwargs)
        if self.sam_config is not None:
            check_distributed_type(self.accelerator)
        if self.adversarial_method is not None and getattr(self, "loss_is_scaled_for_ga", None) is None:
            # The methods return a per-batch mean: let the Trainer divide it for gradient accumulation.
            self.loss_is_scaled_for_ga = False
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, _MonitorCallback):
                callback.set_trainer(self)
        self._sg_resume_from: str | None = None
        if self.sam_config is not None:
            super().add_callback(_SAMCheckpoint(self))

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, _MonitorCallback) and cb.trainer is None:
                cb.set_trainer(self)

    # -- SAM ---------------------------------------------------------------------------------------
    def _sharpguard_engine(self, model: nn.Module) -> _PerturbedReplay | None:
        if self.sam_config is None:
            return None
        if self._sg_engine is None or self._sg_engine_optimizer is not self.optimizer:
            # Built on first use: the optimizer exists (and is prepared) only once training starts,
            # and a new train() call builds a new one.
            base = _unwrap_optimizer(self.optimizer)
            sam = _build_sam(self.sam_config, base, self.accelerator.unwrap_model(model), self.accelerator)
            if self._sg_resume_from is not None:
                _SAMCheckpoint.load(sam, self._sg_resume_from)
            self._sg_engine = _PerturbedReplay(self.accelerator, sam, self.sam_config)
            self._sg_engine_optimizer = self.optimizer
            self._sg_window = []
        return self._sg_engine

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; on resume, the SAM variant's and the monitors' own state come back from the
        checkpoint folder too (wherever it is stored)."""
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # Trainer raises on None
            self._sg_resume_from = resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._sg_resume_from = None

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's own step at ``w``; on the sync micro-batch, also the SAM pass (module docs)."""
        engine = self._sharpguard_engine(model)
        if engine is None:
            return super().training_step(model, inputs, *args, **kwargs)
        engine.begin_window()
        self._sg_window.append((inputs, args, kwargs))
        with engine.clean_context(model):
            loss = super().training_step(model, inputs, *args, **kwargs)
        if self.accelerator.sync_gradients:
            window, self._sg_window = self._sg_window, []
            step = super().training_step  # zero-argument super() does not work inside the comprehension
            engine.finish(model, [functools.partial(step, model, x, *a, **kw) for x, a, kw in window])
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
        if args.should_save and not args.save_only_model and hasattr(sam, "sharpguard_state_dict"):
            folder = _checkpoint_folder(args, state)
            if os.path.isdir(folder):
                torch.save(sam.sharpguard_state_dict(), os.path.join(folder, self.FILE))
        return control

    @classmethod
    def load(cls, sam: Any, checkpoint: str) -> None:
        path = os.path.join(checkpoint, cls.FILE)
        if hasattr(sam, "load_sharpguard_state_dict") and os.path.isfile(path):
            sam.load_sharpguard_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class SharpGuardTrainer(SharpGuardTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``sam=`` and ``adversarial=`` (see :class:`SharpGuardTrainerMixin`)."""


# --------------------------------------------------------------------------------------------------
# monitors
# --------------------------------------------------------------------------------------------------
_STATE_FILE = "sharpguard_{name}.json"


def _checkpoint_folder(args: Any, state: Any) -> str:
    """The folder ``Trainer._save_checkpoint`` wrote at this step (outside hyperparameter search)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _to_json(value: Any) -> Any:
    """Plain containers with tensors written as ``{"__tensor__": values, "dtype": ..., "shape": ...}``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {"__tensor__": t.reshape(-1).tolist(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if isinstance(value, Mapping):
        return {"__mapping__": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return {"__float__": repr(value)}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"])
            return torch.tensor(value["__tensor__"], dtype=dtype).reshape(value["shape"])
        if "__mapping__" in value:
            return {_from_json(k): _from_json(v) for k, v in value["__mapping__"]}
        if "__tuple__" in value:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if "__float__" in value:
            return float(value["__float__"])
    return value


def _find_trainer(callback: TrainerCallback) -> Trainer | None:
    """The Trainer whose callback handler holds ``callback``, found on the calling stack.

    Callbacks are not given the trainer; events are dispatched from a Trainer method, so one of
    the calling frames has it as ``self``.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer) and callback in obj.callback_handler.callbacks:
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


class _MonitorCallback(TrainerCallback):
    """Runs a :mod:`sharpguard.monitor` monitor after optimizer steps and logs through the Trainer."""

    _monitor_cls_name = ""
    _state_name = ""

    def __init__(
        self,
        monitor: Any = None,
        *,
        every_n_steps: int | None = None,
        probe: Any = None,
        probe_size: int = 64,
        probe_batch_size: int | None = None,
        seed: int = 0,
        **monitor_kwargs: Any,
    ):
        if monitor is None:
            import sharpguard.monitor as sgm

            monitor = getattr(sgm, self._monitor_cls_name)(
                every_n_steps=every_n_steps,
                probe=probe,
                probe_size=probe_size,
                probe_batch_size=probe_batch_size,
                seed=seed,
                **monitor_kwargs,
            )
        elif every_n_steps is not None or monitor_kwargs or probe is not None:
            raise ConfigurationError(
                "pass either a ready monitor= or the monitor's keywords (every_n_steps=, probe=, ...), not both."
            )
        self.monitor = monitor
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.seed = seed
        self.trainer: Trainer | None = None

    def set_trainer(self, trainer: Trainer) -> None:
        """Hold the trainer whose ``log`` the metrics go through (called by :class:`SharpGuardTrainer`)."""
        self.trainer = trainer

    # -- events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.trainer is None:
            self.trainer = _find_trainer(self)
            if self.trainer is None:
                raise ConfigurationError(
                    f"{type(self).__name__} could not find its Trainer; call callback.set_trainer(trainer) before train()."
                )
        history = getattr(self.monitor, "history", None)
        if history is not None and hasattr(history, "enabled"):
            history.enabled = history.enabled and state.is_world_process_zero
        if state.global_step > 0:
            self._load_from_checkpoint(args, state)
        probe = getattr(self.monitor, "probe", None)
        if probe is None or not probe.ready:
            self._probe_from_dataset(args, train_dataloader)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        started = time.perf_counter()  # this hook's whole time counts as the monitor's
        opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
        metrics = self.monitor.on_step_end(state.global_step, model, optimizer=opt, started=started)
        if metrics:
            self._agree_on_schedule()
            # Through Trainer.log: state.log_history and every report_to integration (they check
            # is_world_process_zero themselves, so every rank calls it).
            # CallbackHandler.on_log clears control.should_log, which would drop the Trainer's own
            # loss log due at this very step: keep the flag as DefaultFlowCallback set it.
            should_log = control.should_log
            self.trainer.log({k: float(v) for k, v in metrics.items()})
            control.should_log = self.trainer.control.should_log = should_log
            self.monitor.schedule.leave()
        if getattr(self.monitor, "should_stop", False):
            control.should_training_stop = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = _checkpoint_folder(args, state)
            if os.path.isdir(folder):
                self.save_state(os.path.join(folder, self.state_file))
        return control

    # -- probe -------------------------------------------------------------------------------------
    def _probe_from_dataset(self, args, train_dataloader) -> None:
        """Draw the probe set from the training dataset by index, with the monitor's own generator.

        The DataLoader's dataset and collate function are used (so removed columns and padding are
        what training sees), but the DataLoader itself is never iterated: its sampler would draw
        from the global RNG and change the training order.
        """
        from sharpguard.monitor import ProbeSet

        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None and self.trainer is not None:
            dataset = self.trainer.train_dataset
        if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise ConfigurationError(
                f"{type(self).__name__} needs a map-style training dataset to draw its probe set from; "
                "pass probe=[batches] instead."
            )
        collate = getattr(train_dataloader, "collate_fn", None) or self.trainer.data_collator
        self.monitor.set_probe(
            ProbeSet.from_dataset(
                dataset,
                self.probe_size,
                seed=self.seed,
                batch_size=self.probe_batch_size or args.per_device_train_batch_size,
                collate_fn=collate,
            )
        )

    def _agree_on_schedule(self) -> None:
        """Adaptive schedules depend on each rank's timings: take rank 0's next step everywhere."""
        schedule = getattr(self.monitor, "schedule", None)
        accelerator = self.trainer.accelerator
        if schedule is None or not getattr(schedule, "adaptive", False) or accelerator.num_processes < 2:
            return
        from accelerate.utils import broadcast

        next_step = torch.tensor([int(schedule.next_step)], device=accelerator.device)
        schedule.next_step = int(broadcast(next_step, from_process=0).item())

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def state_file(self) -> str:
        return _STATE_FILE.format(name=self._state_name)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.monitor.load_state_dict(state["monitor"])

    def save_state(self, path: str) -> None:
        """Write the monitor's state as JSON (tensors as lists with their dtype and shape)."""
        with open(path, "w") as f:
            json.dump(_to_json(self.state_dict()), f)

    def load_state(self, path: str) -> None:
        with open(path) as f:
            self.load_state_dict(_from_json(json.load(f)))
        self._state_loaded = True

    def _load_from_checkpoint(self, args, state) -> None:
        """Reload the monitor from the folder training resumes from.

        Callbacks are not told that folder. :class:`SharpGuardTrainerMixin` records what was passed to
        ``train(resume_from_checkpoint=...)``; with a plain ``Trainer`` the candidates are
        ``args.resume_from_checkpoint`` (the field the example scripts pass on) and
        ``output_dir/checkpoint-<global_step>``. If none holds this monitor's state, warn: the history
        would silently restart.
        """
        candidates = [getattr(self.trainer, "_sg_resume_from", None), getattr(args, "resume_from_checkpoint", None),
                      _checkpoint_folder(args, state)]
        for folder in candidates:
            if isinstance(folder, str) and os.path.isfile(os.path.join(folder, self.state_file)):
                self.load_state(os.path.join(folder, self.state_file))
                return
        if getattr(self, "_state_loaded", False):
            return  # the user called load_state(path) before train()
        warnings.warn(
            f"{type(self).__name__}: training resumes at step {state.global_step} but no {self.state_file} was found in "
            f"{[c for c in candidates if isinstance(c, str)]}; the monitor's history and schedule restart. With a plain "
            "transformers.Trainer resuming from a folder outside output_dir, use SharpGuardTrainer (or "
            "SharpGuardTrainerMixin), set args.resume_from_checkpoint, or call callback.load_state(path) before train().",
            RuntimeWarning,
            stacklevel=2,
        )


class SharpnessMonitorCallback(_MonitorCallback):
    """Measure sharpness (top Hessian eigenvalue, trace, edge-of-stability ratio, ...) during training.

    Keywords go to :class:`sharpguard.monitor.SharpnessMonitor` (``measures=``, ``budget=``,
    ``alerts=``, ``loss_fn=``, ``history=``...), or pass a ready ``monitor=``. The default loss of a
    Hugging Face batch is ``model(**batch).loss``. Metrics (``sharpness/lambda_max``, ...) reach
    ``state.log_history`` and every ``report_to`` integration.
    """

    _monitor_cls_name = "SharpnessMonitor"
    _state_name = "sharpness_monitor"


class _KeywordInputModel(nn.Module):
    """``model(x)`` -> logits of ``model(**{input_key: x})``: lets input-space attacks (which call
    ``model(x)``) run on a Hugging Face model that takes keyword inputs."""

    def __init__(self, model: nn.Module, input_key: str):
        super().__init__()
        self.model = model
        self.input_key = input_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sharpguard._batches import logits_of

        return logits_of(self.model(**{self.input_key: x}))


class RobustnessMonitorCallback(_MonitorCallback):
    """Measure robustness (clean/FGSM/PGD accuracy, input-gradient norm) during training.

    Keywords go to :class:`sharpguard.monitor.RobustnessMonitor` (``measures=``, ``eps=``,
    ``steps=``, ``bounds=``...); see :class:`SharpnessMonitorCallback`. Hugging Face batches are
    mappings: ``input_key`` (default ``"pixel_values"``) and ``label_key`` (``"labels"``) name the
    tensors attacked and predicted, and the model is called as ``model(**{input_key: x})``. Token ids
    cannot be attacked in input space: for a text model only ``measures=("clean_acc",)`` applies
    (use ``adversarial=`` embedding-space training for text robustness).
    """

    _monitor_cls_name = "RobustnessMonitor"
    _state_name = "robustness_monitor"

    def __init__(self, monitor: Any = None, *, input_key: str = "pixel_values", label_key: str = "labels", **kwargs: Any):
        super().__init__(monitor, **kwargs)
        self.input_key, self.label_key = input_key, label_key

    def _as_pairs(self, batch: Any) -> Any:
        if not isinstance(batch, Mapping):
            return batch
        missing = [k for k in (self.input_key, self.label_key) if k not in batch]
        if missing:
            raise ConfigurationError(
                f"the probe batches have no {missing} key(s) (keys: {sorted(batch)}); "
                "set input_key=/label_key= on RobustnessMonitorCallback."
            )
        x = batch[self.input_key]
        attacks = set(self.monitor.measures) - {"clean_acc"}
        if attacks and not torch.is_floating_point(x):
            raise ConfigurationError(
                f"{self.input_key!r} holds integer token ids, which {sorted(attacks)} cannot perturb; "
                "use measures=('clean_acc',) for a text model."
            )
        return (x, batch[self.label_key])

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        batches = self.monitor.probe.batches
        if any(isinstance(b, Mapping) for b in batches):
            self.monitor.set_probe([self._as_pairs(b) for b in batches])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        return super().on_step_end(args, state, control, model=_KeywordInputModel(model, self.input_key), **kwargs)
