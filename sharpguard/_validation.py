"""The one place where sharpguard checks settings: every front end (wrappers, callbacks, monitors,
adapters) validates through these functions, so a value is accepted or refused by the same rule
and with the same sentence everywhere.

Each function returns the normalised value or raises :class:`~sharpguard.errors.ConfigurationError`
with one sentence that says what is wrong and what to do, before anything is built or changed.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "shown",
    "checked",
    "optional",
    "flag",
    "seed",
    "choice",
    "between",
    "at_least",
    "probability",
    "module",
    "function",
    "flag_or",
    "anything",
    "generator",
    "bounds",
    "finite_numbers",
    "positive_numbers",
    "names",
    "optimizer",
    "batch",
    "on_alert",
    "alert_rules",
    "KNOBS",
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


def shown(value: Any, limit: int = 60) -> str:
    """``value`` for a message: its repr cut to ``limit`` characters, and its type."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def real(name: str, value: Any) -> float:
    """A finite real number (bools refused: ``True`` is not a radius; numpy scalars are numbers)."""
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, got {shown(value)}; pass a float such as 0.1.")
    return float(value)


def non_negative(name: str, value: Any, hint: str = "") -> float:
    value = real(name, value)
    if value < 0:
        raise ConfigurationError(f"{name} must be >= 0, got {value!r}{hint or '; pass 0 or a positive number'}.")
    return value


def positive(name: str, value: Any, hint: str = "") -> float:
    value = real(name, value)
    if value <= 0:
        raise ConfigurationError(f"{name} must be > 0, got {value!r}{hint or '; pass a positive number'}.")
    return value


def positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (``2.5``, ``2.0`` and ``True`` refused: a step count is a whole number; numpy
    integers are integers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {shown(value)}; pass a whole number such as 1.")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigurationError(f"{name} must be an integer >= 0, got {shown(value)}; pass a whole number such as 0.")
    return int(value)


def seed(name: str, value: Any) -> int:
    """A random seed: an integer in [0, 2**64) (``torch.Generator.manual_seed``'s range, ``torch.initial_seed()``'s
    too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**64:
        raise ConfigurationError(f"{name} must be an integer in [0, 2**64), got {shown(value)}; pass a seed such as 0.")
    return int(value)


def in_unit_interval(name: str, value: Any) -> float:
    value = real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{name} must lie in [0, 1], got {value!r}; pass a fraction between 0 and 1.")
    return value


probability = in_unit_interval


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str, Any], float]:
    """A rule: a finite real in the interval from ``low`` to ``high`` (open at either end on request)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def rule(name: str, value: Any) -> float:
        value = real(name, value)
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            raise ConfigurationError(f"{name} must lie in {left}{low:g}, {high:g}{right}, got {value!r}; pass a "
                                     "value inside it.")
        return value

    return rule


def flag(name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy bools too); ``"no"``, ``0`` and ``2.5`` refused: a string or a number
    is not a switch, and ``"no"`` would read as true."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if not isinstance(value, bool) and not numpy_bool:
        raise ConfigurationError(f"{name} must be True or False, got {shown(value)}; pass a bool.")
    return bool(value)


def choice(*names: Any) -> Callable[[str, Any], Any]:
    """A rule: one of ``names``."""

    def rule(name: str, value: Any) -> Any:
        return one_of(name, value, names)

    return rule


def optional(rule: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """A rule that also takes ``None`` (the default of an optional knob)."""

    def optional_rule(name: str, value: Any) -> Any:
        return None if value is None else rule(name, value)

    return optional_rule


def module(name: str, value: Any) -> Any:
    """A ``torch.nn.Module`` (checked by duck type, so the core imports nothing heavy here)."""
    if not (callable(value) and hasattr(value, "parameters") and hasattr(value, "named_modules")):
        raise ConfigurationError(f"{name} must be a torch.nn.Module, got {shown(value)}; pass the model itself.")
    return value


def function(name: str, value: Any) -> Any:
    """A callable."""
    if not callable(value):
        raise ConfigurationError(f"{name} must be callable, got {shown(value)}; pass a function (or leave it None).")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    choices = list(choices)
    try:
        known = value in choices
    except TypeError:  # an unhashable or incomparable value is no choice
        known = False
    if not known or isinstance(value, bool) and not any(c is value for c in choices):
        raise ConfigurationError(
            f"{name} must be one of {', '.join(map(repr, choices))}, got {shown(value)}."
        )
    return value


def checked(**overrides: Callable[[str, Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Check a function's (or ``__init__``'s) arguments before its body runs, so that a bad value is
    refused before anything changes: each argument by the rule :data:`KNOBS` gives its name, or by
    ``overrides`` (argument name -> rule) where the name means something else here (``rho`` of APGD is
    a fraction, ``rho`` of SAM a radius). Only values the caller passed are checked (defaults are valid
    by construction); ``None`` passes where it is the default or the annotation allows it; a name taken through
    ``**kwargs`` is checked by an override only (what such a name means is up to the callee it goes to, which checks
    it itself). The signature is kept (``inspect.signature`` follows ``__wrapped__``)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        # None passes where it is the default or the annotation allows it (``bounds: tuple | None = (0, 1)``)
        nullable = {
            p.name for p in sig.parameters.values()
            if p.default is None or "None" in str(p.annotation) or "Optional" in str(p.annotation)
        }

        def rule_for(name: str) -> Callable[[str, Any], Any] | None:
            return overrides[name] if name in overrides else KNOBS.get(name)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                arguments = sig.bind_partial(*args, **kwargs).arguments
            except TypeError:
                return fn(*args, **kwargs)  # Python's own message for a wrong call
            given = [(k, v, rule_for(k)) for k, v in arguments.items() if k != var_kw]
            if var_kw:
                given += [(k, v, overrides.get(k)) for k, v in arguments.get(var_kw, {}).items()]
            for name, value, rule in given:
                if rule is None or (value is None and name in nullable):
                    continue
                rule(name, value)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


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


#: a decay rate or a moment coefficient: 1 would never forget
below_one = between(0.0, 1.0, high_open=True)


def at_least(low: float) -> Callable[[str, Any], float]:
    """A rule: a finite real >= ``low``."""

    def rule(name: str, value: Any) -> float:
        value = real(name, value)
        if value < low:
            raise ConfigurationError(f"{name} must be >= {low:g}, got {value!r}; pass a value of at least {low:g}.")
        return value

    return rule


def generator(name: str, value: Any) -> Any:
    """A ``torch.Generator``."""
    import torch

    if not isinstance(value, torch.Generator):
        raise ConfigurationError(f"{name} must be a torch.Generator, got {shown(value)}; pass "
                                 "torch.Generator(device).manual_seed(0).")
    return value


def _numbers(name: str, value: Any, what: str) -> list[float]:
    """The elements of a sequence of finite numbers (tensors' elements too)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{name} must be {what}, got {shown(value)}.")
    out = []
    for v in value:
        if isinstance(v, bool) or isinstance(v, (str, bytes)):
            raise ConfigurationError(f"{name} must be {what}, got {shown(value)}.")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{name} must be {what}, got {shown(value)}.") from None
        if not math.isfinite(f):
            raise ConfigurationError(f"{name} must be {what}, got {shown(value)}.")
        out.append(f)
    return out


def bounds(name: str, value: Any) -> Any:
    """``(low, high)``: two finite numbers, ``low < high``."""
    pair = _numbers(name, value, "(low, high), two finite numbers with low < high, or None")
    if len(pair) != 2 or not pair[0] < pair[1]:
        raise ConfigurationError(f"{name} must be (low, high), two finite numbers with low < high, got {shown(value)}.")
    return value


def finite_numbers(name: str, value: Any) -> Any:
    """A sequence of finite numbers (a per-channel mean)."""
    _numbers(name, value, "a sequence of finite numbers, one per channel")
    return value


def positive_numbers(name: str, value: Any) -> Any:
    """A sequence of finite numbers > 0 (a per-channel standard deviation)."""
    if any(v <= 0 for v in _numbers(name, value, "a sequence of finite numbers > 0, one per channel")):
        raise ConfigurationError(f"{name} must hold numbers > 0 (one per channel), got {shown(value)}.")
    return value


def names(name: str, value: Any) -> Any:
    """A name or a sequence of names."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"{name} must be a list of names, got {shown(value)}.")
    return value


def anything(name: str, value: Any) -> Any:
    """No rule: the function checks this argument itself, later in an order that matters."""
    return value


def flag_or(*names: str) -> Callable[[str, Any], Any]:
    """A rule: ``True``, ``False`` or one of ``names`` (``random_start=True`` or ``"normal"``)."""

    def rule(name: str, value: Any) -> Any:
        if isinstance(value, bool) or value in names:
            return value
        raise ConfigurationError(
            f"{name} must be True, False or one of {', '.join(map(repr, names))}, got {shown(value)}."
        )

    return rule


def optimizer(name: str, value: Any) -> Any:
    """An optimizer: anything with ``param_groups`` (a torch optimizer, a SAM wrapper, a framework's wrapper)."""
    try:
        groups = value.param_groups
    except Exception:  # noqa: BLE001 - any failure to read them means: not an optimizer
        groups = None
    if not isinstance(groups, list):
        raise ConfigurationError(f"{name} must be a torch optimizer (with param_groups), got {shown(value)}.")
    return value


def batch(name: str, value: Any) -> Any:
    """One batch: ``(inputs, targets, ...)`` or a mapping of tensors."""
    if isinstance(value, Mapping) or (isinstance(value, (tuple, list)) and len(value) > 0):
        return value
    raise ConfigurationError(
        f"{name} must be one batch, (inputs, targets) or a mapping of tensors, got {shown(value)}."
    )


def on_alert(name: str, value: Any) -> Any:
    """``"warn"``, ``"stop"``, ``"ignore"``, a callable, or a sequence of these."""
    actions = [value] if isinstance(value, str) or callable(value) else value
    if not isinstance(actions, (list, tuple)) or not actions:
        raise ConfigurationError(
            f"{name} must be 'warn', 'stop', 'ignore', a callable or a list of these, got {shown(value)}."
        )
    for action in actions:
        if not callable(action) and action not in ("warn", "stop", "ignore"):
            raise ConfigurationError(f"{name} must be 'warn', 'stop', 'ignore' or a callable, got {shown(action)}.")
    return value


def alert_rules(name: str, value: Any) -> Any:
    """``"default"``, ``None`` or an iterable of alert rules."""
    if value is None or value == "default":
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{name} must be 'default', None or a list of AlertRule, got {shown(value)}.")
    return value


# The rule of each knob name, wherever it appears (checked() applies them; a function overrides a name
# that means something else there).
KNOBS: dict[str, Callable[[str, Any], Any]] = {
    # structure
    "model": module,
    "loss_fn": function,
    "output_fn": function,
    "on_step": function,
    # switches
    **{
        name: flag
        for name in (
            "train", "check_determinism", "adaptive", "cache_graph", "distributed", "ignore_bias_bn",
            "return_eigenvectors", "per_batch", "check_range", "targeted", "eps_schedule", "rescale_schedule",
            "sync_perturbation", "decouple", "warm_start", "reuse", "grad_align", "enabled", "is_rank_zero",
            "prog_bar", "keep_bn_stats", "sharded", "log", "per_worker",
        )
    },
    "optimizer": optimizer,
    "batch": batch,
    "generator": generator,
    "bounds": bounds,
    "mean": finite_numbers,
    "std": positive_numbers,
    "measures": names,
    "random_start": flag_or("uniform", "normal"),
    "model_mode": choice("eval", "train", "keep"),
    "attack_mode": choice("eval", "train", "keep"),
    "on_alert": on_alert,
    "alerts": alert_rules,
    # seeds
    "seed": seed,
    # counts >= 1
    **{
        name: positive_int
        for name in (
            "steps", "restarts", "n_target_classes", "n_queries", "max_iter", "n_hvp", "n_iter", "n_v", "n_grid",
            "n_samples", "attack_steps", "n_curvature", "n_examples", "max_hvp", "patience", "clear_patience", "k",
            "interval", "every", "max_examples", "n_power_iterations", "levels", "num_examples", "num_data",
            "n_params", "dtype_bytes", "probe_batches", "max_basis", "every_n_steps", "min_every", "max_every",
            "probe_size", "probe_batch_size", "batch_size", "size",
        )
    },
    # counts >= 0
    **{
        name: non_negative_int
        for name in ("warmup", "start_step", "start_epoch", "end_epoch", "epochs_ago", "optimizer_state_vectors",
                     "first_step", "tail", "probe_state_max_bytes")
    },
    # positive reals
    **{
        name: positive
        for name in ("tol", "epsilon", "temperature", "factor", "fd_eps", "step_seconds", "span", "tiny")
    },
    # non-negative reals
    **{
        name: non_negative
        for name in ("eps", "rho", "eta", "sigma", "alpha", "lam", "weight", "init_mag", "max_norm",
                     "step_size", "damping", "s_init", "weight_decay", "rho_norm", "gamma", "rise", "threshold",
                     "clear_below", "step_peak_bytes", "budget", "alpha_max")
    },
    # fractions
    **{name: probability for name in ("drop", "p_init", "lmbda", "momentum")},
    **{name: below_one for name in ("beta1", "beta2", "beta3", "decay")},
}
