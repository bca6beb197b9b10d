"""SAM-family optimizer wrappers around one foreach perturbation kernel (:mod:`.functional`).

``SAM`` / ``ASAM`` (:mod:`.sam`), one module per variant in :mod:`.variants` (each registers its name in
:mod:`.registry`), and :func:`make_sam` / :class:`SAMConfig` to build any of them by name.
Usage, the adapter protocol and comparisons with other libraries: ``docs/optim.md``.
"""

from .config import SAMConfig
from .engine import SAMEngine, unwrap_optimizer
from .factory import VARIANTS, make_sam
from .sam import ASAM, SAM
from . import variants as _variants
from .variants import (
    ARWP, BSAM, ESAM, GAM, GSAM, RWP, WSAM, FlatLoRA, FriendlySAM, LookSAM, MomentumSAM, lora_parameters,
)

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


# a variant module added to optim/variants/ is importable from here too, without an edit
__all__ += [name for name in _variants.__all__ if name not in __all__ and name != "lora_layers"]
globals().update(
    {name: getattr(_variants, name) for name in __all__ if name not in globals() and name not in _MOVED_TO_REGULARIZERS}
)
