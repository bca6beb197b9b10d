"""Re-exports of WSAM, RWP, ARWP and ESAM, now one module each in :mod:`sharpguard.optim.variants`."""

from .variants._shared import _ratio, _seed  # noqa: F401
from .variants.esam import ESAM
from .variants.rwp import ARWP, RWP
from .variants.wsam import WSAM

__all__ = ["WSAM", "RWP", "ARWP", "ESAM"]
