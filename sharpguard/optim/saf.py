"""Moved to :mod:`sharpguard.regularizers.saf` (a loss term, not an optimizer wrapper); kept so old imports work."""

from ..regularizers.saf import SAF

__all__ = ["SAF"]
