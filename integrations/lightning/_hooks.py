"""Small helpers over Lightning's objects and the micro-batch recording shared by the gradient-replacing callbacks."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sharpguard.errors import ConfigurationError

from .._lightning_namespace import NAMESPACE, pl

Callback = pl.Callback

# --------------------------------------------------------------------------------------------------
# small helpers over Lightning's objects (duck-typed where Lightning keeps things private)
# --------------------------------------------------------------------------------------------------
def _is_parallel(strategy: Any) -> bool:
    return isinstance(strategy, pl.strategies.ParallelStrategy)


def _sharded(trainer: Any, pl_module: Any) -> bool:
    """Whether the gradients are FSDP shards: ``FSDPStrategy`` (FSDP1), or FSDP2 -- ``fully_shard``
    applied in ``configure_model`` under ``ModelParallelStrategy``, whose name does not say FSDP
    (its parameters are DTensors, which the unsharded variants cannot perturb)."""
    if "FSDP" in type(trainer.strategy).__name__:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in pl_module.modules())


def _refuse_unsupported(trainer: Any, pl_module: Any, who: str, *, allow_fsdp: bool = False) -> None:
    """Raise before training starts for setups a gradient-replacing callback cannot support."""
    name = type(trainer.strategy).__name__
    if "DeepSpeed" in name:
        raise ConfigurationError(
            f"{who} does not support DeepSpeed: its engine steps inside backward (and ZeRO partitions the "
            "gradient as it reduces it), so nothing can run between the gradient and the update; use "
            "strategy='ddp' or 'fsdp'."
        )
    if not allow_fsdp and _sharded(trainer, pl_module):
        raise ConfigurationError(
            f"{who} does not support FSDP (it replaces the gradient of sharded parameters); use DDP."
        )
    if not pl_module.automatic_optimization:
        if who == "SharpnessAwareMinimization":
            advice = (
                "drop the callback, return sharpguard.SAM(params, base_optimizer_cls, rho=...) from "
                "configure_optimizers, and in training_step call the Lightning optimizer with a closure: "
                "self.optimizers().step(closure=closure), where closure() zeroes the gradients, computes the loss, "
                "calls self.manual_backward(loss) and returns it (SAM calls it twice). That step counts "
                "trainer.global_step, so max_steps, step-interval schedulers and checkpoints work; SAM's "
                "first_step()/second_step() bypass it and leave global_step at 0 (docs/lightning.md)."
            )
        else:
            advice = (
                "drop the callback and compute the method's loss in training_step: loss = method(self, batch) with "
                "method = sharpguard.adversarial.make_method(...), then self.manual_backward(loss) and "
                "self.optimizers().step(), which counts trainer.global_step."
            )
        raise ConfigurationError(
            f"{who} works with Lightning's automatic optimization; with automatic_optimization=False {advice}"
        )


def rank_zero_info(message: str) -> None:
    """Lightning's rank-zero console message (one line per run, not per process)."""
    from importlib import import_module

    import_module(f"{NAMESPACE}.utilities.rank_zero").rank_zero_info(message)


def is_resuming_fit(trainer: Any) -> bool:
    """True while ``trainer.fit(ckpt_path=...)`` restores: ``validate``/``test``/``predict`` with a
    ``ckpt_path`` read the weights only, and need no training state of a callback."""
    return getattr(getattr(trainer, "state", None), "fn", "fit") == "fit"  # TrainerFn.FITTING, a str enum


def refuse_missing_callback_state(who: str, key: str, resume: str, what: str, ckpt_path: Any = None) -> None:
    """Resume is all or nothing: a checkpoint without a callback's state is refused naming the file,
    or, with ``resume="current"``, said once (the callback's state then starts afresh)."""
    import warnings

    from sharpguard.errors import CheckpointError

    where = f"the checkpoint {ckpt_path}" if ckpt_path else "the checkpoint"
    message = (
        f"{where} holds no state for {who} (callbacks[{key!r}] is absent, empty or incomplete), which keeps {what}; "
        "resume from a checkpoint saved with this callback, or pass resume='current' to the callback to continue "
        "with its state started afresh."
    )
    if resume != "current":
        raise CheckpointError(message)
    warnings.warn(f"{message} resume='current': continuing with {who}'s state started afresh.", RuntimeWarning,
                  stacklevel=3)


def _stepping(trainer: Any) -> bool:
    """True when the optimizer steps after the current micro-batch (read in on_train_batch_start)."""
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return True if should_accumulate is None else not should_accumulate()


def _step_args(pl_module: Any, batch: Any, batch_idx: int) -> tuple[Any, ...]:
    """``(batch, batch_idx)`` or ``(batch,)``, as Lightning's loop calls ``training_step``."""
    from importlib import import_module

    signature_utils = import_module(f"{NAMESPACE}.utilities.signature_utils")
    if signature_utils.is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2):
        return (batch, batch_idx)
    return (batch,)


def _loss_of(output: Any) -> Tensor | None:
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    raise ConfigurationError(
        f"training_step returned {type(output).__name__}; return the loss tensor, a dict with 'loss', or None."
    )


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def _sam_replay(pl_module: Any):
    """While a training_step is replayed at ``w + e``, ``self.log``/``self.log_dict`` are no-ops (the core's
    :func:`sharpguard.optim._phase.current_pass` says which pass runs; the mixin reads it there)."""
    pl_module.__dict__["log"] = _noop
    pl_module.__dict__["log_dict"] = _noop
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)


def _grads(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor]]:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def _unscale(grads: list[Tensor], scaler: Any) -> None:
    """Divide gradients by the GradScaler's scale in place (what Lightning's ``16-mixed`` did to the clean ones)."""
    if scaler is not None and grads:
        # the scale as a device tensor through the public scale(): get_scale() would sync with the host
        scale = scaler.scale(torch.ones((), dtype=torch.float32, device=grads[0].device))
        torch._foreach_div_(grads, scale)


class _SyncWindowCallback(Callback):
    """What every gradient-replacing callback needs of Lightning: exactly one optimizer, and a window in which
    the stepping micro-batch's clean backward runs without DDP gradient sync.

    DDP decides at forward time whether a backward all-reduces, so :meth:`_block_sync` enters the strategy's
    ``block_backward_sync`` in ``on_train_batch_start`` (before the forward) and :meth:`_release_sync` leaves
    it after the backward (``on_after_backward``), or at the latest when the batch ends or fails. Whether to
    block is the subclass's decision (the SAM engine's, for :class:`SharpnessAwareMinimization`).
    """

    _who = "this callback"

    def __init__(self) -> None:
        super().__init__()
        self._no_sync: contextlib.AbstractContextManager | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigurationError(
                f"{self._who} needs exactly one optimizer, found {len(trainer.optimizers)}; put all parameter "
                "groups in one optimizer in configure_optimizers."
            )

    def _block_sync(self, trainer: Any) -> None:
        self._release_sync()
        self._no_sync = trainer.strategy.block_backward_sync()
        self._no_sync.__enter__()

    def _release_sync(self) -> None:
        if self._no_sync is not None:
            ctx, self._no_sync = self._no_sync, None
            ctx.__exit__(None, None, None)

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._release_sync()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._release_sync()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release_sync()


class _GradientReplay(_SyncWindowCallback):
    """Shared plumbing: record the micro-batches of the accumulation window, optionally run the clean
    pass of the stepping micro-batch without DDP gradient sync, and replace the gradient in
    ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer: list[tuple[Any, int]] = []
        self.n_steps = 0
        self.n_fallback = 0

    # the clean pass of the stepping micro-batch: local gradients only (per-worker perturbation)
    def _block_clean_sync(self) -> bool:
        return False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _refuse_unsupported(trainer, pl_module, self._who)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._buffer.append((batch, batch_idx))
        if self._block_clean_sync() and _is_parallel(trainer.strategy) and _stepping(trainer):
            self._block_sync(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not _stepping(trainer):
            return
        self._buffer = []  # also after a step that skipped on_before_optimizer_step

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._buffer = []

    def _backward(self, loss: Tensor, scaler: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()
