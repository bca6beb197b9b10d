"""The one place where sharpguard checks settings: every front end (wrappers, callbacks, monitors,
adapters) validates through these functions, so a value is accepted or refused by the same rule
and with the same sentence everywhere.

Each function returns the normalised value or raises :class:`~sharpguard.errors.ConfigurationError`
with one sentence that says what is wrong and what to do, before anything is built or changed.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "real",
    "non_negative",
    "positive",
    "positive_int",
    "non_negative_int",
    "in_unit_interval",
    "one_of",
    "check_keywords",
    "keywords_of",
]


def real(name: str, value: Any) -> float:
    """A finite real number (bools refused: ``True`` is not a radius; numpy scalars are numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def non_negative(name: str, value: Any, hint: str = "") -> float:
    value = real(name, value)
    if value < 0:
        raise ConfigurationError(f"{name} must be >= 0, got {value!r}{hint}.")
    return value


def positive(name: str, value: Any, hint: str = "") -> float:
    value = real(name, value)
    if value <= 0:
        raise ConfigurationError(f"{name} must be > 0, got {value!r}{hint}.")
    return value


def positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (``2.5``, ``2.0`` and ``True`` refused: a step count is a whole number; numpy
    integers are integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigurationError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def in_unit_interval(name: str, value: Any) -> float:
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{name} must lie in [0, 1], got {value!r}.")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def keywords_of(fn: Callable[..., Any], *, exclude: Iterable[str] = ("self",)) -> list[str]:
    """The keyword names ``fn`` accepts (``self``, ``*args`` and ``**kwargs`` left out)."""
    skip = set(exclude)
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def check_keywords(
    owner: str,
    given: Mapping[str, Any] | Iterable[str],
    allowed: Iterable[str],
    hint: str = "",
    *,
    suggest_from: Iterable[str] | None = None,
) -> None:
    """Refuse keywords ``owner`` does not take, naming the closest valid one (``varient`` -> ``variant``).

    ``suggest_from``: the names to suggest from, when they are more than ``allowed`` (a front end
    that also takes run settings besides the variant's knobs).
    """
    allowed = list(allowed)
    unknown = sorted(set(given) - set(allowed))
    if not unknown:
        return
    candidates = list(suggest_from) if suggest_from is not None else allowed
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, candidates, n=1)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise ConfigurationError(
        f"{owner} has no setting {', '.join(parts)}; its settings are {', '.join(allowed) or 'none'}{hint}."
    )
