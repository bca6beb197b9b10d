"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack"): AutoAttack's third stage.

FAB looks for the *smallest* perturbation that changes the decision. At each step it linearises the
decision boundary between the true class ``y`` and the target ``t`` at the current point ``x_k``:
``f(x) = z_t(x) - z_y(x) ~ f(x_k) + <grad f(x_k), x - x_k>``, and projects both ``x_k`` and the clean
``x_0`` onto that hyperplane intersected with the input box, in the threat model's norm (eq. 5; the
projections below solve problem (6) exactly). The next point is the convex combination
``x_{k+1} = Proj_box((1 - a)(x_k + eta d_k) + a (x_0 + eta d_0))`` with
``a = min(||d_k|| / (||d_k|| + ||d_0||), alpha_max)`` (eq. 8): the bias towards the clean point keeps
the perturbation small; ``eta > 1`` overshoots the boundary. Whenever ``x_{k+1}`` is misclassified it
is recorded if closer to ``x_0`` than the best so far, and the iterate is pulled back:
``x_{k+1} <- x_0 + beta (x_{k+1} - x_0)`` (section 3.2). The targets are the classes with the 2nd,
3rd, ... highest clean logit, as in APGD-T. A point counts as broken when the smallest adversarial
perturbation found is within ``eps``.

The projection routines follow the authors' code (``fab_projections.py`` of AutoAttack), which works
in the unit box; this module maps the input box ``bounds`` onto it (distances scale by the box width).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigurationError
from . import _progress, geometry
from ._context import attack_context, check_steps
from .gradient import _Problem, _threat
from .threat import ThreatModel, default_generator
from .. import _validation as rules

__all__ = ["fab_targeted"]


# ----------------------------------------------------------------------------- projections
def _projection_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest-linf ``d`` with ``<w, t + d> = b`` and ``t + d`` in the unit box (rows of ``t``)."""
    dtype = t.dtype
    w, b = w.clone(), b.clone()
    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)
    a = (w < 0).to(dtype)
    d = (a - t) * (w != 0).to(dtype)
    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0.unsqueeze(1)
    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & (~c_l)
    lb = torch.zeros(int(c2.sum()), device=t.device, dtype=dtype)
    ub = torch.full_like(lb, w.shape[1] - 1)
    indp_, sb_, s_, p_, b_ = indp[c2], sb[c2], s[c2], p[c2], b[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):  # bisection over the sorted breakpoints
        counter4 = torch.floor((lb + ub) / 2)
        counter2 = counter4.long().unsqueeze(1)
        indcurr = indp_.gather(1, indp_.size(1) - 1 - counter2)
        b2 = (sb_.gather(1, counter2) - s_.gather(1, counter2) * p_.gather(1, indcurr)).squeeze(1)
        c = b_ - b2 > 0
        lb = torch.where(c, counter4, lb)
        ub = torch.where(c, ub, counter4)
    lb = lb.long()
    if c_l.any():
        lmbd_opt = torch.clamp_min((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), min=0).unsqueeze(-1)
        d[c_l] = (2 * a[c_l] - 1) * lmbd_opt
    lmbd_opt = torch.clamp_min((b[c2] - sb[c2, lb]) / (-s[c2, lb]), min=0).unsqueeze(-1)
    d[c2] = torch.min(lmbd_opt, d[c2]) * a[c2] + torch.max(-lmbd_opt, d[c2]) * (1 - a[c2])
    return d * (w != 0).to(dtype)


def _projection_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of the rows of ``t`` onto ``{<w, z> = b}`` intersected with the unit box."""
    dtype = t.dtype
    w = w.clone()
    c = (w * t).sum(1) - b
    ind2 = 2 * (c >= 0) - 1
    w.mul_(ind2.unsqueeze(1))
    c.mul_(ind2)
    r = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r.masked_fill_(w.abs() < 1e-8, 1e12)
    r[r == -1e12] *= -1
    rs, indr = torch.sort(r, dim=1)
    rs2 = torch.nn.functional.pad(rs[:, 1:], (0, 1))
    rs.masked_fill_(rs == 1e12, 0)
    rs2.masked_fill_(rs2 == 1e12, 0)
    w3s = (w**2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w)
    d.mul_((w.abs() > 1e-8).to(dtype))
    s = torch.cat((-w5 * rs[:, 0:1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, 0:1]), 1)
    c4 = s[:, 0] + c < 0
    c3 = (d * w).sum(dim=1) + c > 0
    c2 = ~(c4 | c3)
    lb = torch.zeros(int(c2.sum()), device=t.device, dtype=dtype)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[c2], c[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        counter4 = torch.floor((lb + ub) / 2)
        counter2 = counter4.long().unsqueeze(1)
        c3 = s_.gather(1, counter2).squeeze(1) + c_ > 0
        lb = torch.where(c3, counter4, lb)
        ub = torch.where(c3, ub, counter4)
    lb = lb.long()
    if c4.any():
        alpha = c[c4] / w5[c4].squeeze(-1)
        d[c4] = -alpha.unsqueeze(-1) * w[c4]
    if c2.any():
        alpha = (s[c2, lb] + c[c2]) / ws[c2, lb] + rs[c2, lb]
        alpha[ws[c2, lb] == 0] = 0
        c5 = (alpha.unsqueeze(-1) > r[c2]).to(dtype)
        d[c2] = d[c2] * c5 - alpha.unsqueeze(-1) * w[c2] * (1 - c5)
    return d * (w.abs() > 1e-8).to(dtype)


def _projection_l1(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest-l1 ``d`` with ``<w, t + d> = b`` and ``t + d`` in the unit box (rows of ``t``)."""
    dtype = t.dtype
    w = w.clone()
    c = (w * t).sum(1) - b
    ind2 = 2 * (c >= 0) - 1
    w.mul_(ind2.unsqueeze(1))
    c.mul_(ind2)
    r = (1 / w).abs().clamp_max(1e12)
    indr = torch.argsort(r, dim=1)
    indr_rev = torch.argsort(indr)
    c6 = (w < 0).to(dtype)
    d = (-t + c6) * (w != 0).to(dtype)
    ds = torch.min(-w * t, w * (1 - t)).gather(1, indr)
    ds2 = torch.cat((c.unsqueeze(-1), ds), 1)
    s = torch.cumsum(ds2, dim=1)
    c2 = s[:, -1] < 0
    lb = torch.zeros(int(c2.sum()), device=t.device, dtype=dtype)
    ub = torch.full_like(lb, s.shape[1])
    s_ = s[c2]
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        counter4 = torch.floor((lb + ub) / 2)
        counter2 = counter4.long().unsqueeze(1)
        c3 = s_.gather(1, counter2).squeeze(1) > 0
        lb = torch.where(c3, counter4, lb)
        ub = torch.where(c3, ub, counter4)
    lb2 = lb.long()
    if c2.any():
        indr = indr[c2].gather(1, lb2.unsqueeze(1)).squeeze(1)
        u = torch.arange(0, w.shape[0], device=t.device).unsqueeze(1)
        u2 = torch.arange(0, w.shape[1], device=t.device, dtype=dtype).unsqueeze(0)
        alpha = -s[c2, lb2] / w[c2, indr]
        c5 = u2 < lb.unsqueeze(-1)
        u3 = c5[u[: c5.shape[0]], indr_rev[c2]]
        d[c2] = d[c2] * u3.to(dtype)
        d[c2, indr] = alpha
    return d * (w.abs() > 1e-8).to(dtype)


_PROJECTIONS = {"linf": _projection_linf, "l2": _projection_l2, "l1": _projection_l1}
_DUAL = {"linf": "l1", "l2": "l2", "l1": "linf"}  # the dual norm measures the distance to a hyperplane


# ----------------------------------------------------------------------------- the attack
@rules.checked(alpha_max=rules.probability, eta=rules.at_least(1.0), beta=rules.probability)
def fab_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    steps: int = 100,
    norm: str = "linf",
    *,
    n_target_classes: int = 9,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    generator: torch.Generator | None = None,
    threat: ThreatModel | None = None,
    model_mode: str = "eval",
    check_range: bool = True,
) -> torch.Tensor:
    """FAB-T (Croce & Hein, ICML 2020, Algorithm 1, targeted version of section 3.3), in linf, l2 or l1.

    For each target (the ``n_target_classes`` classes after the top clean one) and each of
    ``restarts`` (the first from ``x``, later ones from a random point at half the radius ``eps``),
    ``steps`` FAB iterations run on the examples not broken yet; an example is broken when a
    misclassified point within ``eps`` of it is found, and gets the closest such point. Examples
    misclassified on the clean input are returned unchanged. Defaults are AutoAttack's
    (``alpha_max=0.1``, ``eta=1.05``, ``beta=0.9``, 100 steps, 9 targets). Needs a bounded input box.
    Cost: at most ``n_target_classes * restarts * steps`` times (2 forwards, 1 input-only backward),
    plus one forward per run and one clean forward.
    """
    tm = _threat(threat, norm, eps, bounds, mean, std)
    steps = check_steps(steps)
    n_target_classes = check_steps(n_target_classes, "n_target_classes")
    check_steps(restarts, "restarts")
    if tm.bounds is None:
        raise ConfigurationError("FAB projects onto the input box; declare bounds=(low, high) for fab_targeted.")
    if not (0.0 <= alpha_max <= 1.0) or not eta >= 1.0 or not (0.0 < beta <= 1.0):
        raise ConfigurationError(
            f"FAB needs 0 <= alpha_max <= 1, eta >= 1 and 0 < beta <= 1, got {alpha_max}, {eta}, {beta}."
        )
    with attack_context(model, model_mode), torch.no_grad():
        problem = _Problem(model, x, y, tm, "ce", None, False, check_range)
        x0 = problem.x0
        lo, hi = tm.bounds
        width = hi - lo
        clean = problem.forward(x0)
        problem.check_classes(clean)
        n_classes = clean.shape[-1]
        if n_classes < 2:
            raise ConfigurationError(f"FAB-T needs at least 2 classes, the model has {n_classes}.")
        ranked = clean.sort(dim=-1).indices
        robust = clean.argmax(-1) == problem.y
        gen = generator if generator is not None else default_generator(x0.device)
        u_out = x0.clone()
        for k in range(2, min(n_target_classes, n_classes - 1) + 2):
            for restart in range(restarts):
                index = robust.nonzero().squeeze(1)
                if index.numel() == 0:
                    return tm.from_pixel(u_out).detach()
                sub = problem.restrict(index)
                z0 = (x0[index] - lo) / width  # the unit box of the authors' projections
                z = _fab_run(sub, z0, ranked[index, -k], tm.norm, tm.eps / width, lo, width, steps,
                             alpha_max, eta, beta, restart > 0, gen)
                u = lo + width * z
                # AutoAttack's rule: broken if misclassified and the perturbation is within eps.
                broken = (problem.forward(u).argmax(-1) != sub.y) & (
                    geometry.per_example_norm(u - x0[index], tm.norm).flatten() <= tm.eps
                )
                u_out[index[broken]] = u[broken]
                robust[index[broken]] = False
                _progress.tick(f"target {k - 1} of {min(n_target_classes, n_classes - 1)}"
                               + (f", restart {restart + 1} of {restarts}" if restarts > 1 else ""))
        return tm.from_pixel(u_out).detach()


def _fab_run(problem: _Problem, z0: torch.Tensor, targets: torch.Tensor, norm: str, eps: float, lo: float,
             width: float, steps: int, alpha_max: float, eta: float, beta: float, random_start: bool,
             gen: torch.Generator) -> torch.Tensor:
    """One FAB-T run in unit-box coordinates; returns the closest adversarial point found (else ``z0``)."""
    n = z0.shape[0]
    shape = (n,) + (1,) * (z0.dim() - 1)
    rows = torch.arange(n, device=z0.device)
    y = problem.y
    best = z0.clone()
    best_dist = torch.full((n,), 1e10, device=z0.device, dtype=z0.dtype)
    z = z0.clone()
    if random_start:
        if norm == "linf":
            t = 2 * torch.rand(z0.shape, generator=gen, device=z0.device, dtype=z0.dtype) - 1
        else:
            t = torch.randn(z0.shape, generator=gen, device=z0.device, dtype=z0.dtype)
        size = geometry.per_example_norm(t, norm).to(t.dtype)
        z = (z0 + eps * t / size * 0.5).clamp(0.0, 1.0)
    flat0 = z0.reshape(n, -1)
    project = _PROJECTIONS[norm]
    for _ in range(steps):
        # f = z_t - z_y and its input gradient (chain rule through u = lo + width * z): one forward, one backward.
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            logits = problem.forward(lo + width * zz)
            f = -(logits[rows, y] - logits[rows, targets])
            (g,) = torch.autograd.grad(f.sum(), zz)
        f = f.detach()
        w = g.reshape(n, -1)
        b = -f + (w * z.reshape(n, -1)).sum(1)
        d3 = project(torch.cat((z.reshape(n, -1), flat0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
        d1, d2 = d3[:n].reshape(z.shape), d3[n:].reshape(z.shape)
        a0 = geometry.per_example_norm(d3, norm).to(d3.dtype).reshape(-1).clamp_min(1e-8).reshape(-1, *shape[1:])
        a1, a2 = a0[:n], a0[n:]
        alpha = torch.clamp(a1 / (a1 + a2), min=0.0, max=alpha_max)
        z = ((z + eta * d1) * (1 - alpha) + (z0 + d2 * eta) * alpha).clamp(0.0, 1.0)
        adversarial = problem.forward(lo + width * z).argmax(-1) != y
        dist = geometry.per_example_norm(z - z0, norm).to(z.dtype).flatten()
        closer = adversarial & (dist < best_dist)
        best = torch.where(closer.reshape(shape), z, best)
        best_dist = torch.where(closer, dist, best_dist)
        # Pull misclassified iterates back towards the clean point (the "backward step").
        z = torch.where(adversarial.reshape(shape), z0 + (z - z0) * beta, z)
    return best
