"""Exceptions raised by sharpguard.

Every error is raised *before* anything is changed (weights, gradients, buffers, modes), with one
sentence that says what is wrong and what to do.
"""

from __future__ import annotations


class SharpGuardError(Exception):
    """Base class of sharpguard's own errors."""


class ConfigurationError(SharpGuardError, ValueError):
    """A setting is invalid (negative rho, an empty probe set, an unsupported strategy, ...)."""


class CheckpointError(ConfigurationError):
    """A checkpoint part sharpguard needs to resume is missing, torn, unreadable or holds code."""


class NonFiniteLossError(SharpGuardError, FloatingPointError):
    """A loss used for a measurement or a perturbation was NaN or infinite."""


class MissingDependencyError(SharpGuardError, ImportError):
    """An optional framework is not installed; the message names the extra to install."""


def require(module: str, extra: str):
    """Import ``module`` or raise a :class:`MissingDependencyError` naming ``pip install "sharpguard[extra]"``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by the integration tests' monkeypatching
        raise MissingDependencyError(
            f"{module!r} is not installed; install it with: pip install \"sharpguard[{extra}]\""
        ) from exc
