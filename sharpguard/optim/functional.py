"""The one weight-perturbation kernel behind SAM, its variants, AWP and the framework adapters.

Everything here works on lists of tensors with ``torch._foreach_*`` (one multi-tensor launch per
device/dtype group on GPU, no Python loop over parameters) and never calls ``.item()``: the scale
``rho / ||g||`` stays a device tensor, and a zero or non-finite norm turns into a zero scale by
``torch.where`` rather than a host-side branch.

The perturbation of SAM (Foret et al., ICLR 2021, eq. 2) is ``e = rho * g / ||g||_2``; ASAM
(Kwon et al., ICML 2021, eq. 9 with p=2) uses ``e = rho * T^2 g / ||T g||_2`` with
``T = diag(|w| + eta)``. Restoring is done by copy from a saved buffer, never by ``w + e - e``,
so the weights after a step are bitwise what the base optimizer produces.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

Tensors = Sequence[torch.Tensor]

__all__ = [
    "global_norm",
    "perturbation_scale",
    "save_",
    "restore_",
    "add_scaled_",
    "sam_perturb_",
]


def _group(tensors: Tensors) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def global_norm(tensors: Tensors, *, device: torch.device | None = None) -> torch.Tensor:
    """L2 norm of all tensors together, as a float32 (or wider) 0-dim tensor on ``device``.

    One ``_foreach_norm`` per device/dtype group, then one norm of the partial norms: the same
    grouping ``torch.nn.utils.get_total_norm`` uses. Returns ``0`` for an empty list.
    """
    if device is None:
        device = tensors[0].device if len(tensors) else torch.device("cpu")
    if not len(tensors):
        return torch.zeros((), device=device)
    partial = []
    for (_, dtype), idx in _group(tensors).items():
        norms = torch._foreach_norm([tensors[i] for i in idx])
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        partial.extend(n.to(device=device, dtype=acc) for n in norms)
    return torch.linalg.vector_norm(torch.stack([p.to(partial[0].dtype) for p in partial]))


def perturbation_scale(norm: torch.Tensor, rho: float | torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``rho / (norm + eps)``, or exactly ``0`` where ``norm`` is zero or not finite (no host sync)."""
    scale = rho / (norm + eps)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, scale, torch.zeros_like(scale))


def save_(buffers: list[torch.Tensor] | None, tensors: Tensors) -> list[torch.Tensor]:
    """Copy ``tensors`` into ``buffers`` (allocated on first use, reused afterwards); return them."""
    tensors = list(tensors)
    if buffers is None or len(buffers) != len(tensors) or any(
        b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(buffers, tensors)
    ):
        buffers = [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]
    with torch.no_grad():
        torch._foreach_copy_(buffers, tensors)
    return buffers


def restore_(tensors: Tensors, buffers: Tensors) -> None:
    """Copy ``buffers`` back into ``tensors``: bitwise exact, whatever happened in between."""
    with torch.no_grad():
        torch._foreach_copy_(list(tensors), list(buffers))


def add_scaled_(tensors: Tensors, directions: Tensors, scale: torch.Tensor) -> None:
    """``t += scale * d`` for every pair, with ``scale`` a 0-dim device tensor (no host sync)."""
    if not len(tensors):
        return
    with torch.no_grad():
        for (device, dtype), idx in _group(tensors).items():
            s = scale.to(device=device, dtype=dtype)
            torch._foreach_addcmul_([tensors[i] for i in idx], [directions[i] for i in idx], [s] * len(idx))


def sam_perturb_(
    params: Tensors,
    grads: Tensors,
    rho: float | torch.Tensor,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    backup: list[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Move ``params`` to ``w + e`` in place and return ``(backup of w, ||g|| or ||T g||)``.

    ``e = rho g / ||g||`` (SAM), or ``rho T^2 g / ||T g||`` with ``T = |w| + eta`` when ``adaptive``
    (ASAM). The ascent direction does not depend on a constant factor of ``g``, so gradients still
    multiplied by a GradScaler's loss scale give the same ``e``. A zero or non-finite norm gives
    ``e = 0`` wherever the gradient itself is finite. ``backup`` is a buffer list from an earlier
    call, reused to avoid allocating every step; restore with :func:`restore_`.
    """
    params, grads = list(params), list(grads)
    backup = save_(backup, params)
    if adaptive:
        with torch.no_grad():
            t = torch._foreach_abs(backup)
            if eta:
                torch._foreach_add_(t, eta)
            tg = torch._foreach_mul(t, grads)
            norm = global_norm(tg)
            torch._foreach_mul_(tg, t)  # T^2 g
            add_scaled_(params, tg, perturbation_scale(norm, rho))
    else:
        norm = global_norm(grads)
        add_scaled_(params, grads, perturbation_scale(norm, rho))
    return backup, norm
