"""Moved to :mod:`sharpguard.regularizers.mesa` (a loss term, not an optimizer wrapper); kept so old imports work."""

from ..regularizers.mesa import MESA

__all__ = ["MESA"]
