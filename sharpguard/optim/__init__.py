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
from .mesa import MESA
from .data_selection import SharpnessDataSelection
from .saf import SAF
from .variants_extra import ARWP, ESAM, RWP, WSAM
from .variants_multi import BSAM, GAM

__all__ = [
    "SAM", "ASAM", "GSAM", "LookSAM", "MomentumSAM", "FriendlySAM", "make_sam", "VARIANTS",
    "SAMConfig", "SAMEngine", "unwrap_optimizer",
]
__all__ += ["WSAM", "RWP", "ARWP", "ESAM", "FlatLoRA", "lora_parameters", "MESA"]
__all__ += ["GAM", "BSAM", "SharpnessDataSelection", "SAF"]
