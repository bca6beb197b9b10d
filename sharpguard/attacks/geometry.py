"""Attack geometry, written once: per-example norms, steepest-ascent directions, projections onto
l2 / linf / l1 balls, and random starts uniform in the l2 and linf balls.

Every attack works on a batch ``t`` of shape ``(B, ...)``: "per example" means over everything but
dimension 0, and per-example scalars come back shaped ``(B, 1, ..., 1)`` so they broadcast against
``t``. Pixel attacks (:mod:`.gradient`, :mod:`.square`), the embedding attack (:mod:`.embedding`) and
the text training methods (:mod:`sharpguard.adversarial.text`) all call these functions, so an l2
ball, a projection or a random start means the same thing everywhere.

Half-precision inputs are widened to float32 for norms (fp16 norms overflow, FreeLB #8 in
docs/adversarial.md); a scale factor is computed in the wide dtype and applied in the input's dtype.
``mask`` (``(B, L)`` for ``(B, L, D)`` embeddings, 1 = real token) confines a direction or a random
start to the real tokens: padding is never perturbed.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = [
    "NORMS",
    "per_example_norm",
    "normalize_l2",
    "normalize_per_token",
    "ascent_direction",
    "project_l2",
    "project_linf",
    "project_l1",
    "project_l1_box",
    "project",
    "random_in_ball",
    "apply_mask",
]

NORMS = ("linf", "l2", "l1")


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _per_example_shape(t: torch.Tensor) -> tuple[int, ...]:
    return (t.shape[0],) + (1,) * (t.dim() - 1)


def apply_mask(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` zeroed where ``mask`` (the leading dimensions of ``t``, 1 = keep) is 0; ``mask=None``: ``t``."""
    if mask is None:
        return t
    return t * mask.reshape(tuple(mask.shape) + (1,) * (t.dim() - mask.dim())).to(t.dtype)


def per_example_norm(t: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """``||t_i||`` over all but dimension 0, shaped ``(B, 1, ..., 1)``, in float32 for half inputs (else
    ``t.dtype``)."""
    flat = _wide(t.flatten(1))
    if norm == "l2":
        values = torch.linalg.vector_norm(flat, dim=1)
    elif norm == "linf":
        values = flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    elif norm == "l1":
        values = flat.abs().sum(1)
    else:
        raise ConfigurationError(f"norm must be one of {NORMS}, got {norm!r}.")
    return values.reshape(_per_example_shape(t))


def normalize_l2(g: torch.Tensor, mask: torch.Tensor | None = None, *, add: float | None = None) -> torch.Tensor:
    """``g / ||g||_2`` per example (masked first); a zero gradient stays zero.

    The denominator is ``max(||g||, 1e-12)`` by default; ``add=c`` uses ``||g|| + c`` instead, the
    convention of torchattacks' PGDL2 (``c = 1e-10``), which the pixel PGD keeps to agree with it bitwise.
    """
    g = apply_mask(g, mask)
    n = per_example_norm(g)
    n = n + add if add is not None else n.clamp_min(1e-12)
    return (_wide(g) / n).to(g.dtype)


@rules.checked()
def normalize_per_token(g: torch.Tensor, mask: torch.Tensor | None = None, tiny: float = 1e-6) -> torch.Tensor:
    """``g / (||g||_inf + tiny)`` over the last dimension (SMART's per-token normalization, Jiang et al. 2020,
    Alg. 1)."""
    g = apply_mask(g, mask)
    return g / (g.abs().amax(dim=-1, keepdim=True) + tiny)


def ascent_direction(g: torch.Tensor, norm: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The steepest-ascent unit direction for a gradient ``g``: ``sign(g)`` (linf), ``g / ||g||_2`` (l2).

    (The l1 steepest direction is a single coordinate; l1-APGD uses its own sparse step instead.)
    """
    if norm == "linf":
        return apply_mask(g.sign(), mask)
    if norm == "l2":
        return normalize_l2(g, mask)
    raise ConfigurationError(f"ascent_direction takes norm 'linf' or 'l2', got {norm!r}.")


def project_linf(delta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the linf ball of radius ``eps`` (a scalar or a ``(B, 1, ..)`` tensor): clipping."""
    if isinstance(eps, torch.Tensor):
        return torch.maximum(torch.minimum(delta, eps), -eps)
    return delta.clamp(-eps, eps)


def project_l2(delta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the l2 ball of radius ``eps``: ``delta * min(1, eps / ||delta||_2)`` per example."""
    n = per_example_norm(delta)
    return delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0).to(delta.dtype)


def project_l1(delta: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the l1 ball of radius ``eps`` per example (Duchi et al., ICML 2008, Fig. 1).

    Points inside stay; a point outside becomes ``sign(v) * max(|v| - theta, 0)`` with ``theta`` the
    soft threshold that puts it on the sphere, found from the sorted magnitudes: ``rho`` is the
    largest ``j`` with ``mu_j > (sum_{r<=j} mu_r - eps) / j``, ``theta = (sum_{r<=rho} mu_r - eps) / rho``.
    """
    flat = _wide(delta.flatten(1))
    a = flat.abs()
    radius = eps if not isinstance(eps, torch.Tensor) else _wide(eps).reshape(-1, 1)
    mu = a.sort(dim=1, descending=True).values
    cumulative = mu.cumsum(dim=1) - radius
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    rho = ((mu - cumulative / j) > 0).to(flat.dtype).mul(j).amax(dim=1, keepdim=True).clamp_min(1)
    theta = cumulative.gather(1, rho.long() - 1) / rho
    inside = a.sum(1, keepdim=True) <= radius
    theta = torch.where(inside, torch.zeros_like(theta), theta.clamp_min(0))
    out = flat.sign() * (a - theta).clamp_min(0)
    return out.to(delta.dtype).reshape(delta.shape)


def project_l1_box(
    delta: torch.Tensor, eps: float, lower: torch.Tensor | None = None, upper: torch.Tensor | None = None
) -> torch.Tensor:
    """Euclidean projection of ``delta`` onto ``{d : ||d||_1 <= eps, lower <= d <= upper}`` per example.

    ``lower <= 0 <= upper`` (same shape as ``delta``) is the box that keeps ``x0 + d`` inside the input
    bounds (``bounds - x0``); ``None`` leaves that side open. This is the projection l1-APGD needs
    (Croce & Hein, ICML 2021, section 3.2): by the KKT conditions each coordinate is
    ``sign(v_i) * clip(|v_i| - theta, 0, cap_i)`` with ``cap_i`` the room the box leaves in the
    direction of ``v_i``, and ``theta >= 0`` the smallest value with ``sum_i |d_i| <= eps``. The sum is
    piecewise linear in ``theta`` with breakpoints ``|v_i| - cap_i`` and ``|v_i|``; they are sorted
    once and ``theta`` is read off the segment where the sum crosses ``eps`` (no iteration).
    """
    shape = delta.shape
    v = _wide(delta.flatten(1))
    a = v.abs()
    inf = torch.full_like(v, math.inf)
    up = inf if upper is None else _wide(upper.flatten(1)).clamp_min(0)
    low = inf if lower is None else (-_wide(lower.flatten(1))).clamp_min(0)
    cap = torch.where(v >= 0, up, low)
    kept = torch.minimum(a, cap)  # theta = 0: only the box acts
    total = kept.sum(1, keepdim=True)
    # Coordinate i shrinks for theta in [max(|v_i| - cap_i, 0), |v_i|): slope -1 there, 0 elsewhere.
    starts = (a - cap).clamp_min(0)
    points = torch.cat([starts, a], 1)
    steps = torch.cat([-torch.ones_like(a), torch.ones_like(a)], 1)
    points, order = points.sort(1)
    slope = steps.gather(1, order).cumsum(1)  # slope of the sum just after each breakpoint
    rise = (slope[:, :-1] * (points[:, 1:] - points[:, :-1])).cumsum(1)
    values = torch.cat([total, total + rise], 1)  # the sum at each breakpoint (non-increasing)
    k = ((values > eps).sum(1, keepdim=True) - 1).clamp_min(0)  # the last breakpoint still above eps
    theta = points.gather(1, k) + (values.gather(1, k) - eps) / (-slope.gather(1, k)).clamp_min(1)
    theta = torch.where(total > eps, theta, torch.zeros_like(theta))
    out = v.sign() * torch.minimum((a - theta).clamp_min(0), cap)
    return out.to(delta.dtype).reshape(shape)


def project(delta: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """Euclidean projection of each example of ``delta`` onto the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return project_linf(delta, eps)
    if norm == "l2":
        return project_l2(delta, eps)
    if norm == "l1":
        return project_l1(delta, eps)
    raise ConfigurationError(f"norm must be one of {NORMS}, got {norm!r}.")


def random_in_ball(
    shape: tuple[int, ...] | torch.Size,
    norm: str,
    eps: float | torch.Tensor,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A perturbation drawn uniformly (by volume) from the ``norm`` ball of radius ``eps``, one per example.

    linf: every coordinate ``U(-eps, eps)``. l2: a Gaussian direction times the radius
    ``eps * U^(1/d)``, ``d`` the number of free coordinates of the example (with ``mask``: real tokens
    times the hidden size). That radius law is what makes the point uniform in the ball: a radius
    ``eps * U`` (torchattacks.PGDL2, and this package's embedding start before) piles points near the
    centre. ``eps`` may be a ``(B, 1, ..)`` tensor of per-example radii. Draws from ``generator`` only.
    """
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            delta = torch.empty(shape, device=device, dtype=dtype).uniform_(-1.0, 1.0, generator=generator) * eps
        else:
            delta = torch.empty(shape, device=device, dtype=dtype).uniform_(-eps, eps, generator=generator)
        return apply_mask(delta, mask)
    if norm == "l2":
        direction = normalize_l2(torch.randn(shape, generator=generator, device=device, dtype=dtype), mask)
        per_example = (shape[0],) + (1,) * (len(shape) - 1)
        u = torch.rand(per_example, generator=generator, device=device, dtype=dtype)
        if mask is None:
            d = float(torch.Size(shape[1:]).numel())
            power = 1.0 / d
        else:
            free = mask.reshape(shape[0], -1).sum(1).to(dtype) * float(torch.Size(shape[mask.dim():]).numel())
            power = (1.0 / free.clamp_min(1.0)).reshape(per_example)
        return direction * eps * u.pow(power)
    raise ConfigurationError(f"random starts are defined for the 'linf' and 'l2' balls, got {norm!r}.")
