"""SAM in an Accelerate loop: the engine of :mod:`sharpguard.optim.engine`, driven by Accelerate's own calls.

This module only says how Accelerate runs one micro-batch (``loss_fn`` + ``accelerator.backward``),
how it suspends gradient sync (``accelerator.no_sync``) and whether the gradients are shards (FSDP).
The algorithm, its defaults and its fault policy live in :mod:`sharpguard.optim`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from sharpguard._batches import LossFn, default_loss_fn
from sharpguard.errors import ConfigurationError, require
from sharpguard.optim import SAMConfig, SAMEngine, unwrap_optimizer
from sharpguard.optim.sharded import sharded_global_norm

require("accelerate", "accelerate")
from accelerate.utils import DistributedType  # noqa: E402
from sharpguard import _validation as rules

from ._precision import say_fp16_ignored

__all__ = ["SAMConfig", "SharpnessAwareMinimization", "check_distributed_type", "sharded_global_norm", "build_engine"]


def check_distributed_type(accelerator: Any) -> None:
    """Raise a clear error for a distributed setup in which SAM cannot run between backward and step."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigurationError(
            "SAM cannot run under DeepSpeed: its engine steps the optimizer inside accelerator.backward() (and ZeRO "
            "partitions the gradient as it reduces it), leaving no point between the gradient and the update for a "
            "second pass; use DDP or FSDP instead."
        )
    if accelerator.distributed_type in (DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ConfigurationError(
            f"SAM is not supported under {accelerator.distributed_type.value}; use DDP or FSDP instead."
        )


def guard_registered_state(accelerator: Any, obj: Any, what: str, check: Callable[[Any], None]) -> Any:
    """Make ``accelerator.load_state`` read ``obj``'s part as tensors only, and all or nothing.

    Accelerate loads each object given to ``register_for_checkpointing`` with ``torch.load(...,
    weights_only=False)`` (``accelerate.checkpointing.load_custom_state``), which runs whatever a
    crafted ``custom_checkpoint_<i>.pkl`` pickles. A load-state pre-hook on ``accelerator`` (it runs
    before Accelerate loads anything) reads ``obj``'s file first with ``weights_only=True`` and checks
    it with ``check``: a missing, torn, unsafe or malformed part is refused naming the file, so
    Accelerate's own unrestricted read never sees it and no model, optimizer or object has changed.
    Returns the hook's handle (``handle.remove()`` detaches it); a no-op while ``obj`` is unregistered.
    """
    import weakref

    from sharpguard._atomic import load_tensors_only
    from sharpguard.errors import CheckpointError

    ref = weakref.ref(obj)
    name = type(obj).__name__

    def verify_before_load(models: Any, input_dir: str) -> None:
        target = ref()
        # Accelerate keeps the registered objects in registration order and names their files by that index
        registered = getattr(accelerator, "_custom_objects", None)
        if target is None or registered is None:
            return
        index = next((i for i, o in enumerate(registered) if o is target), None)
        if index is None:
            return
        path = os.path.join(os.fspath(input_dir), f"custom_checkpoint_{index}.pkl")
        to_continue = (
            "Resume from a complete folder of accelerator.save_state, or, to continue without it, move the folder's "
            "custom_checkpoint_*.pkl files out of it, call accelerator.load_state before register_for_checkpointing, "
            "and load each intact part with obj.load_state_dict(torch.load(part, weights_only=True))."
        )
        state = load_tensors_only(path, what=f"the state of the {name} registered at index {index} ({what})",
                                  to_continue=to_continue)
        try:
            check(state)
        except ConfigurationError as exc:
            raise CheckpointError(f"{path} (the state of the {name} registered at index {index}) cannot be "
                                  f"resumed: {exc}") from exc

    return accelerator.register_load_state_pre_hook(verify_before_load)


def build_engine(accelerator: Any, optimizer: Any, model: nn.Module, config: SAMConfig) -> SAMEngine:
    """The SAM engine for an Accelerate-prepared model and optimizer (also what the HF Trainer uses)."""
    check_distributed_type(accelerator)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if not sharded and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # Accelerate drops the FSDP settings without a word where it cannot shard (a CPU: MULTI_CPU wraps the
        # model in DDP); SAM follows what runs, and says so rather than pretend the shards exist
        warnings.warn(
            f"FSDP was requested but Accelerate runs {accelerator.distributed_type.value} (it shards only on GPU-like "
            "devices), so SAM runs as under that: per-worker perturbations on full replicas.",
            UserWarning,
            stacklevel=2,
        )
    sam = config.build(unwrap_optimizer(optimizer), model=accelerator.unwrap_model(model), sharded=sharded)
    return SAMEngine(sam, sharded=sharded)


def clean_pass_context(accelerator: Any, engine: SAMEngine, model: nn.Module) -> contextlib.AbstractContextManager:
    """``no_sync`` around the clean backward of the micro-batch that steps, when ``e`` is per worker."""
    distributed = accelerator.num_processes > 1 and accelerator.sync_gradients
    return engine.clean_pass_context(lambda: accelerator.no_sync(model), distributed=distributed)


def finish_step(accelerator: Any, engine: SAMEngine, model: nn.Module) -> bool:
    """The perturbed pass of the window. Under fp16 the replayed gradients stay scaled like the clean
    ones: ``scaler.step`` unscales and inf-checks the final gradient at ``optimizer.step()``."""
    return engine.finish(no_sync=lambda: accelerator.no_sync(model))


class SharpnessAwareMinimization:
    """SAM (or any variant) for a loop prepared by Accelerate: replaces ``accelerator.backward``.

    Args:
        accelerator: the loop's ``Accelerator``.
        model: the prepared model (DDP-wrapped under multi-process).
        optimizer: the prepared optimizer; you keep calling ``optimizer.step()`` yourself.
        variant, rho, sync_perturbation, nonfinite, **knobs: see :class:`~sharpguard.optim.SAMConfig`
            (``rho=None``: the variant's own default); or pass ``config=``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: ``model(**batch).loss`` for a mapping,
            cross entropy for ``(inputs, targets)``.
        resume: when a checkpoint's SAM settings differ from these: ``"error"`` (default, names them),
            ``"checkpoint"`` (take the checkpoint's) or ``"current"`` (keep these); what
            ``accelerator.load_state`` uses (it calls :meth:`load_state_dict` without arguments).

    ``accelerator.register_for_checkpointing(sam)`` puts its state into ``save_state``/``load_state``;
    its file is read with ``weights_only=True`` and checked before Accelerate loads anything
    (:func:`guard_registered_state`), so a crafted, torn or missing part is refused, never run.

    Raises :class:`~sharpguard.errors.ConfigurationError` under DeepSpeed (before anything runs).
    Cost per optimizer step: twice the forward/backward passes of the window (LookSAM less).
    """

    @rules.checked(optimizer=rules.anything)  # checked after the DeepSpeed check, which comes first
    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        optimizer: Any,
        *,
        variant: str = "sam",
        rho: float | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        loss_fn: LossFn | None = None,
        config: SAMConfig | Mapping[str, Any] | None = None,
        resume: str = "error",
        **knobs: Any,
    ):
        from sharpguard._validation import one_of
        from sharpguard.optim.sam import RESUME_POLICIES

        check_distributed_type(accelerator)
        self.resume = one_of("resume", resume, RESUME_POLICIES)
        rules.optimizer("optimizer", optimizer)
        self.config = (
            SAMConfig.coerce(config)
            if config is not None
            else SAMConfig(variant=variant, rho=rho, sync_perturbation=sync_perturbation, nonfinite=nonfinite,
                           knobs=knobs)
        )
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn or default_loss_fn
        self._unwrapped = accelerator.unwrap_model(model)
        self.engine = build_engine(accelerator, optimizer, model, self.config)
        self._load_guard = guard_registered_state(accelerator, self, "the SAM variant's step counter, knobs, buffers",
                                                  self._checked_state)
        from accelerate.logging import get_logger

        get_logger(__name__).info(f"sharpguard: SAM active -- {self.config.describe()}.", main_process_only=True)
        say_fp16_ignored(accelerator)

    def finish(self) -> str:
        """Say what SAM spent (Accelerate's logger, main process); call once after the loop. Returns the line."""
        from accelerate.logging import get_logger

        line = f"SAM spent -- {self.engine.summary()}."
        get_logger(__name__).info(f"sharpguard: {line}", main_process_only=True)
        return line

    def backward(self, batch: Any) -> torch.Tensor:
        """Forward and backward of one micro-batch at ``w``; on the sync micro-batch, the SAM pass.

        Returns the loss at the unperturbed weights (detached), the number to log.
        """
        self.engine.record(self._replay_fn(batch), self._unwrapped)
        with clean_pass_context(self.accelerator, self.engine, self.model):
            loss = self.loss_fn(self.model, batch)
            self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            finish_step(self.accelerator, self.engine, self.model)
        return loss.detach()

    def _replay_fn(self, batch: Any) -> Callable[[], None]:
        def replay() -> None:
            self.accelerator.backward(self.loss_fn(self.model, batch))

        return replay

    def state_dict(self) -> dict[str, Any]:
        """The variant's own state (step counter, LookSAM's ``g_v``, Friendly-SAM's EMA): what the
        prepared optimizer's state dict lacks. Plain containers and tensors (``weights_only`` loads);
        ``accelerator.register_for_checkpointing(sam)`` puts it into ``save_state``/``load_state``."""
        own = getattr(self.sam, "sharpguard_state_dict", None)
        return {"sam": own() if own is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any], *, resume: str | None = None) -> None:
        """Restore :meth:`state_dict`, all or nothing (checked first; ``resume`` as in
        ``SAM.load_state_dict``, default: this object's ``resume=``); load the optimizer's own state
        dict as usual beside it."""
        resume = self.resume if resume is None else resume
        own = self._checked_state(state, resume)
        if own is not None:
            self.sam.load_sharpguard_state_dict(own, resume=resume)

    def _checked_state(self, state: Any, resume: str | None = None) -> dict[str, Any] | None:
        """The ``"sam"`` entry of a :meth:`state_dict`, checked completely (ConfigurationError otherwise)."""
        if not isinstance(state, Mapping) or not isinstance(state.get("sam"), Mapping):
            raise ConfigurationError(
                f"a SharpnessAwareMinimization state is a mapping with a 'sam' dict, got {type(state).__name__}"
                f"{'' if not isinstance(state, Mapping) else ' with ' + repr(sorted(map(str, state)))}; "
                "pass what state_dict() returned. Nothing was loaded."
            )
        own = dict(state["sam"])
        if not own:  # saved before the wrapper had any state of its own
            return None
        checker = getattr(self.sam, "_checked_own_state", None)
        if checker is not None:
            checker(own, self.resume if resume is None else resume)
        return own

    @property
    def sam(self) -> Any:
        """The SAM variant the engine drives."""
        return self.engine.sam

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches buffered for the perturbed pass of the current window."""
        return self.engine.pending


