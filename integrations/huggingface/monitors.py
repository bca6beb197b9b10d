"""Monitor callbacks for any transformers.Trainer: a :class:`sharpguard.monitor.MonitorDriver` driven
from the Trainer's callback events, logging through ``Trainer.log``, with its state in transformers' own
callback-state mechanism (``ExportableState``: ``trainer_state.json``'s ``stateful_callbacks``)."""


from __future__ import annotations

import os
import time
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from sharpguard.errors import CheckpointError, ConfigurationError, require

require("transformers", "hf")
require("accelerate", "hf")
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402

from sharpguard.monitor.driver import MonitorDriver, torch_comm  # noqa: E402
from sharpguard.monitor.history import decode_state, encode_state  # noqa: E402
from sharpguard.optim import unwrap_optimizer as _unwrap_optimizer  # noqa: E402

from transformers.utils import logging as hf_logging  # noqa: E402

#: a child of transformers' library logger, so ``transformers.logging.set_verbosity_info()`` and the
#: Trainer's ``log_level`` / ``log_level_replica`` reach sharpguard's lines and transformers' own handler
#: prints them (a ``sharpguard.*`` logger is reached by neither)
logger = hf_logging.get_logger("transformers.sharpguard")


def fp16_ignored(args: Any, device: Any) -> str | None:
    """The warning for ``fp16=True`` on a device where transformers trains in fp32 (a CPU), else None."""
    if not getattr(args, "fp16", False) or device is None or torch.device(device).type == "cuda":
        return None
    return (f"fp16=True cannot act on this device ({torch.device(device).type}: no fp16 autocast and no GradScaler): "
            "training runs in fp32. Use bf16=True on a CPU, or train on a GPU for fp16.")


def _checkpoint_folder(args: Any, state: Any) -> str:
    """The folder ``Trainer._save_checkpoint`` wrote at this step (outside hyperparameter search)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


#: the monitor callbacks alive in this process, by state key. ``Trainer._load_callback_state`` (with
#: ``restore_callback_states_from_checkpoint=True``) rebuilds a callback as ``type(cb)(**args)``: our
#: ``args`` name the live instance, which is restored in place (its configuration is not JSON)
_LIVE: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


class _ComputeLoss:
    """``loss_fn(model, batch)`` = the Trainer's own ``compute_loss``; the batch is copied (compute_loss
    pops ``labels``) and random draws inside it are the same at every call of one check (a forked,
    seeded RNG), so the probe loss is a fixed function."""

    def __init__(self, trainer: Trainer, seed: int) -> None:
        self.trainer, self.seed = trainer, int(seed)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self.trainer.compute_loss(model, dict(batch) if isinstance(batch, Mapping) else batch)


class _MonitorCallback(TrainerCallback, ExportableState):
    """Runs a :mod:`sharpguard.monitor` monitor after optimizer steps and logs through the Trainer.

    Its state goes through transformers' own callback-state mechanism: :meth:`state` is written into
    ``trainer_state.json`` (``stateful_callbacks``) with every checkpoint and read back from the state
    the Trainer resumes from, whatever folder that is. Give two callbacks of one class distinct
    ``name=``s.
    """

    _monitor_cls_name = ""
    _uses_loss = False

    def __new__(cls, *args: Any, restore_into: str | None = None, **kwargs: Any) -> Any:
        if restore_into is None:
            return super().__new__(cls)
        live = _LIVE.get(restore_into)
        if live is None or type(live) is not cls:
            raise ConfigurationError(
                f"the checkpoint holds the state of {restore_into!r}, but no such callback was built in this process; "
                "pass the same monitor callbacks (with the same name=) to the Trainer you resume."
            )
        return live

    def __init__(
        self,
        monitor: Any = None,
        *,
        name: str | None = None,
        every_n_steps: int | None = None,
        probe: Any = None,
        probe_size: int | None = None,
        probe_batch_size: int | None = None,
        seed: int = 0,
        resume: str = "error",
        restore_into: str | None = None,
        **monitor_kwargs: Any,
    ):
        if restore_into is not None:
            return  # Trainer._load_callback_state re-using the live instance (see __new__)
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(f"name must be a string, got {name!r}.")
        from sharpguard._validation import one_of

        self.resume = one_of("resume", resume, ("error", "current"))
        self._own_loss = False
        if monitor is None:
            import sharpguard.monitor as sgm

            self._own_loss = self._uses_loss and monitor_kwargs.get("loss_fn") is None
            # a probe drawn from the dataset is drawn again, identically, on resume: no tensors in the JSON
            monitor_kwargs.setdefault("probe_state_max_bytes", 0 if probe is None else 1 << 20)
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
        self.driver = MonitorDriver(monitor)
        self.name = name
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.seed = seed
        self.trainer: Trainer | None = None
        _LIVE[self.state_key] = self

    @property
    def state_key(self) -> str:
        measures = ",".join(getattr(self.monitor, "measures", ()))
        return f"{type(self).__name__}[{self.name or measures}]"

    def set_trainer(self, trainer: Trainer) -> None:
        """Hold the trainer whose ``log`` the metrics go through (:class:`SharpGuardTrainer` calls it).

        With a plain ``transformers.Trainer`` the callback works without it (metrics reach
        ``state.log_history`` and the history file, and it says so once); calling this before
        ``train()`` also reaches every ``report_to`` integration and makes the probe loss the
        Trainer's own ``compute_loss``.
        """
        self.trainer = trainer

    # -- transformers' callback state (ExportableState) --------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"args": {"restore_into": self.state_key}, "attributes": {"sharpguard_state": self.sharpguard_state}}

    @property
    def sharpguard_state(self) -> dict[str, Any]:
        """The driver's state as plain JSON (the one codec: :func:`sharpguard.monitor.history.encode_state`)."""
        return encode_state(self.driver.state_dict())

    @sharpguard_state.setter
    def sharpguard_state(self, value: Any) -> None:
        try:  # JSON: numbers, strings, lists and dicts only; no code can come from it
            state = decode_state(value)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(
                f"{type(self).__name__}: the checkpoint's trainer_state.json holds a corrupt state for "
                f"{self.state_key} ({exc}); resume from another checkpoint, or pass resume='current' to the callback "
                "and remove this entry of stateful_callbacks to continue with the monitor's state started afresh."
            ) from exc
        self.load_state_dict(state)
        self._restored_at = getattr(self.monitor, "_last_step", None)
        self._restored = True

    def _restore_from(self, state: Any) -> None:
        """Load this callback's entry of ``state.stateful_callbacks`` (the state training resumes from)."""
        if getattr(self, "_restored", False):
            return
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        entries = stored if isinstance(stored, list) else [stored] if stored is not None else []
        mine = [e for e in entries
                if isinstance(e, Mapping) and (e.get("args") or {}).get("restore_into") == self.state_key]
        if not mine:
            # all or nothing: never restart the history and schedule silently under a resumed run
            message = (
                f"{type(self).__name__}: training resumes at step {state.global_step} but the checkpoint's "
                f"trainer_state.json holds no state for {self.state_key} (its history tail, schedule, alerts and "
                "probe); resume from a checkpoint saved with this callback, or pass resume='current' to the callback "
                "to continue with the monitor's state started afresh."
            )
            if self.resume != "current":
                raise CheckpointError(message)
            warnings.warn(f"{message} resume='current': the monitor's history and schedule restart.",
                          RuntimeWarning, stacklevel=2)
            return
        # transformers appends to a list entry at every save: the last one is the newest
        self.sharpguard_state = mine[-1]["attributes"]["sharpguard_state"]

    # -- events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.trainer is None and state.is_world_process_zero:
            # a plain Trainer with the callback in callbacks=[...]: what the callback reaches without it
            own_loss = (" the probe loss is model(**batch).loss, not the Trainer's compute_loss;" if self._own_loss
                        else "")
            logger.warning(
                f"sharpguard: {type(self).__name__} was not given its Trainer (a plain transformers.Trainer does not "
                "hand it to callbacks), so its metrics go to state.log_history, the console and the monitor's history "
                f"file, but not to the report_to integrations (TensorBoard, W&B, ...);{own_loss} use "
                "SharpGuardTrainer, or call callback.set_trainer(trainer) before train(), to reach them.")
        device = getattr(model, "device", None)
        if args.fp16 and state.is_world_process_zero and not getattr(self.trainer, "_sg_fp16_said", False):
            said = fp16_ignored(args, device)
            if said is not None:
                logger.warning(f"sharpguard: {said}")
        self.driver.set_comm(torch_comm(device), is_rank_zero=state.is_world_process_zero)
        if state.global_step > 0:
            self._restore_from(state)
        probe = getattr(self.monitor, "probe", None)
        if probe is None or not probe.ready:
            self._probe_from_dataset(args, train_dataloader)
        if self._own_loss and self.trainer is not None:
            # the probe loss is the Trainer's own loss (compute_loss, or a subclass's override); the
            # batch is copied because compute_loss pops "labels" from it
            self.monitor.loss_fn = _ComputeLoss(self.trainer, getattr(self.monitor, "seed", 0))
        if hasattr(self.monitor, "expect_steps") and state.max_steps and state.max_steps > 0:
            self.monitor.expect_steps(state.max_steps, f"state.max_steps={state.max_steps}")
        if state.is_world_process_zero and hasattr(self.monitor, "describe"):
            logger.info("sharpguard: %s", self.monitor.describe())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and hasattr(self.monitor, "summary"):
            # a warning when there is no steady state or it is over the budget: seen at the default verbosity
            warns = getattr(self.monitor, "summary_warns", lambda: False)()
            (logger.warning if warns else logger.info)("sharpguard: %s", self.monitor.summary())
            for note in getattr(self.monitor, "end_notes", lambda: [])():
                logger.warning("sharpguard: %s", note)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        started = time.perf_counter()  # this hook's whole time counts as the monitor's
        opt = _unwrap_optimizer(optimizer) if optimizer is not None else None
        metrics = self.driver.step(model, step=state.global_step, optimizer=opt, started=started)
        if metrics and state.is_world_process_zero and hasattr(self.monitor, "first_check_line"):
            line = self.monitor.first_check_line(metrics)
            if line is not None:
                logger.info("sharpguard: %s", line)
        if metrics:
            # Through Trainer.log: state.log_history and every report_to integration (they check
            # is_world_process_zero themselves, so every rank calls it).
            # CallbackHandler.on_log clears control.should_log, which would drop the Trainer's own
            # loss log due at this very step: keep the flag as DefaultFlowCallback set it.
            if self.trainer is not None:
                should_log = control.should_log
                self.trainer.log(metrics)
                control.should_log = self.trainer.control.should_log = should_log
            else:
                # what Trainer.log records, without the trainer: the row in state.log_history
                row = {**metrics, **({"epoch": state.epoch} if state.epoch is not None else {})}
                state.log_history.append({**row, "step": state.global_step})
            self.driver.leave()
        if self.driver.should_stop:
            control.should_training_stop = True
        return control

    # -- probe -------------------------------------------------------------------------------------
    def _probe_from_dataset(self, args, train_dataloader) -> None:
        """Draw the probe set from the training dataset by index, with the monitor's own generator.

        The DataLoader's dataset and collate function are used (so removed columns and padding are
        what training sees), but the DataLoader itself is never iterated: its sampler would draw
        from the global RNG and change the training order. A dataset smaller than the probe gives
        a probe of the whole dataset, and the monitor says so.
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
        size = self.probe_size
        if size is None:  # sized to the work: one check within ~50 training steps of this run
            size = self.monitor.auto_probe_size(args.per_device_train_batch_size)
        if len(dataset) < size and hasattr(self.monitor, "warn_once"):
            self.monitor.warn_once("probe-partial", f"the training set holds {len(dataset)} examples, fewer than "
                                   f"the probe's {size}; measuring on all {len(dataset)}.")
        collate = getattr(train_dataloader, "collate_fn", None) or self.trainer.data_collator
        self.monitor.set_probe(
            ProbeSet.from_dataset(
                dataset,
                size,
                seed=self.seed,
                batch_size=self.probe_batch_size or args.per_device_train_batch_size,
                collate_fn=collate,
            )
        )

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.driver.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """All-or-nothing: the state is checked completely before anything changes."""
        self.driver.load_state_dict(state)


class SharpnessMonitorCallback(_MonitorCallback):
    """Measure sharpness (top Hessian eigenvalue, trace, edge-of-stability ratio, ...) during training.

    Keywords go to :class:`sharpguard.monitor.SharpnessMonitor` (``measures=``, ``budget=``,
    ``alerts=``, ``loss_fn=``, ``history=``...), or pass a ready ``monitor=``. The default loss of a
    Hugging Face batch is ``model(**batch).loss``. Metrics (``sharpness/lambda_max``, ...) reach
    ``state.log_history`` and every ``report_to`` integration. ``resume``: ``"error"`` (default)
    refuses a resumed run whose checkpoint holds no state for this callback; ``"current"`` restarts
    the monitor's history and schedule there, said once.
    """

    _monitor_cls_name = "SharpnessMonitor"
    _uses_loss = True


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

    def __init__(self, monitor: Any = None, *, input_key: str = "pixel_values", label_key: str = "labels",
                 **kwargs: Any):
        if kwargs.get("restore_into") is None:
            for key_name, key in (("input_key", input_key), ("label_key", label_key)):
                if not isinstance(key, str):
                    raise ConfigurationError(f"{key_name} must name a key of the Trainer's batches, got {key!r}.")
            if monitor is None:  # the core monitor owns the key rule (sharpguard.monitor.RobustnessMonitor.pair)
                kwargs.update(input_key=input_key, label_key=label_key)
        super().__init__(monitor, **kwargs)
        if kwargs.get("restore_into") is not None:
            return  # the live instance, configured already
        self.input_key, self.label_key = input_key, label_key

    def _as_pairs(self, batch: Any) -> Any:
        if not isinstance(batch, Mapping):
            return batch
        pair = getattr(self.monitor, "pair", None)
        x, y = pair(batch) if callable(pair) else (batch[self.input_key], batch[self.label_key])
        attacks = set(self.monitor.measures) - {"clean_acc"}
        if attacks and not torch.is_floating_point(x):
            raise ConfigurationError(
                f"{self.input_key!r} holds integer token ids, which {sorted(attacks)} cannot perturb; "
                "use measures=('clean_acc',) for a text model."
            )
        return (x, y)

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        batches = self.monitor.probe.batches
        if any(isinstance(b, Mapping) for b in batches):
            self.monitor.set_probe([self._as_pairs(b) for b in batches])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        return super().on_step_end(args, state, control, model=_KeywordInputModel(model, self.input_key), **kwargs)
