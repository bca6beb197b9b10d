"""The SAM variants, one module each; importing this package registers every one of them.

Each module defines one :class:`~sharpguard.optim.SAM` subclass (``rwp`` two: m-RWP and m-ARWP) that declares
its name, its knobs (the keyword signature of its ``_configure``) and what it changes in the step; the class
registers itself (:mod:`sharpguard.optim.registry`). A module added to this folder is imported here without
an edit, so :func:`~sharpguard.optim.make_sam`, :class:`~sharpguard.optim.SAMConfig` and every framework
front end know its variant by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._shared import _ratio  # noqa: F401 (the sharded variants use it)
from .gsam import GSAM
from .looksam import LookSAM
from .momentum import MomentumSAM
from .friendly import FriendlySAM
from .wsam import WSAM
from .rwp import ARWP, RWP
from .esam import ESAM
from .flat_lora import FlatLoRA, lora_layers, lora_parameters
from .gam import GAM
from .bsam import BSAM

__all__ = [
    "GSAM", "LookSAM", "MomentumSAM", "FriendlySAM", "WSAM", "RWP", "ARWP", "ESAM", "FlatLoRA", "GAM", "BSAM",
    "lora_parameters", "lora_layers",
]


def _import_the_other_variant_modules() -> list[str]:
    """Import every module of this folder not imported above; return the public names they define."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            if name not in globals():
                globals()[name] = getattr(module, name)
                names.append(name)
    return names


__all__ += _import_the_other_variant_modules()
