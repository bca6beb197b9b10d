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

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

Tensors = Sequence[torch.Tensor]

__all__ = [
    "global_norm",
    "perturbation_scale",
    "save_",
    "restore_",
    "add_scaled_",
    "scale_",
    "dot",
    "select_",
    "zero_where_",
    "skip_step_",
    "all_finite",
    "group_by_device_and_dtype",
    "host_readable",
    "ascent_direction",
    "sam_perturb_",
]


Groups = dict[tuple[torch.device, torch.dtype], list[int]]


def host_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value on the host is free: a real CPU tensor.

    An accelerator's tensor would make the host wait for the device, and a fake tensor
    (``FakeTensorMode``, used to simulate a step without memory) has no value at all: for both,
    every decision stays on the device (``torch.where``, :func:`select_`).
    """
    return t.device.type == "cpu" and not isinstance(t, FakeTensor)


def group_by_device_and_dtype(tensors: Tensors) -> Groups:
    """Indices of ``tensors`` by (device, dtype): what every function here takes as ``groups=`` so a
    caller with a fixed parameter list (SAM) computes it once instead of at every call."""
    return _group(tensors)


def _group(tensors: Tensors) -> Groups:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    return groups


def global_norm(tensors: Tensors, *, device: torch.device | None = None, groups: Groups | None = None) -> torch.Tensor:
    """L2 norm of all tensors together, as a float32 (or wider) 0-dim tensor on ``device``.

    One ``_foreach_norm`` per device/dtype group (accumulated in float32, or float64 for float64
    tensors, so half-precision gradients scaled by a GradScaler do not overflow the norm), then one
    norm of the partial norms: the grouping ``torch.nn.utils.get_total_norm`` uses. Returns ``0``
    for an empty list.
    """
    if device is None:
        device = tensors[0].device if len(tensors) else torch.device("cpu")
    if not len(tensors):
        return torch.zeros((), device=device)
    partial = []
    for (_, dtype), idx in (groups if groups is not None else _group(tensors)).items():
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        group = [tensors[i] for i in idx]
        # the dtype argument only where it widens: on float32 it costs a third more on the CPU
        norms = torch._foreach_norm(group, 2) if dtype == acc else torch._foreach_norm(group, 2, dtype=acc)
        partial.append(torch.linalg.vector_norm(torch.stack(norms)))
    if len(partial) == 1:
        return partial[0].to(device=device)
    acc = torch.float64 if any(n.dtype == torch.float64 for n in partial) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=acc) for n in partial]))


def all_finite(tensors: Tensors, *, groups: Groups | None = None) -> torch.Tensor:
    """0-dim boolean: every element of every tensor is finite; no host sync.

    One pass of the GradScaler's own fused check (``_amp_foreach_non_finite_check_and_unscale_`` with
    an inverse scale of exactly 1, so nothing changes: ``x * 1 == x`` for every float, inf and NaN
    included), per device/dtype group: about a quarter of a ``_foreach_norm`` on the CPU. Falls back to
    the norm where that kernel does not take the dtype.
    """
    if not len(tensors):
        return torch.ones((), dtype=torch.bool)
    groups = groups if groups is not None else _group(tensors)
    device = tensors[0].device
    found = torch.zeros(1, dtype=torch.float32, device=device)
    with torch.no_grad():
        for (dev, _), idx in groups.items():
            group = [tensors[i] for i in idx]
            flag = found if dev == device else torch.zeros(1, dtype=torch.float32, device=dev)
            try:
                # the kernel sets flag to 1 on a non-finite entry (it never clears it): it accumulates
                one = _one(dev) if not isinstance(group[0], FakeTensor) else torch.ones(1, device=dev)
                torch._amp_foreach_non_finite_check_and_unscale_(group, flag, one)
            except (RuntimeError, NotImplementedError):
                flag.add_((~torch.isfinite(global_norm(group))).float().reshape(1))
            if flag is not found:
                found.add_(flag.to(device))
    return found[0] == 0


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    """A cached ``tensor([1.0])`` on ``device`` (the unscale factor of :func:`all_finite`; never written)."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return one


def perturbation_scale(norm: torch.Tensor, rho: float | torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``rho / (norm + eps)``, or exactly ``0`` where ``norm`` is zero or not finite (no host sync)."""
    if host_readable(norm) and not isinstance(rho, torch.Tensor):
        # on the CPU a scalar read waits for nothing: seven 0-dim tensor ops cost more than the arithmetic
        n = float(norm)
        value = float(rho) / (n + eps) if math.isfinite(n) and n > 0 else 0.0
        return torch.tensor(value, dtype=norm.dtype)
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


def add_scaled_(tensors: Tensors, directions: Tensors, scale: torch.Tensor, *, groups: Groups | None = None) -> None:
    """``t += scale * d`` for every pair, with ``scale`` a 0-dim device tensor (no host sync)."""
    if not len(tensors):
        return
    with torch.no_grad():
        if host_readable(scale):
            # a CPU scale is read, not waited for; one add with a scalar alpha per group (any device)
            s = float(scale)
            for _, idx in (groups if groups is not None else _group(tensors)).items():
                torch._foreach_add_([tensors[i] for i in idx], [directions[i] for i in idx], alpha=s)
            return
        for (device, dtype), idx in (groups if groups is not None else _group(tensors)).items():
            s = scale.to(device=device, dtype=dtype)
            torch._foreach_addcmul_([tensors[i] for i in idx], [directions[i] for i in idx], [s] * len(idx))


def scale_(tensors: Tensors, factor: torch.Tensor) -> None:
    """``t *= factor`` for every tensor, with ``factor`` a 0-dim device tensor (no host sync)."""
    if not len(tensors):
        return
    with torch.no_grad():
        for (device, dtype), idx in _group(tensors).items():
            torch._foreach_mul_([tensors[i] for i in idx], factor.to(device=device, dtype=dtype))


def dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """Inner product ``<a, b>`` of two tensor lists as one 0-dim tensor, without a per-tensor loop.

    Uses the polarisation identity ``<a, b> = (||a + b||^2 - ||a||^2 - ||b||^2) / 2`` so that the
    only reductions are fused ``_foreach_norm`` calls (one extra add over the tensors). The absolute
    error is about ``eps * (||a||^2 + ||b||^2)``, which is what a cosine or a projection coefficient
    between two gradients needs (``a + b`` is formed in the tensors' own dtype, so half-precision
    lists carry half-precision error).
    """
    with torch.no_grad():
        total = global_norm(torch._foreach_add(list(a), list(b)))
        return 0.5 * (total.square() - global_norm(a).square() - global_norm(b).square())


def select_(dst: Tensors, src: Tensors, take: torch.Tensor, *, groups: Groups | None = None) -> None:
    """``dst <- src`` if the 0-dim boolean ``take`` is true, else leave ``dst`` as it is; no host sync.

    Safe when either side holds inf/NaN: ``x ** 0`` is exactly 1 and ``x ** 1`` exactly ``x`` even
    for inf/NaN entries (IEEE 754 ``pow``), so with ``w`` in {0, 1} the blend
    ``lerp(dst ** (1 - w), src ** w, w)`` never multiplies a non-finite number by zero, and
    ``lerp`` returns its end point exactly at weight 1 (its ``end - (end - start)(1 - w)`` branch).
    With ``take`` true the result is ``src`` bitwise, with ``take`` false ``dst`` is unchanged.
    Used to keep persistent optimizer state (LookSAM's ``gv``, Friendly-SAM's EMA) unpoisoned by a
    step whose gradient overflowed, and to replace a non-finite SAM gradient by the clean one.
    """
    if not len(dst):
        return
    with torch.no_grad():
        for (device, dtype), idx in (groups if groups is not None else _group(dst)).items():
            w = take.to(device=device, dtype=dtype)
            weights, keep = [w] * len(idx), [1 - w] * len(idx)
            targets = [dst[i] for i in idx]
            torch._foreach_pow_(targets, keep)
            finite = torch._foreach_pow([src[i] for i in idx], weights)
            torch._foreach_lerp_(targets, finite, weights)


def zero_where_(tensors: Tensors, take: torch.Tensor, *, groups: Groups | None = None) -> None:
    """``t <- 0`` for every tensor if the 0-dim boolean ``take`` is true, else unchanged; no host sync.

    In place, without a temporary: ``t ** (1 - w)`` is ``t`` bitwise at ``w = 0`` and exactly 1 at
    ``w = 1`` even for inf/NaN entries (IEEE 754 ``pow``), and ``lerp(., 0, w)`` returns its start
    exactly at weight 0 and its end (0) exactly at weight 1 (see :func:`select_`). The zeros are
    one 0-dim tensor per group, expanded.
    """
    if not len(tensors):
        return
    with torch.no_grad():
        for (device, dtype), idx in (groups if groups is not None else _group(tensors)).items():
            w = take.to(device=device, dtype=dtype)
            targets = [tensors[i] for i in idx]
            zero = torch.zeros((), device=device, dtype=dtype)
            torch._foreach_pow_(targets, [1 - w] * len(idx))
            torch._foreach_lerp_(targets, [zero.expand_as(t) for t in targets], [w] * len(idx))


def skip_step_(params: Sequence[torch.Tensor], ok: torch.Tensor, *,
               local: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """``nonfinite="skip"``: make a faulty step update nothing, from the 0-dim boolean ``ok``.

    Where ``ok`` is free to read (:func:`host_readable`, a real CPU tensor) every gradient is set to
    ``None`` when it is false, so the base optimizer leaves weights and state alone; otherwise the
    gradients (``local(p.grad)``: an FSDP rank's shards) are zeroed on the device by :func:`zero_where_`,
    with no host sync.
    """
    if host_readable(ok):
        if not bool(ok):
            for p in params:
                p.grad = None
        return
    grads = [p.grad if local is None else local(p.grad) for p in params if p.grad is not None]
    zero_where_(grads, ~ok)


def ascent_direction(
    params: Tensors,
    grads: Tensors,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    norm: Callable[[Tensors], torch.Tensor] = global_norm,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(d, n)`` with SAM's perturbation ``e = rho d / n``; read ``params`` before they move.

    SAM (Foret et al. 2021, eq. 2): ``d = g``, ``n = ||g||``. ASAM (Kwon et al. 2021, eq. 9 with
    p = 2): ``d = T^2 g``, ``n = ||T g||`` with ``T = |w| + eta``. ``norm`` computes ``n`` (a
    sharded model passes one that all-reduces across shards). Without ``adaptive`` the returned
    directions are ``grads`` themselves, not a copy.
    """
    grads = list(grads)
    if not adaptive:
        return grads, norm(grads)
    with torch.no_grad():
        t = torch._foreach_abs(list(params))
        if eta:
            torch._foreach_add_(t, eta)
        tg = torch._foreach_mul(t, grads)
        n = norm(tg)
        torch._foreach_mul_(tg, t)  # T^2 g
    return tg, n


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
    (ASAM); see :func:`ascent_direction`. The ascent direction does not depend on a constant factor
    of ``g``, so gradients still multiplied by a GradScaler's loss scale give the same ``e``. A zero
    or non-finite norm gives ``e = 0`` wherever the gradient itself is finite. ``backup`` is a buffer
    list from an earlier call, reused to avoid allocating every step; restore with :func:`restore_`.
    """
    params, grads = list(params), list(grads)
    backup = save_(backup, params)
    directions, norm = ascent_direction(backup, grads, adaptive=adaptive, eta=eta)
    add_scaled_(params, directions, perturbation_scale(norm, rho))
    return backup, norm
