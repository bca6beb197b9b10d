"""The protocol every adversarial-training method follows, and pass counting.

A method is a small object: ``loss = method(model, batch)`` returns a scalar whose ``backward()``
gives the method's parameter gradient; the caller owns ``backward``, gradient accumulation, AMP
scaling and the optimizer step, so the Lightning, Hugging Face and Accelerate adapters (and a
plain loop) all drive it the same way. Each method splits into

- ``generate(model, batch) -> adversary``: the attack (x_adv, or an embedding perturbation);
- ``objective(model, batch, adversary) -> loss``: the training loss given the adversary,

which is what lets SAM/ASAM reuse the adversary at the perturbed weights (:mod:`.sam`) and AWP
evaluate the objective at perturbed weights. ``method.cost`` is ``(forwards, backwards)`` per
call in passes of the model over the batch, counting what the caller's one ``backward()`` runs
(a backward through a loss built from two forwards is two backward passes); plain training is
``(1, 1)``. :func:`count_passes` measures it with hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._batches import logits_of
from ..attacks._context import check_label_range
from ..attacks._context import check_labels
from ..attacks.threat import ThreatModel, make_generator
from .._validation import non_negative, positive
from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = ["AdversarialMethod", "PassCount", "count_passes", "gradient_carrier", "DropoutReplay"]


class AdversarialMethod:
    """Base class: ``__call__ = objective(generate(...))``; subclasses set ``name`` and the two costs."""

    name: str = "method"

    #: True when the training loss is the task loss evaluated on the adversary as inputs,
    #: ``objective(model, (x, y), x_adv) == CE(model(x_adv), y)`` (PGD-AT, fast AT): an adapter may then
    #: write ``x_adv`` into the batch and let the user's own training step compute the loss, with no
    #: extra pass. False for methods that change the loss (TRADES, MART, AWP, distillation, embedding methods).
    replaces_inputs: bool = False

    @rules.checked()
    def __init__(self, *, seed: int | None = None):
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    # --- protocol -------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_adversary(model, batch)[0]

    def loss_and_adversary(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        """The training loss and the adversary it used (cached by the SAM helper for the second pass)."""
        adversary = self.generate(model, batch)
        return self.objective(model, batch, adversary), adversary

    def generate(self, model: nn.Module, batch: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def objective(self, model: nn.Module, batch: Any, adversary: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def attack_cost(self) -> tuple[int, int]:
        """(forwards, backwards) of :meth:`generate`."""
        raise NotImplementedError  # pragma: no cover

    @property
    def objective_cost(self) -> tuple[int, int]:
        """(forwards, backwards) of :meth:`objective` plus the caller's backward."""
        return (1, 1)

    @property
    def cost(self) -> tuple[int, int]:
        """(forwards, backwards) per training step; plain training is ``(1, 1)``."""
        a, o = self.attack_cost, self.objective_cost
        return (a[0] + o[0], a[1] + o[1])

    def sam_cost(self, reuse: bool = True) -> tuple[int, int]:
        """(forwards, backwards) per SAM step: the adversary is built once and reused at ``w + e``
        (``reuse=True``), or rebuilt at ``w + e`` (MAIR's minimizers: twice the method's cost)."""
        f, b = self.cost
        if not reuse:
            return (2 * f, 2 * b)
        o = self.objective_cost
        return (f + o[0], b + o[1])

    # --- helpers --------------------------------------------------------------------------
    def checked_logits(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``model(x)``'s logits, with ``y`` checked against the number of classes before anything changes.

        Once the number of outputs is known (after the first call) the labels are checked before the
        forward; on the first call the forward runs with the buffers (BatchNorm statistics) and the CPU
        RNG saved, and both are put back if the labels turn out to be out of range.
        """
        n_classes = getattr(self, "_n_classes", None)
        if n_classes is not None:
            check_label_range(y, n_classes)
            return logits_of(model(x))
        buffers = [b.detach().clone() for b in model.buffers()]
        rng = torch.get_rng_state()
        logits = logits_of(model(x))
        try:
            check_label_range(y, logits.shape[-1])
        except ConfigurationError:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            torch.set_rng_state(rng)
            raise
        self._n_classes = logits.shape[-1]
        return logits

    def generator(self, device: torch.device) -> torch.Generator:
        """This method's own generator on ``device`` (seed + rank); the global RNG is not used for random starts."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = make_generator(device, self.seed)
        return gen

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"


def image_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a vision batch, with a clear error otherwise."""
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            # class indices of shape (batch,), int32/uint8 as int64: refused or converted before any forward
            return x, check_labels(y, x.shape[0], required=True)
    raise ConfigurationError(
        f"this method takes (inputs, labels) batches, got {type(batch).__name__}; "
        "for Hugging Face batches use an embedding method (fgm, embedding-pgd, freelb, smart, r3f)."
    )


def threat_from(threat: ThreatModel | None, norm: str, eps: float, bounds, mean, std) -> ThreatModel:
    if threat is not None:
        if not isinstance(threat, ThreatModel):
            raise ConfigurationError(f"threat must be a ThreatModel, got {type(threat).__name__}.")
        return threat
    return ThreatModel(norm=norm, eps=eps, bounds=bounds, mean=mean, std=std)


def check_positive(name: str, value: float, *, strict: bool = False) -> float:
    """``value`` > 0 (``strict``) or >= 0 and finite, by the rule every front end uses (sharpguard/_validation.py)."""
    return positive(name, value) if strict else non_negative(name, value)


def gradient_carrier(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                     value: torch.Tensor) -> torch.Tensor:
    """A scalar equal to ``value`` whose ``backward()`` adds ``grads`` to the ``params``' ``.grad``.

    ``value.detach() + s - s.detach()`` with ``s = sum_i <p_i, g_i>`` (``g_i`` constant): the
    gradients of passes already taken (FreeLB's ascent steps, the clean pass of FGM) are handed to
    the caller's single ``backward()`` (so AMP scaling, accumulation and DDP's reducer see one
    backward) without keeping those passes' activations alive or running them backwards again.
    """
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return value.detach()
    ps, gs = zip(*pairs)
    products = torch._foreach_mul(list(ps), [g.detach() for g in gs])
    s = torch.stack([t.sum() for t in products]).sum()
    return value.detach() + (s - s.detach()).to(value.dtype)


class DropoutReplay:
    """Replay the global RNG so several forwards draw the same dropout masks (FreeLB's ``dp_masks``
    without model surgery). ``replay()`` before each forward; the RNG then advances as after one forward."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled
        self.device = device
        self._cpu = torch.get_rng_state() if enabled else None
        self._cuda = (
            torch.cuda.get_rng_state(device) if enabled and device.type == "cuda" else None
        )

    def replay(self) -> None:
        if not self.enabled:
            return
        torch.set_rng_state(self._cpu)
        if self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda, self.device)


# ----------------------------------------------------------------------------- pass counting
@dataclass
class PassCount:
    forwards: int = 0
    backwards: int = 0

    def as_tuple(self) -> tuple[int, int]:
        return (self.forwards, self.backwards)


def _output_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    try:
        return logits_of(output)
    except ConfigurationError:
        return None
    except Exception:  # pragma: no cover - exotic outputs
        return None


@contextlib.contextmanager
def count_passes(model: nn.Module) -> Iterator[PassCount]:
    """Count forwards of ``model`` and backward passes through its output (logits), by hooks.

    A backward is counted each time a gradient reaches the output of a forward: an input-only
    ``autograd.grad`` of an attack step counts, and so does the training ``backward()``; a
    gradient handed over by :func:`gradient_carrier` does not (it runs no backward through the model).
    """
    counts = PassCount()

    def on_backward(grad: torch.Tensor) -> None:
        counts.backwards += 1

    def on_forward(module: nn.Module, args: Any, output: Any) -> None:
        counts.forwards += 1
        t = _output_tensor(output)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(on_backward)

    handle = model.register_forward_hook(on_forward)
    try:
        yield counts
    finally:
        handle.remove()

