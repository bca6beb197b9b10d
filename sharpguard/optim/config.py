"""One SAM configuration, given by name, validated once, built the same way by every front end.

``make_sam``, the Lightning callback, ``SharpGuardTrainer(sam=...)`` and the Accelerate helper all
normalise what the user wrote into a :class:`SAMConfig` and call :meth:`SAMConfig.build`, so a
variant's knobs and defaults come from one declaration (``SAM.knob_defaults()``: the keyword
signature of the variant's ``_configure``) and are checked by one rule, when the object is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .._validation import check_keywords, one_of
from .._validation import flag
from ..errors import ConfigurationError
from .registry import VARIANTS, canonical_variant
from .sam import NONFINITE_POLICIES, SAM
from .sharded import ShardedASAM, ShardedGAM, ShardedGSAM, ShardedLookSAM, ShardedSAM

__all__ = ["SAMConfig"]

#: the settings every variant takes besides its knobs (how it runs, not what it computes)
RUN_SETTINGS = ("variant", "sync_perturbation", "nonfinite")

#: the variants that run on sharded (FSDP) parameters (:mod:`sharpguard.optim.sharded`)
SHARDED_VARIANTS = ("sam", "asam", "gsam", "looksam", "gam")


@dataclass
class SAMConfig:
    """Which SAM variant to run, with which knobs.

    ``variant``: a name of :data:`~sharpguard.optim.VARIANTS` (aliases accepted). ``rho``: the
    radius; ``None`` takes the variant's own default (SAM 0.05, ASAM 0.5, Momentum-SAM 0.3);
    ``0`` is allowed and reproduces the base optimizer. ``sync_perturbation``: one perturbation for
    all workers (all-reduced clean gradient) instead of each worker's own. ``nonfinite``: the fault
    policy of :class:`~sharpguard.optim.SAM`. ``knobs``: the variant's other keywords.
    Everything is validated here, before any training object exists.
    """

    variant: str = "sam"
    rho: float | None = None
    sync_perturbation: bool = False
    nonfinite: str = "skip"
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.variant = canonical_variant(self.variant)
        one_of("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        flag("sync_perturbation", self.sync_perturbation)
        cls = VARIANTS[self.variant]
        declared = cls.knob_defaults()
        knobs = dict(self.knobs)
        if "rho" in knobs:
            if self.rho is not None:
                raise ConfigurationError("rho is given twice (rho= and in knobs); give it once.")
            self.rho = knobs.pop("rho")
        check_keywords(
            f"SAM variant {self.variant!r}", knobs, [k for k in declared if k != "rho"],
            " (and rho, sync_perturbation, nonfinite)",
            suggest_from=[*declared, *RUN_SETTINGS, "per_worker", "keep_bn_stats", "resume", "adaptive"],
        )
        self.knobs = knobs
        cls.validate_knobs(**self.resolved_knobs())  # the variant's own rules: bad values fail now, not at fit

    @classmethod
    def coerce(cls, value: SAMConfig | Mapping[str, Any] | bool | float | str) -> SAMConfig:
        """Accept a :class:`SAMConfig`, a mapping of keywords (``variant`` included), a variant name,
        ``True`` (defaults) or a number (``rho``)."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, str):
            return cls(variant=value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(rho=float(value))
        if isinstance(value, Mapping):
            kw = dict(value)
            known = {k: kw.pop(k) for k in ("variant", "rho", *RUN_SETTINGS) if k in kw}
            return cls(**known, knobs={**kw.pop("knobs", {}), **kw})
        raise ConfigurationError(
            f"sam= must be a mapping of SAM keywords (e.g. {{'rho': 0.05, 'variant': 'asam'}}), a variant name or a "
            f"SAMConfig, got {type(value).__name__}."
        )

    def resolved_knobs(self) -> dict[str, Any]:
        """Every knob of the variant with its value: the user's, else the variant's default."""
        knobs = VARIANTS[self.variant].knob_defaults()
        knobs.update(self.knobs)
        if self.rho is not None:
            knobs["rho"] = self.rho
        return knobs

    def build(self, optimizer: Optimizer, *, model: nn.Module | None = None, sharded: bool = False) -> Any:
        """The variant around ``optimizer`` (a torch optimizer you already built).

        ``sharded``: the parameters are FSDP shards; SAM, ASAM, GSAM, LookSAM and GAM run on them (their
        updates are elementwise once the norms and inner products, all-reduced over the shards, are
        known); the others keep unsharded state and are refused.
        """
        knobs = self.resolved_knobs()
        if sharded:
            if self.variant not in SHARDED_VARIANTS:
                raise ConfigurationError(
                    "sharded (FSDP) training supports variant 'sam', 'asam', 'gsam', 'looksam' or 'gam', got "
                    f"{self.variant!r}: the other variants keep unsharded state; use DDP for them."
                )
            adaptive = self.variant == "asam" or bool(knobs.get("adaptive", False))
            if self.variant == "gsam":
                return ShardedGSAM(optimizer, knobs["rho"], knobs["alpha"], adaptive=adaptive, nonfinite=self.nonfinite)
            if self.variant == "gam":
                gam = {k: knobs[k] for k in ("rho_norm", "beta1", "beta2", "beta3", "gamma")}
                return ShardedGAM(optimizer, knobs["rho"], **gam, adaptive=adaptive, nonfinite=self.nonfinite)
            if self.variant == "looksam":
                return ShardedLookSAM(
                    optimizer, knobs["rho"], knobs["k"], knobs["alpha"], adaptive=adaptive, nonfinite=self.nonfinite
                )
            if self.variant == "asam":
                return ShardedASAM(optimizer, nonfinite=self.nonfinite, **knobs)
            return ShardedSAM(optimizer, nonfinite=self.nonfinite, **knobs)
        return VARIANTS[self.variant].wrap(
            optimizer, model=model, sync_perturbation=self.sync_perturbation, nonfinite=self.nonfinite, **knobs
        )

    def describe(self) -> str:
        """One line for the console: variant, knobs and passes per step (the variant's own ``cost``)."""
        knobs = self.resolved_knobs()
        cls: type[SAM] = VARIANTS[self.variant]
        forwards, _ = cls._cost_of(cls.validate_knobs(**knobs))  # the variant's cost, without building anything
        listed = ", ".join(f"{k}={v}" for k, v in knobs.items())
        return f"{cls.__name__}({listed}): {forwards:g} forward/backward passes per step"
