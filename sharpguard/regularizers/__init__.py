"""Loss terms that train toward flat minima without wrapping the optimizer.

:class:`MESA` (an EMA teacher's outputs as a trajectory loss) and :class:`SAF` (stored outputs of
earlier epochs), Du et al., NeurIPS 2022, arXiv:2205.14083; :class:`SharpnessDataSelection`, ESAM's
reducer of per-example losses (Du et al., ICLR 2022, Sec. 3.2). Each is added to the loss the user
already computes, in any front end; usage in ``docs/cheap_sam.md``.
"""

from .data_selection import DEFAULT_GAMMA, SharpnessDataSelection
from .mesa import MESA
from .saf import SAF

__all__ = ["MESA", "SAF", "SharpnessDataSelection", "DEFAULT_GAMMA"]
