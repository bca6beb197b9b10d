"""The guard every attack runs in: grad enabled, per-module modes saved and restored, BN statistics frozen."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .._state import preserve_buffers, preserve_modes, preserve_rng
from .._validation import positive_int
from ..errors import ConfigurationError

__all__ = ["attack_context", "MODEL_MODES", "check_steps", "check_labels", "check_label_range", "as_normal_tensor"]

MODEL_MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def attack_context(model: nn.Module, mode: str = "eval", *, keep_rng: bool = True) -> Iterator[None]:
    """Run attack steps on ``model`` without side effects on it.

    ``mode="eval"`` (default; TRADES/AutoAttack convention): every module in eval for the body, so
    BatchNorm uses its running statistics and dropout is off. ``"train"``: every module in train
    mode (Madry/Wong convention), ``"keep"``: the current per-module modes; in both, buffers (BN
    running statistics) are copied back afterwards and, when ``keep_rng``, the global RNG too (dropout
    draws from it). Each module's own flag is restored on exit, never a blanket ``model.train()``.
    Gradients are enabled even inside ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    if mode not in MODEL_MODES:
        raise ConfigurationError(f"model_mode must be one of {MODEL_MODES}, got {mode!r}.")
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        if mode == "eval":
            stack.enter_context(preserve_modes(model, train=False))
        else:
            if keep_rng:
                stack.enter_context(preserve_rng())
            stack.enter_context(preserve_buffers(model))
            stack.enter_context(preserve_modes(model, train=True if mode == "train" else None))
        yield


def as_normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached tensor usable in autograd: inference tensors (from ``inference_mode``) are cloned."""
    t = t.detach()
    return t.clone() if t.is_inference() else t


def check_steps(steps: int, name: str = "steps") -> int:
    return positive_int(name, steps)  # the rule every front end uses (sharpguard/_validation.py)


def check_labels(y: torch.Tensor | None, n: int, *, required: bool) -> torch.Tensor | None:
    """Labels must be class indices of shape ``(batch,)``."""
    if y is None:
        if required:
            raise ConfigurationError("this attack loss needs labels y of shape (batch,); pass them or use loss='kl'.")
        return None
    if not isinstance(y, torch.Tensor):
        raise ConfigurationError(f"labels must be a tensor of class indices, got {type(y).__name__}.")
    if y.dim() != 1 or y.shape[0] != n:
        raise ConfigurationError(
            f"labels must have shape ({n},) (one class index per example), got {tuple(y.shape)}; "
            "for one-hot labels pass y.argmax(-1)."
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ConfigurationError(f"labels must be integer class indices, got dtype {y.dtype}.")
    if y.dtype != torch.long:  # int32/uint8 labels are class indices too; torch's losses take int64 only
        y = y.long()
    return as_normal_tensor(y)


def check_label_range(y: torch.Tensor, n_classes: int) -> None:
    """Raise unless every label is a class index in ``[0, n_classes)`` (one device synchronisation).

    Without it an out-of-range label gives an accuracy of 0 for that example without a word, an
    attack that reports every point as already broken, or torch's ``IndexError`` (a device-side
    assert on CUDA) after a training forward has already updated BatchNorm statistics.
    On fake tensors there is nothing to read and nothing is checked.
    """
    from torch._subclasses.fake_tensor import is_fake

    if y.numel() == 0 or is_fake(y):  # a fake tensor (FakeTensorMode: a cost-only run) has no value to check
        return
    lo, hi = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
    if lo < 0 or hi >= n_classes:
        raise ConfigurationError(
            f"labels must be class indices in [0, {n_classes}) for a model with {n_classes} outputs, got values in "
            f"[{lo}, {hi}]; check the label encoding (and ignore indices such as -100) or the model's output size."
        )
