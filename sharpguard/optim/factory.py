"""Build any SAM variant around an optimizer instance by name (what the framework adapters call)."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from .config import SAMConfig
from .registry import VARIANTS, canonical_variant
from .sam import SAM
from .. import _validation as rules

__all__ = ["VARIANTS", "canonical_variant", "make_sam"]


@rules.checked()
def make_sam(
    optimizer: Optimizer,
    variant: str = "sam",
    *,
    model: Any = None,
    sync_perturbation: bool = False,
    nonfinite: str = "skip",
    **knobs: Any,
) -> SAM:
    """Wrap ``optimizer`` in the SAM variant named ``variant`` with its knobs.

    ``variant`` is a name of :data:`~sharpguard.optim.VARIANTS` (``"sam"``, ``"asam"``, ``"gsam"``,
    ``"looksam"``, ``"momentum_sam"``, ``"friendly_sam"``, ``"wsam"``, ``"rwp"``, ``"arwp"``, ``"esam"``,
    ``"flat_lora"``, ``"gam"``, ``"bsam"``, and any variant registered since) or one of its classes'
    ``aliases`` (case and ``-``/``_`` do not matter: ``"msam"``, ``"F-SAM"``, ``"m-RWP"``, ``"Flat-LoRA"``,
    ``"bayesian-sam"``, ...). ``"bsam"`` needs ``num_data`` and a ``torch.optim.SGD`` with ``momentum=0``,
    ``weight_decay=0`` as ``optimizer`` (it computes its own update).
    ``knobs`` are the variant's keywords (``rho``, ``k``, ``alpha``, ...; missing ones take the
    variant's own defaults); an unknown one raises :class:`~sharpguard.errors.ConfigurationError`.
    The same :class:`~sharpguard.optim.config.SAMConfig` path as every framework adapter.
    """
    config = SAMConfig(variant=variant, sync_perturbation=sync_perturbation, nonfinite=nonfinite, knobs=knobs)
    return config.build(optimizer, model=model)
