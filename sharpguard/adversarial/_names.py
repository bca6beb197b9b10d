"""How a training method is named and built by name: below :mod:`.factory`, which lists the methods, and
the methods that build another by name (AWP's base), so neither imports the other."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError

__all__ = ["build_method", "method_key"]

_ALIASES = {
    "pgdat": "pgd-at", "pgd": "pgd-at", "madry": "pgd-at", "at": "pgd-at",
    "fastat": "fast-at", "fgsm-rs": "fast-at", "fgsmrs": "fast-at", "fgsm-at": "fast-at",
    "distillation": "defensive-distillation", "defensivedistillation": "defensive-distillation",
    "embeddingpgd": "embedding-pgd", "pgd-embedding": "embedding-pgd",
    "free": "free-at", "freeat": "free-at", "free-adversarial-training": "free-at",
    "fgsm-grad-align": "grad-align",
}


def method_key(name: str) -> str:
    """The canonical name of a method: lowercase, ``_`` and spaces as ``-``, aliases resolved."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    return _ALIASES.get(key, key)


def build_method(key: str, cls: type, settings: dict[str, Any]) -> Any:
    """``cls(**settings)``, with an unknown keyword turned into one sentence naming the method."""
    try:
        return cls(**settings)
    except TypeError as exc:  # an unknown keyword: say which method refused it
        raise ConfigurationError(f"{key}: {exc}") from None
