"""Robustness measurements for monitors: clean/robust accuracy and the input-gradient norm.

Each is side-effect free (docs/adversarial.md, "Guarantees"): parameters, ``.grad``, buffers, per-module modes and
the global RNG are as they were afterwards; the model is evaluated in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .._batches import as_batches, logits_of
from .._state import side_effect_free
from ..errors import ConfigurationError
from ._context import as_normal_tensor, check_label_range, check_labels
from .embedding import EmbeddingPerturbation, padding_mask
from .losses import resolve_loss
from .threat import ThreatModel
from .. import _validation as rules

__all__ = ["robust_accuracy", "clean_accuracy", "input_grad_norm"]

Attack = Callable[[nn.Module, Any, torch.Tensor], Any]


def _split(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if labels is None:
            raise ConfigurationError("a mapping batch needs 'labels' to measure accuracy.")
        return batch, labels
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigurationError(f"expected (inputs, labels) or a mapping with labels, got {type(batch).__name__}.")


def _logits(model: nn.Module, inputs: Any, perturbation: torch.Tensor | None = None, mask=None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            if perturbation is not None:
                with EmbeddingPerturbation(model, perturbation, mask):
                    return logits_of(model(**inputs))
            return logits_of(model(**inputs))
        return logits_of(model(inputs))


@rules.checked()
def robust_accuracy(model: nn.Module, batches: Any, attack: Attack | None = None) -> float:
    """Fraction of examples still classified correctly after ``attack(model, inputs, labels)``.

    ``batches``: one batch or a list (a frozen probe set) of ``(inputs, labels)`` tuples or mappings
    with ``labels``. ``attack=None`` gives the clean accuracy. For tuple batches the attack returns
    the adversarial inputs (e.g. ``functools.partial(pgd, eps=8/255, steps=20)``); for mapping
    (Hugging Face) batches it returns an embedding perturbation ``(B, L, D)`` (e.g.
    :func:`~sharpguard.attacks.embedding_pgd`), applied through the input-embedding hook.
    On fake tensors (``FakeTensorMode``) the call is a cost-only run: the same attacks and forwards, NaN.
    """
    correct = total = 0
    cost_only = False  # fake tensors (FakeTensorMode): every forward and attack runs, no count is read
    with side_effect_free(model, train=False, parameters=False):
        for batch in as_batches(batches):
            inputs, labels = _split(batch)
            if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
                # (B, C) one-hot labels would broadcast against (B,) predictions and count garbage.
                shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ConfigurationError(
                    f"labels must be a 1-D tensor of class indices, got {shape}; for one-hot labels pass y.argmax(-1)."
                )
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise ConfigurationError(f"labels must be integer class indices, got dtype {labels.dtype}; "
                                         "pass y.long().")
            if isinstance(inputs, Mapping):
                perturbation = None if attack is None else attack(model, inputs, labels)
                if perturbation is not None and not isinstance(perturbation, torch.Tensor):
                    raise ConfigurationError("for a mapping batch the attack must return an embedding "
                                             "perturbation tensor.")
                logits = _logits(model, inputs, perturbation, padding_mask(inputs))
            else:
                adv = inputs if attack is None else attack(model, inputs, labels)
                logits = _logits(model, adv)
            # An out-of-range label would count as a silent error; nothing has changed yet (side_effect_free).
            check_label_range(labels, logits.shape[-1])
            pred = logits.argmax(-1)
            if pred.shape != labels.shape:
                raise ConfigurationError(
                    f"the model made {tuple(pred.shape)} predictions for {tuple(labels.shape)} labels; "
                    "pass one class index per example."
                )
            hits = (pred == labels.to(pred.device)).sum()
            cost_only = cost_only or is_fake(hits)
            correct += 0 if cost_only else int(hits)
            total += int(labels.numel())
    return math.nan if cost_only else correct / total


@rules.checked()
def clean_accuracy(model: nn.Module, batches: Any) -> float:
    """Accuracy without attack (eval mode, side-effect free)."""
    return robust_accuracy(model, batches, None)


@rules.checked()
def input_grad_norm(
    model: nn.Module,
    batches: Any,
    *,
    loss: str = "ce",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    threat: ThreatModel | None = None,
    check_range: bool = True,
) -> float:
    """Mean over examples of ``||d loss_i / d x_i||_2`` in pixel space (Ross & Doshi-Velez 2018's input-gradient norm).

    A large value flags a locally fragile model; a value near zero on a model that is not robust
    flags gradient masking. ``mean``/``std``: the normalization applied outside the model (the chain
    rule turns normalized-space gradients into pixel-space ones). One forward and one input-only
    backward per batch. ``bounds``/``threat``/``check_range``: the input-range check of the attacks
    (inputs outside ``bounds`` in pixel space raise; ``bounds=None`` for unbounded inputs). Labels must
    be class indices below the model's number of outputs.
    """
    loss_fn = resolve_loss(loss)
    if threat is not None:
        if not isinstance(threat, ThreatModel):
            raise ConfigurationError(f"threat must be a ThreatModel, got {type(threat).__name__}.")
        tm = threat
    else:
        tm = ThreatModel(bounds=bounds, mean=mean, std=std)
    total = 0.0
    count = 0
    cost_only = False
    with side_effect_free(model, train=False, parameters=False), torch.inference_mode(False), torch.enable_grad():
        for batch in as_batches(batches):
            inputs, labels = _split(batch)
            if isinstance(inputs, Mapping):
                raise ConfigurationError("input_grad_norm takes (inputs, labels) batches of continuous inputs.")
            x = as_normal_tensor(inputs)
            y = check_labels(labels, x.shape[0], required=True)
            if not x.dtype.is_floating_point:
                raise ConfigurationError(f"input_grad_norm needs floating-point inputs, got dtype {x.dtype}.")
            u = tm.to_pixel(x, check=check_range).detach().requires_grad_(True)
            logits = logits_of(model(tm.from_pixel(u).view_as(u)))  # a view: see gradient._Problem.forward
            check_label_range(y, logits.shape[-1])
            values = loss_fn(logits, y, None)
            (grad,) = torch.autograd.grad(values.sum(), u)
            norms = torch.linalg.vector_norm(grad.flatten(1).double(), dim=1).sum()
            cost_only = cost_only or is_fake(norms)  # fake tensors: the same passes, no value read
            total += 0.0 if cost_only else float(norms)
            count += x.shape[0]
    return math.nan if cost_only else total / count
