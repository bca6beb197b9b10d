"""Pick the Lightning namespace the callbacks subclass: ``pytorch_lightning`` or ``lightning.pytorch``.

Lightning ships the same code under two names, and mixing objects of the two raises inside Lightning
(``_check_mixed_imports``). The choice, in order:

1. the environment variable ``SHARPGUARD_LIGHTNING`` (``"pytorch_lightning"`` or ``"lightning"``);
2. the one namespace already imported by the program (``import lightning as L`` before importing
   sharpguard's callbacks selects ``lightning.pytorch``);
3. ``pytorch_lightning`` (the package the ``sharpguard[lightning]`` extra installs), else
   ``lightning.pytorch``.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from sharpguard.errors import ConfigurationError, MissingDependencyError

_NAMES = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch",
          "lightning.pytorch": "lightning.pytorch"}


def _candidates() -> list[str]:
    chosen = os.environ.get("SHARPGUARD_LIGHTNING")
    if chosen:
        if chosen not in _NAMES:
            raise ConfigurationError(
                f"SHARPGUARD_LIGHTNING={chosen!r} is not understood; use 'pytorch_lightning' or 'lightning'."
            )
        return [_NAMES[chosen]]
    imported = [name for name in ("pytorch_lightning", "lightning.pytorch") if name in sys.modules]
    if len(imported) == 1:
        return imported + [n for n in ("pytorch_lightning", "lightning.pytorch") if n not in imported]
    return ["pytorch_lightning", "lightning.pytorch"]


def load() -> ModuleType:
    """Import and return the chosen Lightning namespace, or raise :class:`MissingDependencyError`."""
    for name in _candidates():
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(
        "PyTorch Lightning is not installed; install it with: pip install \"sharpguard[lightning]\""
    )


pl = load()
NAMESPACE = pl.__name__
