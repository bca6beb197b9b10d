"""``make_method(name, **settings)``: build a training method by its lowercase name."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from ._names import build_method, method_key
from .base import AdversarialMethod
from .single_step import FreeAT, GradAlign
from .text import FGM, R3F, SMART, EmbeddingPGD, FreeLB
from .vision import AWP, MART, PGDAT, TRADES, DefensiveDistillation, FastAT

__all__ = ["make_method", "METHODS"]

METHODS: dict[str, type[AdversarialMethod]] = {
    "pgd-at": PGDAT,
    "trades": TRADES,
    "mart": MART,
    "fast-at": FastAT,
    "awp": AWP,
    "defensive-distillation": DefensiveDistillation,
    "fgm": FGM,
    "embedding-pgd": EmbeddingPGD,
    "freelb": FreeLB,
    "smart": SMART,
    "r3f": R3F,
    "free-at": FreeAT,
    "grad-align": GradAlign,
}


def make_method(name: str, **settings: Any) -> AdversarialMethod:
    """A method by name (``"pgd-at"``, ``"trades"``, ``"mart"``, ``"fast-at"``, ``"awp"``,
    ``"defensive-distillation"``, ``"fgm"``, ``"embedding-pgd"``, ``"freelb"``, ``"smart"``, ``"r3f"``,
    ``"free-at"``, ``"grad-align"``;
    case, ``_`` and spaces ignored), with the class's keyword settings."""
    key = method_key(name)
    cls = METHODS.get(key)
    if cls is None:
        raise ConfigurationError(f"unknown adversarial method {name!r}; choose one of {sorted(METHODS)}.")
    return build_method(key, cls, settings)
