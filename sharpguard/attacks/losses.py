"""Per-example attack objectives (the attack maximises them; a targeted attack minimises them).

Each takes ``(logits, labels, reference_logits)`` and returns one value per example, so the sum's
gradient with respect to a batch of inputs is the batch of per-example gradients.

- ``"ce"``: cross entropy (Madry et al. 2018).
- ``"margin"`` / ``"cw"``: ``max_{j != y} z_j - z_y`` on the logits (Carlini & Wagner 2017, eq. f6 with
  kappa = inf): its gradient does not vanish when the softmax saturates, which is what breaks
  defensive distillation.
- ``"kl"``: ``KL(softmax(reference) || softmax(z))`` to the clean logits, label-free (TRADES,
  Zhang et al. 2019, eq. 5), computed in float32 or wider.
- ``"dlr"``: difference of logits ratio ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` (Croce & Hein
  2020, eq. 6): invariant to shifting and scaling the logits.

:func:`dlr_targeted` (APGD-T's objective, Croce & Hein 2020, eq. 7) takes a target class per example
instead of reference logits, so it is not one of the named losses; :func:`~sharpguard.attacks.apgd_targeted`
binds the targets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigurationError

AttackLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]

__all__ = [
    "wide", "AttackLoss", "resolve_loss", "cross_entropy", "margin", "kl_to_reference", "dlr", "dlr_targeted",
    "NEEDS_LABELS",
]


def wide(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32 (softmax/KL/norms overflow in fp16); float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None,
                  reference: torch.Tensor | None = None) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def _other_max(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j`` per example."""
    masked = logits.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
    return masked.amax(dim=-1)


def margin(logits: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None = None) -> torch.Tensor:
    true = logits.gather(-1, labels[:, None]).squeeze(-1)
    return _other_max(logits, labels) - true


def kl_to_reference(logits: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None) -> torch.Tensor:
    ref_log = F.log_softmax(wide(reference), dim=-1)
    return F.kl_div(F.log_softmax(wide(logits), dim=-1), ref_log, reduction="none", log_target=True).sum(-1)


def dlr(logits: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor | None = None) -> torch.Tensor:
    if logits.shape[-1] < 3:
        raise ConfigurationError("the DLR loss needs at least 3 classes; use loss='margin' instead.")
    top = logits.sort(dim=-1, descending=True).values
    return margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (Croce & Hein 2020, eq. 7), per example.

    Maximising it pushes the target logit ``z_t`` above the true one; like DLR it is invariant to
    shifting and scaling the logits. ``pi`` sorts the logits in decreasing order (needs 4 classes).
    """
    if logits.shape[-1] < 4:
        raise ConfigurationError("the targeted DLR loss needs at least 4 classes; use apgd(loss='dlr') or "
                                 "loss='margin'.")
    top = logits.topk(4, dim=-1).values
    true = logits.gather(-1, labels[:, None]).squeeze(-1)
    target = logits.gather(-1, targets[:, None]).squeeze(-1)
    return -(true - target) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


_LOSSES: dict[str, AttackLoss] = {
    "ce": cross_entropy,
    "cross_entropy": cross_entropy,
    "margin": margin,
    "cw": margin,
    "kl": kl_to_reference,
    "trades": kl_to_reference,
    "dlr": dlr,
}
NEEDS_LABELS = {cross_entropy, margin, dlr}


def resolve_loss(loss: str | AttackLoss) -> AttackLoss:
    """A loss name (``ce``, ``margin``/``cw``, ``kl``, ``dlr``) or a callable ``(logits, labels, reference) ->
    per-example``."""
    if callable(loss):
        return loss
    fn = _LOSSES.get(str(loss).lower())
    if fn is None:
        raise ConfigurationError(f"unknown attack loss {loss!r}; use one of 'ce', 'margin' (alias 'cw'), 'kl', 'dlr' "
                                 "or a callable.")
    return fn
