"""Signs that a robustness number is not to be trusted (AutoAttack's ``checks.py``, Croce & Hein 2020).

Each check returns a message (``None`` when nothing is wrong); :func:`report_flag` warns with a
:class:`GradientMaskingWarning` or raises a :class:`GradientMaskingError`, as the caller chose.

- :func:`check_probability_output`: the model returns a probability vector, not logits: a softmax
  at the end saturates and zeroes the cross-entropy gradient.
- :func:`check_randomness`: two forwards of the same batch disagree (a randomized defense, or
  dropout left on): a single-sample gradient is then not the gradient of what is evaluated.
- :func:`check_zero_gradients`: examples whose input gradient of the DLR loss is exactly zero:
  gradient attacks cannot move them.
- :func:`check_square_beats_white_box`: the black-box Square attack breaks points the white-box
  attacks missed, the usual symptom of masked gradients.

AutoAttack's check for a "dynamic" defense (autograd called inside ``forward``, found with
``sys.settrace``) is not reproduced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..errors import ConfigurationError, SharpGuardError
from .losses import dlr, margin

__all__ = [
    "GradientMaskingWarning",
    "GradientMaskingError",
    "CHECK_MODES",
    "report_flag",
    "check_probability_output",
    "check_randomness",
    "check_zero_gradients",
    "check_square_beats_white_box",
]

CHECK_MODES = ("warn", "raise", "off")


class GradientMaskingWarning(UserWarning):
    """A robustness evaluation shows a sign of gradient masking or of a misconfigured model."""


class GradientMaskingError(SharpGuardError):
    """Raised instead of :class:`GradientMaskingWarning` when the caller asked for ``checks="raise"``."""


def check_mode(mode: str) -> str:
    if mode not in CHECK_MODES:
        raise ConfigurationError(f"checks must be one of {CHECK_MODES}, got {mode!r}.")
    return mode


def report_flag(message: str | None, mode: str) -> None:
    """Warn (``"warn"``), raise (``"raise"``) or stay silent (``"off"``) about ``message``."""
    if message is None or mode == "off":
        return
    if mode == "raise":
        raise GradientMaskingError(message)
    warnings.warn(message, GradientMaskingWarning, stacklevel=3)


def check_probability_output(logits: torch.Tensor, tol: float = 1e-5) -> str | None:
    """A message if every row lies in ``[0, 1]`` and sums to 1 (AutoAttack's ``check_range_output``)."""
    z = logits.detach().double()
    if z.max() < 1 + tol and z.min() > -tol and bool(((z.sum(-1) - 1).abs() < tol).all()):
        return (
            "the model's outputs are probabilities (every row sums to 1), not logits: attacks on a softmax "
            "output see vanishing gradients; remove the final softmax before evaluating robustness."
        )
    return None


def check_randomness(forward: Callable[[], torch.Tensor], labels: torch.Tensor, tol: float = 1e-4) -> str | None:
    """A message if two forwards of the same batch differ (normalised logits beyond ``tol``, or accuracy)."""
    a, b = forward().detach(), forward().detach()
    unit = lambda z: z.double() / (z.double().norm(dim=-1, keepdim=True) + 1e-10)  # noqa: E731
    differs = float((unit(a) - unit(b)).norm(dim=-1).max()) > tol
    if differs or bool(((a.argmax(-1) == labels) != (b.argmax(-1) == labels)).any()):
        return (
            "two forwards of the same inputs gave different outputs: the model is randomized (or dropout is on "
            "in the evaluated mode), so attacks following one sample's gradient are unreliable; evaluate with "
            "expectation over transformation (AutoAttack's version='rand') or fix the randomness."
        )
    return None


def check_zero_gradients(logits: torch.Tensor, u: torch.Tensor, labels: torch.Tensor) -> str | None:
    """A message if some correctly classified examples have an all-zero input gradient of the DLR loss.

    ``logits`` must have been computed from ``u`` with grad enabled. Only correctly classified
    examples count (those the attacks will work on): for a misclassified one whose label ranks third
    the DLR loss is the constant 1, a zero gradient that means nothing. Margin for < 3 classes.
    """
    correct = logits.detach().argmax(-1) == labels
    loss = dlr if logits.shape[-1] >= 3 else margin
    (grad,) = torch.autograd.grad((loss(logits, labels) * correct).sum(), u)
    zero = int(((grad.flatten(1).abs().sum(1) == 0) & correct).sum())
    if zero:
        return (
            f"{zero} of {int(correct.sum())} correctly classified examples have an exactly zero input gradient: "
            "gradient attacks cannot move them (gradient masking: a non-differentiable or saturated layer); trust "
            "the Square attack's result or use an adaptive attack."
        )
    return None


def check_square_beats_white_box(accuracies: dict[str, float], tol: float = 0.002) -> str | None:
    """A message if the Square attack lowered the robust accuracy by more than ``tol`` after the white-box attacks."""
    if "square" not in accuracies or len(accuracies) <= 2:
        return None
    before = min(v for k, v in accuracies.items() if k != "square")
    if accuracies["square"] < before - tol:
        return (
            f"the black-box Square attack lowered the robust accuracy by {before - accuracies['square']:.2%} after "
            "the gradient attacks: gradients are likely masked; run Square with more queries and restarts, or an "
            "adaptive attack."
        )
    return None
