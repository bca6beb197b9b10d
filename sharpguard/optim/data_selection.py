"""Moved to :mod:`sharpguard.regularizers.data_selection` (a reducer of per-example losses, not an optimizer
wrapper); kept so old imports work."""

from ..regularizers.data_selection import DEFAULT_GAMMA, SharpnessDataSelection

__all__ = ["DEFAULT_GAMMA", "SharpnessDataSelection"]
