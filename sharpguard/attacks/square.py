"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

Forward passes only, no gradient: the check a gradient-masking defense cannot fool. Each iteration
proposes, for every example still classified correctly, a change of the perturbation on one random
square window, and keeps it when the margin loss ``z_y - max_{j != y} z_j`` decreases. The window's
side follows the paper's schedule for ``p`` (the fraction of pixels changed), halved at fixed
iterations. Windows, signs and starting stripes are drawn per example from the attack's own
``torch.Generator`` (AutoAttack's port shares one window across the batch to save indexing).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigurationError
from . import _progress, geometry
from ._context import attack_context, check_steps
from .gradient import _Problem, _threat
from .threat import ThreatModel, default_generator
from .. import _validation as rules

__all__ = ["square", "p_schedule"]

# Iterations (on a 10,000-query budget) after which p halves once more: the schedule of the
# authors' code (the paper lists the same points without 500).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SQUARE_LOSSES = ("margin", "ce")


def p_schedule(iteration: int, p_init: float, n_queries: int, rescale: bool) -> float:
    """The fraction of pixels a window covers at ``iteration``: ``p_init / 2^k`` with k the halvings passed.

    ``rescale=True`` stretches the 10,000-iteration schedule onto ``n_queries`` iterations.
    """
    it = int(iteration / n_queries * 10000) if rescale else iteration
    return p_init / 2 ** sum(it > h for h in _HALVINGS)


def _margin_and_loss(problem: _Problem, u: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``z_y - max_{j != y} z_j``, the objective to minimise) per example: one forward."""
    logits = problem.forward(u)
    true = logits.gather(-1, problem.y[:, None]).squeeze(-1)
    other = logits.masked_fill(F.one_hot(problem.y, logits.shape[-1]).bool(), float("-inf")).amax(-1)
    margin = true - other
    if loss == "margin":
        return margin, margin
    return margin, -F.cross_entropy(logits, problem.y, reduction="none")


def _window_mask(n: int, h: int, w: int, s: int, gen: torch.Generator,
                 device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``s x s`` window per example: (mask ``(n, 1, h, w)``, top rows, left columns)."""
    top = torch.randint(0, h - s + 1, (n,), generator=gen, device=device)
    left = torch.randint(0, w - s + 1, (n,), generator=gen, device=device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + s)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None], top, left


def _signs(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype) * 2 - 1


@functools.lru_cache(maxsize=64)
def _eta(s: int) -> torch.Tensor:
    """The l2 proposal of the paper (section 3.2, Fig. 2): two opposite-signed halves of nested rectangles, unit
    norm."""

    def rectangles(a: int, b: int) -> torch.Tensor:
        out = torch.zeros(a, b, dtype=torch.float64)
        ca, cb = a // 2, b // 2
        for k in range(max(a // 2 + 1, b // 2 + 1)):
            out[max(ca - k, 0) : min(ca - k + 2 * k + 1, a),
                max(cb - k, 0) : min(cb - k + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        return out / out.norm()

    eta = torch.cat([rectangles(s // 2, s), -rectangles(s - s // 2, s)])
    return eta / eta.norm()


def _eta_batch(n: int, c: int, s: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``eta(s)`` (transposed at random per example) times a random sign per example and channel: ``(n, c, s, s)``."""
    eta = _eta(s).to(device=like.device, dtype=like.dtype)
    flip = torch.rand(n, generator=gen, device=like.device) > 0.5
    eta = torch.where(flip[:, None, None], eta.T, eta)[:, None]
    return eta * _signs((n, c, 1, 1), gen, like)


def _take(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, s: int) -> torch.Tensor:
    """The window ``[top:top+s, left:left+s]`` of each example of ``t (n, c, h, w)``: ``(n, c, s, s)``."""
    r = top[:, None] + torch.arange(s, device=t.device)
    c = left[:, None] + torch.arange(s, device=t.device)
    n = torch.arange(t.shape[0], device=t.device)
    return t[n[:, None, None], :, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)


def _put(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, s: int, values: torch.Tensor) -> None:
    r = top[:, None] + torch.arange(s, device=t.device)
    c = left[:, None] + torch.arange(s, device=t.device)
    n = torch.arange(t.shape[0], device=t.device)
    t[n[:, None, None], :, r[:, :, None], c[:, None, :]] = values.permute(0, 2, 3, 1)


def _l2(t: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """l2 norm per example ``(n, 1, 1, 1)``, or per example and channel ``(n, c, 1, 1)`` (geometry's norm)."""
    if not per_channel:
        return geometry.per_example_norm(t).to(t.dtype)
    n, c = t.shape[:2]
    return geometry.per_example_norm(t.flatten(0, 1)).to(t.dtype).reshape(n, c, 1, 1)


@rules.checked()
def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    n_queries: int = 5000,
    norm: str = "linf",
    *,
    p_init: float = 0.8,
    loss: str = "margin",
    restarts: int = 1,
    rescale_schedule: bool = True,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    mean=None,
    std=None,
    generator: torch.Generator | None = None,
    threat: ThreatModel | None = None,
    model_mode: str = "eval",
    check_range: bool = True,
) -> torch.Tensor:
    """Square Attack (Andriushchenko et al., ECCV 2020, Alg. 1 with the linf proposal of Alg. 2 and the l2 one
    of Alg. 3).

    Untargeted, on ``(N, C, H, W)`` inputs. linf: start from vertical stripes ``x + eps * (+-1)``;
    each iteration sets one ``s x s`` window per example to ``+-eps`` per channel. l2: start from a
    grid of ``eta`` blocks; each iteration moves the mass of a second window into the first
    (``eta`` proposal) and rescales the perturbation to norm ``eps``. The side is
    ``s = round(sqrt(p * H * W))`` with ``p`` from :func:`p_schedule` (``p_init`` 0.8 as in
    AutoAttack; the paper's defaults are 0.05 linf / 0.1 l2 on 10,000 queries). A proposal is kept
    when the loss (``"margin"``: ``z_y - max_{j != y} z_j``, or ``"ce"``: ``-CE``) decreases or the
    example becomes misclassified; examples stop once misclassified. ``rescale_schedule=True``
    fits the schedule to ``n_queries`` (AutoAttack passes ``False``). ``restarts`` re-run from
    scratch on the examples still robust. Cost: at most ``restarts * (n_queries + 1)`` forwards per
    example, no backward; one device synchronisation per iteration (selecting the active examples).
    """
    tm = _threat(threat, norm, eps, bounds, mean, std)
    tm.require_norm("square")
    n_queries = check_steps(n_queries, "n_queries")
    check_steps(restarts, "restarts")
    if not 0.0 < p_init <= 1.0:
        raise ConfigurationError(
            f"p_init (the fraction of pixels of the first window) must be in (0, 1], got {p_init}.")
    if loss not in _SQUARE_LOSSES:
        raise ConfigurationError(f"square's loss must be one of {_SQUARE_LOSSES}, got {loss!r}.")
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ConfigurationError(
            f"square attacks images of shape (N, C, H, W), got {tuple(x.shape)}; reshape flat inputs "
            "(e.g. to (N, 1, 8, 8)) and put nn.Flatten() first in the model."
        )
    with attack_context(model, model_mode), torch.no_grad():
        problem = _Problem(model, x, y, tm, "margin", None, False, check_range)
        gen = generator if generator is not None else default_generator(problem.x0.device)
        u_out = problem.x0.clone()
        clean = problem.forward(problem.x0)
        problem.check_classes(clean)
        robust = clean.argmax(-1) == problem.y
        for _ in range(restarts):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            sub = problem.restrict(index)
            run = _square_linf if tm.norm == "linf" else _square_l2
            u, broken = run(sub, gen, n_queries, p_init, loss, rescale_schedule)
            u_out[index[broken]] = u[broken]
            robust[index[broken]] = False
        return tm.from_pixel(u_out).detach()


SQUARE_TICK = 500  # queries between two progress reports


def _search(problem: _Problem, u_best: torch.Tensor, n_queries: int, loss: str,
            propose) -> tuple[torch.Tensor, torch.Tensor]:
    """The random search shared by both norms: ``propose(i, x0_active, u_active) -> candidate``."""
    x0 = problem.x0
    margin_min, loss_min = _margin_and_loss(problem, u_best, loss)
    for i in range(n_queries):
        if i and i % SQUARE_TICK == 0:
            _progress.tick(f"{i} of {n_queries} queries")
        active = (margin_min > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        sub = problem.restrict(active)
        candidate = propose(i, x0[active], u_best[active])
        margin, value = _margin_and_loss(sub, candidate, loss)
        improved = value < loss_min[active]
        loss_min[active] = torch.where(improved, value, loss_min[active])
        accept = improved | (margin <= 0)
        margin_min[active] = torch.where(accept, margin, margin_min[active])
        u_best[active] = torch.where(accept[:, None, None, None], candidate, u_best[active])
    return u_best, margin_min <= 0


def _side(i: int, n_queries: int, p_init: float, rescale: bool, h: int, w: int, minimum: int) -> int:
    p = p_schedule(i, p_init, n_queries, rescale)
    return min(max(int(round(math.sqrt(p * h * w))), minimum), h, w)


def _square_linf(problem: _Problem, gen, n_queries: int, p_init: float, loss: str, rescale: bool):
    tm, x0 = problem.tm, problem.x0
    n, c, h, w = x0.shape
    u_best = tm.clamp(x0 + tm.eps * _signs((n, c, 1, w), gen, x0))  # vertical stripes (section 3.1)

    def propose(i, x_act, u_act):
        s = _side(i, n_queries, p_init, rescale, h, w, 1)
        mask, _, _ = _window_mask(x_act.shape[0], h, w, s, gen, x_act.device)
        step = 2 * tm.eps * _signs((x_act.shape[0], c, 1, 1), gen, x_act)
        return tm.project(torch.where(mask, u_act + step, u_act), x_act)

    return _search(problem, u_best, n_queries, loss, propose)


def _square_l2(problem: _Problem, gen, n_queries: int, p_init: float, loss: str, rescale: bool):
    tm, x0 = problem.tm, problem.x0
    n, c, h, w = x0.shape
    eps = tm.eps
    # Start: a grid of eta blocks of side h // 5 with random signs, scaled to norm eps (section 3.2).
    delta = torch.zeros_like(x0)
    s = max(h // 5, 1)
    first = (h - s * 5) // 2 if h >= 5 else 0
    for top in range(first, h - s + 1, s):
        for left in range(first, w - s + 1, s):
            block = _eta_batch(n, c, s, gen, x0)
            delta[:, :, top : top + s, left : left + s] += block
    u_best = tm.clamp(x0 + eps * delta / (_l2(delta) + 1e-12))

    def propose(i, x_act, u_act):
        m = x_act.shape[0]
        s = _side(i, n_queries, p_init, rescale, h, w, 3)
        s += 1 - s % 2 if s < min(h, w) else 0  # odd sides, as the authors' code
        d = u_act - x_act
        mask1, top1, left1 = _window_mask(m, h, w, s, gen, x_act.device)
        mask2, top2, left2 = _window_mask(m, h, w, s, gen, x_act.device)
        window1 = _take(d, top1, left1, s)
        norm_window1 = _l2(window1, per_channel=True)
        norm_image = _l2(d)
        norm_windows = _l2(d * (mask1 | mask2))
        # The new window: eta plus the old window's direction, carrying the mass of both windows and
        # whatever budget is left, spread over the channels.
        new = _eta_batch(m, c, s, gen, x_act) + window1 / (norm_window1 + 1e-12)
        budget = ((eps**2 - norm_image.pow(2)).clamp_min(0) / c + norm_windows.pow(2)).sqrt()
        new = new / (_l2(new, per_channel=True) + 1e-12) * budget
        d = torch.where(mask2, torch.zeros_like(d), d)
        _put(d, top1, left1, s, new)
        return tm.clamp(x_act + eps * d / (_l2(d) + 1e-12))

    return _search(problem, u_best, n_queries, loss, propose)
