"""Adversarial training in Lightning: an input-replacing / gradient-replacing callback and a mixin."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from sharpguard.errors import ConfigurationError
from sharpguard.optim import _phase
from sharpguard.optim.functional import all_finite

from ._hooks import _GradientReplay, _grads, _is_parallel, _stepping, _unscale
from .sam import SharpnessAwareMinimization
from sharpguard import _validation as rules

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

    @rules.checked()
    def __init__(self, method: Any = "pgd-at", *, start_step: int = 0, **method_kwargs: Any) -> None:
        super().__init__()
        if start_step < 0:
            raise ConfigurationError(f"start_step must be >= 0, got {start_step}.")
        if isinstance(method, str):
            from sharpguard.adversarial import make_method

            method = make_method(method, **method_kwargs)
        elif method_kwargs:
            raise ConfigurationError(
                "keyword arguments configure a method given by name; configure the object instead.")
        if not callable(method):
            raise ConfigurationError("method must be callable as method(model, batch) -> loss, got "
                                     f"{type(method).__name__}.")
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
        _unscale(grads, scaler)
        if parallel:
            self._all_reduce_mean(trainer, grads)
        if scaler is not None and not bool(all_finite(grads)):
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
            @rules.checked()
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
        now = _phase.current_pass()
        if now is not None and now.kind == "perturbed" and key:  # SAM's replay of this batch at w + e
            for tensors, adversary in held:
                if len(tensors) == len(key) and all(a is b for a, b in zip(tensors, key)):
                    return method.objective(self, batch, adversary)
        loss, adversary = method.loss_and_adversary(self, batch)
        window = int(getattr(getattr(self, "_trainer", None), "accumulate_grad_batches", 1) or 1)
        held.append((key, adversary))
        del held[:-window]
        return loss


