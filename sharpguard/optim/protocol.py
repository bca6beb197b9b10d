"""What the step engine needs from an optimizer: the SAM step protocol, as a structural type.

:class:`~sharpguard.optim.engine.SAMEngine` drives any object that has these members --
:class:`~sharpguard.optim.SAM` and every variant, and the sharded forms of
:mod:`sharpguard.optim.sharded` -- without importing them, so the engine sits below the
optimizers in the import graph (the way :class:`~sharpguard.monitor.driver.Comm` lets the monitor
driver work with any framework's collectives).

The sequence (Foret et al., ICLR 2021, Alg. 1; docs in :mod:`sharpguard.optim.sam`)::

    prepare(); clean backward at w; if perturb(): {release grads; backward at w + e; while advance(): ...}
    unperturb(); base_optimizer.step()

Members the engine reads with a default when absent (so a minimal object needs none of them):
``reserve_buffers()`` (allocate the step's scratch before the clean forward), ``sync_perturbation``
(False), ``per_worker_safe`` (False), ``perturbed_points`` (1), ``nonfinite`` and
``nonfinite_counts`` (for the end-of-run summary).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["SAMStepProtocol"]


@runtime_checkable
class SAMStepProtocol(Protocol):
    """The step protocol of a SAM variant, as the engine calls it."""

    #: the optimizer that takes the step with the gradient the protocol leaves in ``.grad``
    base_optimizer: torch.optim.Optimizer
    #: the parameters :meth:`perturb` found with a gradient; the engine unscales their replayed
    #: gradients (``unscale=``) before the variant reads them
    _pass_params: list[torch.Tensor]

    def needs_second_pass(self) -> bool:
        """Whether this step runs a perturbed pass (known before the first forward)."""

    def prepare(self) -> None:
        """Before the clean forward of a step."""

    def perturb(self) -> bool:
        """After the clean backward: save ``w`` and move to ``w + e``; False if this step has no perturbed pass."""

    def advance(self) -> bool:
        """After the backward at a perturbed point: move to the next point (True) or report the last (False)."""

    def unperturb(self) -> None:
        """After the last perturbed backward: restore ``w`` by copy, leave the gradient to step with."""

    def cancel(self) -> None:
        """Abandon the step: restore ``w`` (and running statistics) by copy."""
