"""PyTorch Lightning callbacks: sharpness-aware minimization, adversarial training and monitors.

::

    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor, RobustnessMonitor

    trainer = Trainer(callbacks=[SharpnessAwareMinimization(rho=0.05),
                                 SharpnessMonitor(every_n_steps=50), RobustnessMonitor(eps=0.1)])

**How SAM runs (no closure needed).** Lightning's automatic optimization hands a closure to the
optimizer at 32-bit/bf16 but calls ``scaler.step`` without one under fp16, and does not zero gradients
between two closure calls under gradient accumulation (integration_conventions.md, 1.1-1.2). So the
callback never relies on the closure: Lightning runs the clean pass as usual; in
``on_before_optimizer_step`` (gradients complete, already unscaled under ``16-mixed``) the callback moves
the weights to ``w + e`` through the optimizer adapter protocol of :func:`sharpguard.optim.make_sam`
(``prepare / perturb / unperturb``), replays every micro-batch of the accumulation window through
``trainer.strategy.training_step`` (so DDP all-reduces the perturbed gradient and autocast applies),
with ``self.log`` silenced (the perturbed loss never reaches the logs), restores ``w`` by copy and leaves
the SAM gradient in ``.grad``. Lightning then clips that gradient and steps the user's own optimizer, so
LR schedulers, checkpoints and ``LearningRateMonitor`` see exactly the optimizer the user configured.

**Adversarial training.** :class:`AdversarialTraining` writes ``x_adv`` into the batch for methods
whose loss is the task loss on adversarial inputs (PGD-AT, fast AT: the method's own cost, and SAM's
replay reuses ``x_adv``), and replaces the gradient for the methods that change the loss;
:class:`AdversarialTrainingMixin` gives ``self.adversarial_loss(batch)`` for a ``training_step`` that
returns the method's loss itself (no wasted pass; SAM reuses the adversary).

The namespace (``pytorch_lightning`` or ``lightning.pytorch``) is chosen by
:mod:`sharpguard.integrations._lightning_namespace`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sharpguard.errors import ConfigurationError
from sharpguard.monitor import Monitor
from sharpguard.monitor import RobustnessMonitor as _CoreRobustnessMonitor
from sharpguard.monitor import SharpnessMonitor as _CoreSharpnessMonitor
from sharpguard.optim.sam import perturbed_pass

from ._lightning_namespace import NAMESPACE, pl

__all__ = [
    "SharpnessAwareMinimization",
    "AdversarialTraining",
    "AdversarialTrainingMixin",
    "SharpnessMonitor",
    "RobustnessMonitor",
    "NAMESPACE",
]

Callback = pl.Callback


# --------------------------------------------------------------------------------------------------
# small helpers over Lightning's objects (duck-typed where Lightning keeps things private)
# --------------------------------------------------------------------------------------------------
def _is_parallel(strategy: Any) -> bool:
    return isinstance(strategy, pl.strategies.ParallelStrategy)


def _refuse_unsupported(trainer: Any, pl_module: Any, who: str) -> None:
    """Raise before training starts for setups a gradient-replacing callback cannot support."""
    name = type(trainer.strategy).__name__
    if "DeepSpeed" in name:
        raise ConfigurationError(
            f"{who} does not support DeepSpeed: its engine steps inside backward, so nothing can run between the "
            "gradient and the update; use strategy='ddp' (or 'fsdp' is not supported yet either)."
        )
    if "FSDP" in name:
        raise ConfigurationError(
            f"{who} does not support FSDP yet (the perturbation needs the global norm of sharded gradients); use DDP."
        )
    if not pl_module.automatic_optimization:
        raise ConfigurationError(
            f"{who} works with Lightning's automatic optimization; with automatic_optimization=False call "
            "sharpguard.SAM's first_step()/second_step() in your training_step instead."
        )


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


_REPLAY_FLAG = "_sharpguard_sam_replay"


@contextlib.contextmanager
def _sam_replay(pl_module: Any):
    """While a training_step is replayed at ``w + e``: ``self.log``/``self.log_dict`` are no-ops, and
    :meth:`AdversarialTrainingMixin.adversarial_loss` reuses the adversaries of the clean pass."""
    pl_module.__dict__["log"] = _noop
    pl_module.__dict__["log_dict"] = _noop
    pl_module.__dict__[_REPLAY_FLAG] = True
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)
        pl_module.__dict__.pop(_REPLAY_FLAG, None)


def _grads(optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[Tensor]]:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class _GradientReplay(Callback):
    """Shared plumbing: record the micro-batches of the accumulation window, optionally run the clean
    pass of the stepping micro-batch without DDP gradient sync, and replace the gradient in
    ``on_before_optimizer_step``."""

    _who = "this callback"

    def __init__(self) -> None:
        super().__init__()
        self._buffer: list[tuple[Any, int]] = []
        self._no_sync: contextlib.AbstractContextManager | None = None
        self.n_steps = 0
        self.n_fallback = 0

    # the clean pass of the stepping micro-batch: local gradients only (per-worker perturbation)
    def _block_clean_sync(self) -> bool:
        return False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _refuse_unsupported(trainer, pl_module, self._who)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ConfigurationError(
                f"{self._who} needs exactly one optimizer, found {len(trainer.optimizers)}; put all parameter "
                "groups in one optimizer in configure_optimizers."
            )

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._buffer.append((batch, batch_idx))
        if self._block_clean_sync() and _is_parallel(trainer.strategy) and _stepping(trainer):
            # DDP decides at forward time whether the backward all-reduces: enter no_sync before the
            # forward, leave it after the backward (on_after_backward)
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
        if not _stepping(trainer):
            return
        self._buffer = []  # also after a step that skipped on_before_optimizer_step

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release_sync()
        self._buffer = []

    def _backward(self, loss: Tensor, scaler: Any) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    @staticmethod
    def _unscale(grads: list[Tensor], scaler: Any) -> None:
        if scaler is not None and grads:
            # the scale as a device tensor through the public scale(): get_scale() would sync with the host
            scale = scaler.scale(torch.ones((), dtype=torch.float32, device=grads[0].device))
            torch._foreach_div_(grads, scale)


# --------------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------------
class SharpnessAwareMinimization(_GradientReplay):
    """Sharpness-aware minimization (Foret et al., ICLR 2021) for any LightningModule, as one callback.

    Args:
        rho: radius of the weight perturbation (SAM's ``rho``; 0.05 in the paper, ~2.0 for ASAM).
        variant: ``"sam"``, ``"asam"``, ``"gsam"``, ``"looksam"``, ``"momentum_sam"``, ``"friendly_sam"``
            (see :func:`sharpguard.optim.make_sam`); paper knobs go in ``**variant_kwargs``.
        adaptive: shorthand for ASAM's scale-invariant perturbation with ``variant="sam"``.
        per_worker: under DDP, compute the perturbation from each worker's local gradient (the SAM paper's
            m-sharpness; saves one all-reduce per step). ``None``: on for ``sam``/``asam``, off for the
            variants that reuse the clean gradient in the update (``per_worker_safe = False``: GSAM,
            LookSAM, Friendly-SAM), for which ``per_worker=True`` is refused (the replicas would diverge).
        keep_bn_stats: keep BatchNorm running statistics from the clean pass only (``model=`` of the wrapper).

    Semantics:
        * gradient accumulation over ``k`` micro-batches: the perturbation comes from the accumulated
          clean gradient ``g = (1/k) sum_i grad L_i(w)``; every micro-batch is replayed at ``w + e`` and
          the update uses ``(1/k) sum_i grad L_i(w + e)`` -- exact SAM on the whole accumulated batch
          (cost: 2 forward/backward per micro-batch; the micro-batches are held until the step);
        * gradient clipping (``gradient_clip_val``) acts on the final SAM gradient;
        * ``16-mixed``: the replayed losses are scaled by the GradScaler's scale and unscaled after; if the
          perturbed gradient overflows the step falls back to the clean gradient (``n_fallback``); if the
          clean one overflows the scaler skips the step as usual;
        * ``training_step`` runs twice per micro-batch; ``self.log`` is silenced in the replay, but other
          side effects of ``training_step`` (e.g. a torchmetrics ``update``) happen twice;
          ``on_before_backward``/``on_after_backward`` hooks are not called for the replay.
    """

    _who = "SharpnessAwareMinimization"

    def __init__(
        self,
        rho: float = 0.05,
        variant: str = "sam",
        *,
        adaptive: bool = False,
        per_worker: bool | None = None,
        keep_bn_stats: bool = True,
        **variant_kwargs: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
            raise ConfigurationError(f"rho must be a positive number, got {rho!r}; the SAM default is 0.05.")
        from sharpguard.optim.factory import VARIANTS, canonical_variant

        key = canonical_variant(variant)
        safe = VARIANTS[key].per_worker_safe
        if per_worker and not safe:
            raise ConfigurationError(
                f"per_worker=True is not possible with variant {variant!r}: its update uses the clean gradient, "
                "which must be all-reduced or the replicas diverge; leave per_worker=None."
            )
        self.rho = float(rho)
        self.variant = variant
        self.adaptive = adaptive
        self.per_worker = safe if per_worker is None else bool(per_worker)
        self.keep_bn_stats = keep_bn_stats
        self.variant_kwargs = dict(variant_kwargs)
        self.sam: Any | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(variant=self.variant, rho=self.rho)

    def _block_clean_sync(self) -> bool:
        # only when a perturbed pass follows: on a step without one (interval skips, LookSAM reuse,
        # Momentum-SAM) the clean gradient is the update and must be all-reduced
        return self.per_worker and self.sam is not None and self.sam.needs_second_pass()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        from sharpguard.optim import make_sam

        knobs = dict(self.variant_kwargs)
        if self.adaptive:
            knobs["adaptive"] = True
        self.sam = make_sam(
            trainer.optimizers[0], self.variant, rho=self.rho, model=pl_module if self.keep_bn_stats else None, **knobs
        )
        if self._pending_state is not None:
            self._load_sam_state(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._buffer and self.sam is not None:
            self.sam.prepare()  # before the first forward of the window (Momentum-SAM moves w here)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._release_sync()
        batches, self._buffer = self._buffer, []
        sam = self.sam
        if sam is None:
            return
        params, grads = _grads(optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not params or not batches or (scaler is not None and not _all_finite(grads)):
            # nothing to perturb, or an fp16 overflow that scaler.step will skip: abandon the SAM step
            # (weights back by copy if prepare() moved them; the variant's counters do not advance)
            sam.cancel()
            return
        clean = [g.clone() for g in grads] if scaler is not None else None
        fallback = False
        with torch.enable_grad(), _sam_replay(pl_module):
            perturbed = perturbed_pass(sam, self._replays(trainer, pl_module, batches, scaler), self._replay_no_sync(trainer))
        if perturbed:
            try:
                _, perturbed_grads = _grads(optimizer)
                self._unscale(perturbed_grads, scaler)
                fallback = scaler is not None and not _all_finite(perturbed_grads)
            except BaseException:
                sam.cancel()  # weights back to w by copy before the error propagates
                raise
        if fallback:
            sam.cancel()
            torch._foreach_copy_([p.grad for p in params], clean)
            self.n_fallback += 1
            return
        sam.unperturb()
        self.n_steps += 1

    @staticmethod
    def _replay_no_sync(trainer: Any) -> Any:
        # only the last replayed backward all-reduces (DDP's sync is decided at forward time)
        return trainer.strategy.block_backward_sync if _is_parallel(trainer.strategy) else None

    def _replays(self, trainer: Any, pl_module: Any, batches: list[tuple[Any, int]], scaler: Any) -> list[Any]:
        """One callable per micro-batch: ``training_step`` through the strategy (autocast, DDP), backward."""
        strategy = trainer.strategy
        accumulate = trainer.accumulate_grad_batches

        def replay(batch: Any, batch_idx: int) -> None:
            loss = _loss_of(strategy.training_step(*_step_args(pl_module, batch, batch_idx)))
            if loss is not None:
                self._backward(loss / accumulate, scaler)

        return [functools.partial(replay, batch, batch_idx) for batch, batch_idx in batches]

    # -- checkpoint state. Lightning saves the user's optimizer (the base) itself, so a checkpoint loads
    # without sharpguard; the wrapper's own entry (step counter, variant buffers) lives here.
    def _sam_extra_state(self) -> dict[str, Any]:
        return {} if self.sam is None else self.sam.sharpguard_state_dict()

    def _load_sam_state(self, extra: dict[str, Any]) -> None:
        if extra:
            self.sam.load_sharpguard_state_dict(extra)

    def state_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "rho": self.rho,
            "n_steps": self.n_steps,
            "n_fallback": self.n_fallback,
            "sam": self._sam_extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_steps = int(state_dict["n_steps"])
        self.n_fallback = int(state_dict["n_fallback"])
        if self.sam is not None:
            self._load_sam_state(state_dict.get("sam") or {})
        else:  # callbacks are restored before on_fit_start builds the wrapper
            self._pending_state = state_dict.get("sam") or {}


# --------------------------------------------------------------------------------------------------
# adversarial training
# --------------------------------------------------------------------------------------------------
def _write_inputs(batch: Any, x_adv: Tensor) -> Callable[[], None]:
    """Put ``x_adv`` in the place of the batch's inputs and return the function that puts them back.

    Every later reader of this batch object sees ``x_adv``: the user's ``training_step`` and
    :class:`SharpnessAwareMinimization`'s replay at ``w + e``. A list (what ``default_collate`` makes of
    ``(inputs, labels)`` samples) gets its element replaced, so the tensor the DataLoader made is never
    written; a tuple cannot change, so its input tensor is overwritten in place (the clean values are kept).
    """
    if isinstance(batch, list):
        clean = batch[0]
        batch[0] = x_adv
        return functools.partial(batch.__setitem__, 0, clean)
    x = batch[0]
    clean = x.detach().clone()
    with torch.no_grad():
        x.copy_(x_adv)

    def restore() -> None:
        with torch.no_grad():
            x.copy_(clean)

    return restore


class AdversarialTraining(_GradientReplay):
    """Adversarial training with a method of :mod:`sharpguard.adversarial`, without touching ``training_step``.

    Two paths, chosen by the method's ``replaces_inputs``:

    * **input replacement** (PGD-AT, fast AT: the training loss is the task loss on ``x_adv``). In
      ``on_train_batch_start`` the callback runs ``method.generate`` (in the mode the method states:
      eval for vision, so BatchNorm statistics are untouched; under the precision plugin's autocast)
      and writes ``x_adv`` into the batch, so your own ``training_step`` computes its loss -- the
      logged one too -- on the adversarial inputs. Cost: the method's paper cost ``method.cost``
      (``K+1`` passes for PGD-AT), nothing wasted. The clean inputs are put back at the end of the
      optimizer step (after :class:`SharpnessAwareMinimization`'s replay, which therefore reuses
      ``x_adv`` at ``w + e``: ``K+2`` passes, ``method.sam_cost(reuse=True)``). The callback moves
      itself to the front of ``trainer.callbacks`` so that every other callback sees the same batch
      (adversarial until its ``on_train_batch_end``, clean after: monitors capture clean probes).
      DDP, gradient accumulation and ``16-mixed`` need nothing special: Lightning's own pass is the
      training pass.
    * **gradient replacement** (TRADES, MART, AWP, distillation, embedding methods: the method changes
      the loss, which a callback cannot do). Lightning runs the user's ``training_step``; in
      ``on_before_optimizer_step`` the callback zeroes the gradient and back-propagates
      ``method(pl_module, batch) / accumulate_grad_batches`` for every micro-batch of the step.
      Cost: ``method.cost`` plus the discarded clean forward/backward. Under DDP the clean pass of
      the stepping micro-batch runs without gradient sync and the adversarial gradient is averaged
      with one all-reduce; under ``16-mixed`` the adversarial loss is scaled and unscaled, and an
      overflow falls back to the clean gradient (``n_fallback``). Not combinable with
      :class:`SharpnessAwareMinimization` (refused): use :class:`AdversarialTrainingMixin`, which
      also saves the wasted pass.

    The model's ``forward`` must map the batch's inputs to logits; image methods take
    ``(inputs, labels)`` batches.

    Args:
        method: a method object (``loss = method(model, batch)``) or its name for
            :func:`sharpguard.adversarial.make_method` (``"pgd-at"``, ``"trades"``, ``"fast-at"`` ...).
        start_step: train on clean inputs before this optimizer step (a warm-up).
        **method_kwargs: passed to ``make_method`` when ``method`` is a name.
    """

    _who = "AdversarialTraining"

    def __init__(self, method: Any = "pgd-at", *, start_step: int = 0, **method_kwargs: Any) -> None:
        super().__init__()
        if start_step < 0:
            raise ConfigurationError(f"start_step must be >= 0, got {start_step}.")
        if isinstance(method, str):
            from sharpguard.adversarial import make_method

            method = make_method(method, **method_kwargs)
        elif method_kwargs:
            raise ConfigurationError("keyword arguments configure a method given by name; configure the object instead.")
        if not callable(method):
            raise ConfigurationError(f"method must be callable as method(model, batch) -> loss, got {type(method).__name__}.")
        if getattr(method, "replaces_inputs", False) and not callable(getattr(method, "generate", None)):
            raise ConfigurationError("a method with replaces_inputs=True needs generate(model, batch) -> x_adv.")
        self.method = method
        self.start_step = int(start_step)
        self._restore: list[Callable[[], None]] = []

    @property
    def replaces_inputs(self) -> bool:
        """True: ``x_adv`` is written into the batch; False: the gradient is replaced (see the class docs)."""
        return bool(getattr(self.method, "replaces_inputs", False))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=type(self.method).__name__)

    def _block_clean_sync(self) -> bool:
        # gradient replacement discards Lightning's pass: no need to all-reduce it
        return not self.replaces_inputs

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not self.replaces_inputs and any(isinstance(cb, SharpnessAwareMinimization) for cb in trainer.callbacks):
            raise ConfigurationError(
                f"AdversarialTraining({type(self.method).__name__}) replaces the gradient and cannot run with "
                "SharpnessAwareMinimization; return self.adversarial_loss(batch) from training_step with "
                "AdversarialTrainingMixin instead (SAM then reuses the adversary at w + e)."
            )
        if self.replaces_inputs:
            # first in line: the batch every other callback sees is adversarial until our
            # on_train_batch_end and clean after it. A new list: Lightning is iterating the old one.
            trainer.callbacks = [self] + [cb for cb in trainer.callbacks if cb is not self]

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.replaces_inputs:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            return
        if trainer.global_step < self.start_step:
            return
        with trainer.precision_plugin.train_step_context():
            x_adv = self.method.generate(pl_module, batch)
        self._restore.append(_write_inputs(batch, x_adv))
        if _stepping(trainer):
            self.n_steps += 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _stepping(trainer):  # after the optimizer step (and SAM's replay) of the window
            self._put_back_clean_inputs()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._put_back_clean_inputs()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._put_back_clean_inputs()

    def _put_back_clean_inputs(self) -> None:
        restore, self._restore = self._restore, []
        for put_back in reversed(restore):
            put_back()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.replaces_inputs:
            return  # the gradient Lightning computed is already the adversarial one
        self._release_sync()
        batches, self._buffer = self._buffer, []
        params, grads = _grads(optimizer)
        if not params or not batches:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        parallel = _is_parallel(trainer.strategy) and trainer.world_size > 1
        if trainer.global_step < self.start_step:
            if parallel:  # the clean pass ran without sync: average it now
                self._all_reduce_mean(trainer, grads)
            return
        clean = [g.clone() for g in grads] if scaler is not None else None
        optimizer.zero_grad(set_to_none=False)
        accumulate = trainer.accumulate_grad_batches
        # the precision plugin's context applies autocast (bf16-mixed / 16-mixed) as in training_step
        with torch.enable_grad(), trainer.precision_plugin.train_step_context():
            for batch, _ in batches:
                loss = self.method(pl_module, batch)
                self._backward(loss / accumulate, scaler)
        params, grads = _grads(optimizer)
        self._unscale(grads, scaler)
        if parallel:
            self._all_reduce_mean(trainer, grads)
        if scaler is not None and not _all_finite(grads):
            self.n_fallback += 1
            torch._foreach_copy_(grads, clean)
        self.n_steps += 1

    @staticmethod
    def _all_reduce_mean(trainer: Any, grads: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n

    def state_dict(self) -> dict[str, Any]:
        state = {"n_steps": self.n_steps, "n_fallback": self.n_fallback, "start_step": self.start_step}
        detector = getattr(self.method, "detector", None)
        if detector is not None:  # fast AT's catastrophic-overfitting record continues after a resume
            state["detector"] = detector.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_steps = int(state_dict["n_steps"])
        self.n_fallback = int(state_dict["n_fallback"])
        detector = getattr(self.method, "detector", None)
        if detector is not None and "detector" in state_dict:
            detector.load_state_dict(state_dict["detector"])


def _batch_tensors(batch: Any) -> tuple[Tensor, ...]:
    """The top-level tensors of a batch: what identifies it when ``training_step`` is replayed."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, Mapping):
        return tuple(v for v in batch.values() if isinstance(v, Tensor))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return tuple(v for v in batch if isinstance(v, Tensor))
    return ()


class AdversarialTrainingMixin:
    """A LightningModule mixin: return ``self.adversarial_loss(batch)`` from your ``training_step``.

    ::

        class Lit(AdversarialTrainingMixin, pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = ...
                self.adversarial_method = sharpguard.adversarial.TRADES(beta=6.0, eps=8/255)

            def training_step(self, batch, batch_idx):
                loss = self.adversarial_loss(batch)
                self.log("train/adv_loss", loss)
                return loss

    Lightning then back-propagates the method's own loss: ``method.cost`` passes per step, no wasted
    clean pass (unlike :class:`AdversarialTraining`'s gradient replacement). With
    :class:`SharpnessAwareMinimization` the replay of ``training_step`` at ``w + e`` evaluates
    ``method.objective`` on the adversary built at ``w`` for the same batch (recognised by its
    tensors): ``method.sam_cost(reuse=True)`` passes, e.g. ``K+5`` forwards for TRADES instead of
    ``2(K+3)``. The adversaries of the current accumulation window are held until the next window.
    """

    adversarial_method: Any = None

    def adversarial_loss(self, batch: Any, method: Any = None) -> Tensor:
        """The training loss of ``method`` (default ``self.adversarial_method``) on ``batch``."""
        method = self.adversarial_method if method is None else method
        if method is None or not callable(getattr(method, "loss_and_adversary", None)):
            raise ConfigurationError(
                "adversarial_loss needs a method from sharpguard.adversarial: set self.adversarial_method = "
                f"make_method('trades', ...) in __init__ or pass method=; got {type(method).__name__}."
            )
        held: list[tuple[tuple[Tensor, ...], Any]] = self.__dict__.setdefault("_sharpguard_adversaries", [])
        key = _batch_tensors(batch)
        if self.__dict__.get(_REPLAY_FLAG) and key:
            for tensors, adversary in held:
                if len(tensors) == len(key) and all(a is b for a, b in zip(tensors, key)):
                    return method.objective(self, batch, adversary)
        loss, adversary = method.loss_and_adversary(self, batch)
        window = int(getattr(getattr(self, "_trainer", None), "accumulate_grad_batches", 1) or 1)
        held.append((key, adversary))
        del held[:-window]
        return loss


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
