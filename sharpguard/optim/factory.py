"""Build any SAM variant around an optimizer instance by name (what the framework adapters call)."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from ..errors import ConfigurationError
from .sam import ASAM, SAM
from .variants import FriendlySAM, GSAM, LookSAM, MomentumSAM
from .lora import FlatLoRA
from .variants_extra import ARWP, ESAM, RWP, WSAM
from .variants_multi import BSAM, GAM
from .. import _validation as rules

__all__ = ["VARIANTS", "canonical_variant", "make_sam"]

#: canonical variant name -> class
VARIANTS: dict[str, type[SAM]] = {
    "sam": SAM,
    "asam": ASAM,
    "gsam": GSAM,
    "looksam": LookSAM,
    "momentum_sam": MomentumSAM,
    "friendly_sam": FriendlySAM,
    "wsam": WSAM,
    "rwp": RWP,
    "arwp": ARWP,
    "esam": ESAM,
    "flat_lora": FlatLoRA,
    "gam": GAM,
    "bsam": BSAM,
}

_ALIASES = {
    "look_sam": "looksam",
    "msam": "momentum_sam",
    "momentumsam": "momentum_sam",
    "fsam": "friendly_sam",
    "f_sam": "friendly_sam",
    "friendlysam": "friendly_sam",
    "m_rwp": "rwp",
    "mrwp": "rwp",
    "m_arwp": "arwp",
    "marwp": "arwp",
    "swp": "esam",
    "flatlora": "flat_lora",
    "b_sam": "bsam",
    "bayesian_sam": "bsam",
}


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

    ``variant`` is one of ``"sam"``, ``"asam"``, ``"gsam"``, ``"looksam"``, ``"momentum_sam"``,
    ``"friendly_sam"``, ``"wsam"``, ``"rwp"``, ``"arwp"``, ``"esam"``, ``"flat_lora"``, ``"gam"``, ``"bsam"``
    (case and ``-``/``_`` do not matter; ``"msam"``, ``"fsam"``, ``"F-SAM"``, ``"m-RWP"``, ``"m-ARWP"``,
    ``"Flat-LoRA"``, ``"b-SAM"`` and ``"bayesian-sam"`` are accepted). ``"bsam"`` needs ``num_data`` and a
    ``torch.optim.SGD`` with ``momentum=0``, ``weight_decay=0`` as ``optimizer`` (it computes its own update).
    ``knobs`` are the variant's keywords (``rho``, ``k``, ``alpha``, ...; missing ones take the
    variant's own defaults); an unknown one raises :class:`~sharpguard.errors.ConfigurationError`.
    The same :class:`~sharpguard.optim.config.SAMConfig` path as every framework adapter.
    """
    from .config import SAMConfig  # config imports this module

    config = SAMConfig(variant=variant, sync_perturbation=sync_perturbation, nonfinite=nonfinite, knobs=knobs)
    return config.build(optimizer, model=model)


def canonical_variant(variant: str) -> str:
    """The key of ``variant`` in :data:`VARIANTS` (case, ``-``/``_`` and aliases normalised), or a
    :class:`~sharpguard.errors.ConfigurationError` naming the choices."""
    key = str(variant).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in VARIANTS:
        raise ConfigurationError(f"unknown SAM variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    return key
