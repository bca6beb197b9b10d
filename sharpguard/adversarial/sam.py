"""SAM/ASAM combined with any adversarial method, reusing the adversary at the perturbed weights.

A SAM step needs the training loss's gradient at ``w`` and at ``w + e``. With adversarial training
the obvious closure regenerates the attack at ``w + e`` (Harry24k/MAIR's minimizers): ``2(K+1)``
passes for PGD-AT. The adversarial examples found at ``w`` are a fine approximation at ``w + e``
(``e`` is small), so the closure here builds them once and evaluates only the method's objective at
``w + e``: ``K + 2`` passes (``method.sam_cost(reuse=True)``). ``reuse=False`` regenerates, for purists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._batches import checked_loss
from .base import AdversarialMethod
from .. import _validation as rules

__all__ = ["sam_adversarial_closure", "sam_adversarial_step"]


@rules.checked()
def sam_adversarial_closure(
    model: nn.Module, method: AdversarialMethod, batch: Any, *, reuse: bool = True
) -> Callable[[], torch.Tensor]:
    """A closure for ``SAM.step(closure)``: first call ``method(model, batch)`` (adversary cached),
    later calls ``method.objective(model, batch, adversary)``; each calls ``backward()`` and returns the loss.
    """
    cache: dict[str, Any] = {}

    def closure() -> torch.Tensor:
        if reuse and "adversary" in cache:
            loss = method.objective(model, batch, cache["adversary"])
        else:
            loss, cache["adversary"] = method.loss_and_adversary(model, batch)
        checked_loss(loss, f"{type(method).__name__}")
        loss.backward()
        return loss.detach()

    return closure


@rules.checked()
def sam_adversarial_step(optimizer: Any, model: nn.Module, method: AdversarialMethod, batch: Any, *,
                         reuse: bool = True) -> torch.Tensor:
    """One SAM/ASAM step of ``method`` on ``batch``: ``optimizer.step(sam_adversarial_closure(...))``.

    ``optimizer`` is a :class:`sharpguard.optim.SAM` (or any variant with ``step(closure)``); zero
    its gradients before the call as in any training loop.
    """
    return optimizer.step(sam_adversarial_closure(model, method, batch, reuse=reuse))
