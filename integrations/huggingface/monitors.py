"""Monitor callbacks for any transformers.Trainer."""


from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sharpguard.errors import ConfigurationError, require

require("transformers", "hf")
require("accelerate", "hf")
from transformers import Trainer, TrainerCallback  # noqa: E402

from sharpguard.optim import unwrap_optimizer as _unwrap_optimizer  # noqa: E402


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
