"""Threat models: the norm ball, the valid input range and the input normalization, declared once.

Attacks run in *pixel space*: ``eps``, ``alpha`` and ``bounds`` are in the units of the raw input
(``[0, 1]`` images by default). When the data are normalized outside the model
(``x = (pixels - mean) / std``), declare ``mean`` and ``std``: an attack then maps its input to pixel
space, perturbs there, and feeds ``(u - mean) / std`` to the model, returning an adversarial batch
in the same (normalized) space it was given. When the model normalizes inside, declare nothing.
One declaration, so the de-normalize-then-normalize-again mistake (torchattacks #188) cannot occur.

Random starts draw from a ``torch.Generator`` of their own, never from the global RNG, so a
monitor that attacks the model leaves the training run's random stream untouched.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigurationError
from . import geometry
from .. import _validation as rules

__all__ = ["ThreatModel", "default_generator", "make_generator"]

_NORMS = ("linf", "l2", "l1")


def _as_floats(name: str, value: float | Sequence[float] | torch.Tensor | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    elif isinstance(value, (int, float)):
        value = [value]
    out = tuple(float(v) for v in value)
    if not out:
        raise ConfigurationError(f"{name} is empty; pass one value per input channel (or a single value).")
    return out


@dataclass(frozen=True)
class ThreatModel:
    """An ``eps`` ball in the ``norm`` (``"linf"``, ``"l2"`` or ``"l1"``) around each input, inside ``bounds``.

    The l1 ball is attacked by :func:`~sharpguard.attacks.apgd` / :func:`~sharpguard.attacks.apgd_targeted`
    (l1-APGD) and :func:`~sharpguard.attacks.fab_targeted`; PGD, FGSM and Square take linf and l2.

    ``bounds=None`` means the input range is unbounded (features, logits). ``mean``/``std`` are per
    channel (dimension 1 of the input) and describe a normalization applied *outside* the model.
    """

    norm: str = "linf"
    eps: float = 8 / 255
    bounds: tuple[float, float] | None = (0.0, 1.0)
    mean: tuple[float, ...] | None = field(default=None)
    std: tuple[float, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        norm = str(self.norm).lower().replace("_", "")
        norm = {"inf": "linf", "infinity": "linf", "l_inf": "linf", "2": "l2", "1": "l1"}.get(norm, norm)
        if norm not in _NORMS:
            raise ConfigurationError(f"norm must be 'linf', 'l2' or 'l1', got {self.norm!r}.")
        object.__setattr__(self, "norm", norm)
        rules.real("eps", self.eps)
        eps = float(self.eps)
        if not math.isfinite(eps) or eps < 0:
            raise ConfigurationError(f"eps must be a finite number >= 0, got {self.eps}.")
        object.__setattr__(self, "eps", eps)
        if self.bounds is not None:
            rules.bounds("bounds", self.bounds)
            lo, hi = (float(b) for b in self.bounds)
            if not lo < hi:
                raise ConfigurationError(f"bounds must be (low, high) with low < high, got {self.bounds}.")
            object.__setattr__(self, "bounds", (lo, hi))
        mean, std = _as_floats("mean", self.mean), _as_floats("std", self.std)
        if (mean is None) != (std is None):
            raise ConfigurationError("declare both mean and std for a normalized input, or neither.")
        if std is not None and any(not s > 0 for s in std):
            raise ConfigurationError(f"std must be positive in every channel, got {std}.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    # ----------------------------------------------------------------- normalization
    @property
    def normalized(self) -> bool:
        return self.mean is not None

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean is not None and self.std is not None
        channels = x.shape[1] if x.dim() > 1 else 1
        for name, stat in (("mean", self.mean), ("std", self.std)):
            if len(stat) not in (1, channels):
                raise ConfigurationError(
                    f"{name} has {len(stat)} values but the input has {channels} channels (dimension 1 of shape "
                    f"{tuple(x.shape)}); give one value per channel or a single value."
                )
        shape = [1] * x.dim()
        if x.dim() > 1:
            shape[1] = -1
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).reshape(shape)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).reshape(shape)
        return mean, std

    def to_pixel(self, x: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Map a batch as the model's caller sees it to pixel space; ``check`` raises if it lies outside ``bounds``.

        The range check reads two numbers back from the device (one synchronisation per call).
        """
        u = x
        if self.normalized:
            mean, std = self._stats(x)
            u = x * std + mean
        if self.bounds is not None and u.numel():
            if check:
                self.check_range(u, normalized=self.normalized)
            if self.normalized:  # undo the rounding of the round trip (a few ulp past a bound)
                u = u.clamp(*self.bounds)
        return u

    def from_pixel(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_pixel`: what the model (or its caller) consumes."""
        if not self.normalized:
            return u
        mean, std = self._stats(u)
        return (u - mean) / std

    def check_range(self, u: torch.Tensor, *, normalized: bool = False) -> None:
        """Raise if a pixel-space batch lies outside ``bounds`` (beyond rounding); a fake tensor
        (``FakeTensorMode``: a cost-only run) has no value to check."""
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(u):
            return
        lo, hi = self.bounds  # type: ignore[misc]
        tol = 1e-4 * (hi - lo)
        u_min, u_max = float(u.min()), float(u.max())
        if u_min < lo - tol or u_max > hi + tol or not (math.isfinite(u_min) and math.isfinite(u_max)):
            hint = (
                "check mean/std" if normalized
                else "if the inputs are normalized outside the model, declare mean= and std=; otherwise set bounds="
            )
            raise ConfigurationError(
                f"inputs span [{u_min:.4g}, {u_max:.4g}] in pixel space, outside the declared bounds ({lo}, {hi}); "
                f"{hint}."
            )

    # ----------------------------------------------------------------- geometry (pixel space)
    # The maths lives in .geometry (shared with the embedding attack, Square and the text methods).
    def _per_example_norm(self, t: torch.Tensor) -> torch.Tensor:
        return geometry.per_example_norm(t).to(t.dtype)

    def clamp(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.bounds is None else u.clamp(*self.bounds)

    def project(self, u: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Project ``u`` onto the ``eps`` ball around ``x0``, then clamp into ``bounds``.

        For l1 the projection is onto the intersection of the ball and the box (the two do not commute).
        """
        if self.norm == "l1":
            lower = upper = None
            if self.bounds is not None:
                lower, upper = self.bounds[0] - x0, self.bounds[1] - x0
            return self.clamp(x0 + geometry.project_l1_box(u - x0, self.eps, lower, upper))
        return self.clamp(x0 + geometry.project(u - x0, self.eps, self.norm))

    def require_norm(self, attack: str, norms: tuple[str, ...] = ("linf", "l2")) -> None:
        """Raise unless this threat model's norm is one ``attack`` supports."""
        if self.norm not in norms:
            raise ConfigurationError(
                f"norm must be one of {norms} for {attack}, got {self.norm!r}; the l1 threat model is attacked by "
                "apgd(norm='l1'), apgd_targeted(norm='l1') and fab_targeted(norm='l1')."
            )

    def ascent_step(self, u: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        """One steepest-ascent step of length ``alpha`` in the threat model's norm (sign step for linf)."""
        if self.norm == "linf":
            return u + alpha * grad.sign()
        self.require_norm("ascent_step")  # l1's steepest step is one coordinate: l1-APGD has its own sparse step
        # torchattacks.PGDL2's 1e-10 keeps a zero gradient at zero step and lets the two agree bitwise.
        return u + alpha * geometry.normalize_l2(grad, add=1e-10)

    def random_start(self, x0: torch.Tensor, generator: torch.Generator, kind: str = "uniform") -> torch.Tensor:
        """A random point of the ball around ``x0`` (clamped into bounds).

        ``"uniform"``: uniform in the ball (:func:`~sharpguard.attacks.geometry.random_in_ball`): for l2
        a Gaussian direction with radius ``eps * U^(1/d)`` (d = input size), uniform by volume, unlike
        a radius ``eps * U`` which piles points near the centre (torchattacks.PGDL2).
        ``"normal"``: ``x0 + 0.001 N(0, 1)`` as TRADES.
        """
        if kind == "normal":
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            return self.project(x0 + 0.001 * noise, x0)
        delta = geometry.random_in_ball(x0.shape, self.norm, self.eps, generator, device=x0.device, dtype=x0.dtype)
        return self.clamp(x0 + delta)


# ----------------------------------------------------------------------------- generators
def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@rules.checked()
def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` plus an offset per distributed rank.

    ``seed=None`` derives the seed from the global CPU RNG *state* (read, never advanced): the same
    training state gives the same random starts (reproducible after ``torch.manual_seed``), a
    monitor never shifts the training run's random stream, and each rank draws its own starts.
    """
    if seed is None:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # the CPU RNG state is a host value, also under FakeTensorMode
            state = torch.get_rng_state().numpy().tobytes()
        digest = hashlib.blake2b(state, digest_size=8).digest()
        seed = int.from_bytes(digest, "little")
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) + 0x5EED + 1_000_003 * _rank()) % (2**63 - 1))
    return gen


def default_generator(device: torch.device | str) -> torch.Generator:
    """The generator attacks use when none is passed: :func:`make_generator` with the seed taken from the RNG state."""
    return make_generator(device)
