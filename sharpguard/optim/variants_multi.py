"""Re-exports of GAM and BSAM, now one module each in :mod:`sharpguard.optim.variants`."""

from .variants.bsam import BSAM
from .variants.gam import _GAM_EPS, GAM  # noqa: F401

__all__ = ["GAM", "BSAM"]
