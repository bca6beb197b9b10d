"""The SAM variants by name, filled by the classes themselves.

A class that declares its own ``variant`` name (and optionally ``aliases``) registers itself when it is
defined (``SAM.__init_subclass__`` calls :func:`register`); :data:`VARIANTS` and
:func:`canonical_variant` read that one table, so :func:`~sharpguard.optim.make_sam`,
:class:`~sharpguard.optim.SAMConfig` and every framework front end know a variant as soon as its module is
imported (``sharpguard.optim.variants`` imports every variant module). This module imports nothing of
``optim``: the classes come to it.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError

__all__ = ["VARIANTS", "canonical_variant", "register", "unregister"]

#: canonical variant name -> class, in the order the classes were defined
VARIANTS: dict[str, type[Any]] = {}

#: normalised alias -> canonical variant name
_ALIASES: dict[str, str] = {}


def _normalised(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register(cls: type[Any]) -> None:
    """Enter ``cls`` under its own ``variant`` name and its ``aliases``.

    Only a class whose body declares ``variant`` is entered (a subclass that keeps its parent's name is a
    customisation, not a new variant). Defining a class again (a module reloaded) replaces its entry; a
    name that another class already holds is refused.
    """
    if "variant" not in vars(cls):
        return
    name = _normalised(cls.variant)
    if name != cls.variant:
        raise ConfigurationError(
            f"{cls.__name__}.variant must be a lower-case name with '_' for spaces, got {cls.variant!r}; "
            f"write {name!r}."
        )
    names = [name, *(_normalised(a) for a in vars(cls).get("aliases", ()))]
    for key in names:
        holder = VARIANTS.get(key) or VARIANTS.get(_ALIASES.get(key, ""))
        if holder is not None and not _same_class(holder, cls):
            raise ConfigurationError(
                f"SAM variant name {key!r} of {cls.__qualname__} is taken by {holder.__qualname__}; "
                "choose another name, or unregister the other class first."
            )
    VARIANTS[name] = cls
    for alias in names[1:]:
        _ALIASES[alias] = name


def _same_class(a: type[Any], b: type[Any]) -> bool:
    """The same class definition (a reloaded module defines a new object for the same class)."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def unregister(variant: str | type[Any]) -> None:
    """Remove a variant (by name or class) and its aliases from the registry."""
    name = variant.variant if isinstance(variant, type) else canonical_variant(variant)
    VARIANTS.pop(name, None)
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def canonical_variant(variant: str) -> str:
    """The key of ``variant`` in :data:`VARIANTS` (case, ``-``/``_`` and aliases normalised), or a
    :class:`~sharpguard.errors.ConfigurationError` naming the choices."""
    key = _normalised(variant)
    key = _ALIASES.get(key, key)
    if key not in VARIANTS:
        raise ConfigurationError(f"unknown SAM variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    return key
