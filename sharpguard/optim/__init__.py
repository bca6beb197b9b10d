"""SAM-family optimizer wrappers around one foreach perturbation kernel (:mod:`.functional`).

``SAM`` / ``ASAM`` (:mod:`.sam`), ``GSAM`` / ``LookSAM`` / ``MomentumSAM`` / ``FriendlySAM``
(:mod:`.variants`), and :func:`make_sam` to build any of them around an existing optimizer.
Usage, the adapter protocol and comparisons with other libraries: ``docs/optim.md``.
"""

from .config import SAMConfig
from .engine import SAMEngine, unwrap_optimizer
from .factory import VARIANTS, make_sam
from .sam import ASAM, SAM
from .variants import FriendlySAM, GSAM, LookSAM, MomentumSAM
from .lora import FlatLoRA, lora_parameters
from .variants_extra import ARWP, ESAM, RWP, WSAM
from .variants_multi import BSAM, GAM

__all__ = [
    "SAM", "ASAM", "GSAM", "LookSAM", "MomentumSAM", "FriendlySAM", "make_sam", "VARIANTS",
    "SAMConfig", "SAMEngine", "unwrap_optimizer",
]
__all__ += ["WSAM", "RWP", "ARWP", "ESAM", "FlatLoRA", "lora_parameters", "MESA"]
__all__ += ["GAM", "BSAM", "SharpnessDataSelection", "SAF"]


#: loss terms that moved to :mod:`sharpguard.regularizers`, still importable from here; resolved on first use
#: so that this package never imports the one above it (the regularizers read :mod:`._phase`)
_MOVED_TO_REGULARIZERS = ("MESA", "SAF", "SharpnessDataSelection")


def __getattr__(name: str) -> object:
    if name in _MOVED_TO_REGULARIZERS:
        from .. import regularizers

        return getattr(regularizers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
