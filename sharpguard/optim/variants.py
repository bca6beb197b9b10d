"""SAM variants: GSAM, LookSAM, Momentum-SAM and Friendly-SAM, each a thin layer over :class:`~.sam.SAM`.

Every class takes SAM's constructor form ``(params, base_optimizer_cls, *, rho=..., <its knobs>,
model=None, sync_perturbation=False, **base_kwargs)``, has ``.wrap(optimizer, **knobs)``, and
speaks the adapter protocol (``prepare`` / ``perturb`` / ``unperturb``). What a variant changes is
the ascent direction (``_ascent``) and/or how the final gradient is formed (``_after_*_pass``).
State kept across steps (LookSAM's ``gv``, Friendly-SAM's EMA) is committed only when a step
completes and only from finite gradients, and it is saved in ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from ..errors import ConfigurationError
from . import functional as F
from .sam import SAM, _build_base, _in_unit_interval, _non_negative, _positive_int, _rho
from .. import _validation as rules

__all__ = ["GSAM", "LookSAM", "MomentumSAM", "FriendlySAM"]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, or 0 where ``den`` is zero or not finite (no host sync)."""
    ok = torch.isfinite(den) & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class GSAM(SAM):
    r"""Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022, arXiv:2203.08065).

    With the clean gradient :math:`g = \nabla L(w)` and the SAM gradient
    :math:`g_p = \nabla L(w + e)`, GSAM splits :math:`g` into its components parallel and
    orthogonal to :math:`g_p`, :math:`g_\perp = g - \frac{\langle g, g_p\rangle}{\lVert g_p\rVert^2} g_p`,
    and steps with :math:`g_p - \alpha\, g_\perp` (Algorithm 1): descending the surrogate gap
    without changing the SAM loss to first order. The paper ties ``rho`` to the learning-rate
    schedule; set ``opt.rho`` each step for that. Cost: 2 passes per step, one extra gradient buffer.
    """

    variant: ClassVar[str] = "gsam"
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.05,
        alpha: float = 0.4,
        adaptive: bool = False,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, alpha=alpha, adaptive=adaptive)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(self, *, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False) -> None:  # type: ignore[override]
        rho, alpha = _rho(rho), _in_unit_interval("alpha", alpha)
        self.rho, self.alpha, self.adaptive, self.interval = rho, alpha, bool(adaptive), 1

    def _after_perturbed_pass(self, params, grads):
        clean = self._buffers("clean_grad", params)
        # g_p - alpha (g - c g_p) = (1 + alpha c) g_p - alpha g,  c = <g, g_p> / ||g_p||^2
        c = _ratio(F.dot(clean, grads), F.global_norm(grads).square())
        F.scale_(grads, 1.0 + self.alpha * c)
        torch._foreach_add_(grads, clean, alpha=-self.alpha)


class LookSAM(SAM):
    r"""LookSAM (Liu et al., CVPR 2022, arXiv:2203.02714): SAM's extra gradient every ``k`` steps only.

    On every ``k``-th step it runs SAM and keeps the part of the SAM gradient orthogonal to the
    clean one, :math:`g_v = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2} g`; on the other
    steps it runs **one** pass and steps with
    :math:`g + \alpha \frac{\lVert g\rVert}{\lVert g_v\rVert} g_v` (Algorithm 1). On those steps
    :meth:`perturb` returns False and :meth:`step` calls the closure once, so the cost really is
    ``1 + 1/k`` passes per step. Norms are global (the paper's Algorithm 1, not the layer-wise form).
    """

    variant: ClassVar[str] = "looksam"
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False
    state_buffers: ClassVar[tuple[str, ...]] = ("gv",)

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, k=k, alpha=alpha, adaptive=adaptive)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self, *, rho: float = 0.05, k: int = 5, alpha: float = 0.7, adaptive: bool = False
    ) -> None:
        rho, k, alpha = _rho(rho), _positive_int("k", k), _non_negative("alpha", alpha)
        # SAM's own cadence: a perturbed pass every k-th step (needs_second_pass, cost 1 + 1/k)
        self.rho, self.alpha, self.adaptive, self.interval = rho, alpha, bool(adaptive), k

    @property
    def k(self) -> int:
        """Steps between SAM gradients: the ``interval`` of the base class under the paper's name."""
        return self.interval

    def _after_perturbed_pass(self, params, grads):
        clean = self._buffers("clean_grad", params)
        c = _ratio(F.dot(clean, grads), F.global_norm(clean).square())
        gv_new = torch._foreach_neg(clean)
        F.scale_(gv_new, c)
        torch._foreach_add_(gv_new, grads)  # g_s - c g
        ok = torch.isfinite(F.global_norm(gv_new))
        F.select_(self._state_list("gv", params), gv_new, ok)  # keep the old gv after an overflow

    def _after_plain_pass(self, params, grads):
        if not params or self.needs_second_pass():  # a full step that had nothing to perturb
            return
        gv = self._state_list("gv", params)
        # zero while gv has never been set (e.g. resumed from a plain optimizer checkpoint), and zero
        # when the clean gradient is not finite: alpha ||g|| / ||g_v|| would spread an inf over every weight
        norm = F.global_norm(grads)
        finite = torch.isfinite(norm)
        factor = self.alpha * _ratio(torch.where(finite, norm, torch.zeros_like(norm)), F.global_norm(gv))
        F.add_scaled_(grads, gv, factor)
        self._count_faults(finite, None)  # counted and said, as on a step with a perturbed pass


class MomentumSAM(SAM):
    r"""Momentum-SAM (Becker et al., 2024, arXiv:2401.12033): SAM at the cost of the base optimizer.

    Before the forward (:meth:`prepare`) the weights move to
    :math:`\tilde w = w - \rho\, v / \lVert v\rVert_2`, with :math:`v` the base optimizer's momentum
    (SGD's ``momentum_buffer``, Adam's ``exp_avg``); the single forward/backward runs there, ``w`` is
    restored by copy, and the base optimizer steps with :math:`\nabla L(\tilde w)`. The first step
    (no momentum yet) is a plain step. Running statistics come from that one pass. Cost: 1 pass.
    The paper's ``rho`` is larger than SAM's (0.3 for SGD on CIFAR).
    """

    variant: ClassVar[str] = "momentum_sam"

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.3,
        momentum_key: str | None = None,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, momentum_key=momentum_key)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(self, *, rho: float = 0.3, momentum_key: str | None = None) -> None:  # type: ignore[override]
        if momentum_key is not None and not isinstance(momentum_key, str):
            raise ConfigurationError(
                f"momentum_key must be the name of a per-parameter state entry or None, got {momentum_key!r}."
            )
        self.rho, self.momentum_key, self.adaptive, self.interval = _rho(rho), momentum_key, False, 1

    def _validate_base(self, base: Optimizer) -> None:
        self._key = self._momentum_key_for(base)

    def _momentum_key_for(self, base: Optimizer) -> str:
        if self.momentum_key is not None:
            return self.momentum_key
        if isinstance(base, torch.optim.SGD):
            if any(not group.get("momentum") for group in base.param_groups):
                raise ConfigurationError(
                    "MomentumSAM perturbs along the momentum buffer, but this SGD has momentum=0; "
                    "set momentum (e.g. 0.9) or use SAM."
                )
            return "momentum_buffer"
        if "betas" in base.defaults:
            return "exp_avg"
        raise ConfigurationError(
            f"MomentumSAM does not know where {type(base).__name__} keeps its momentum; pass momentum_key= "
            "(the name of the per-parameter state entry, e.g. 'momentum_buffer' or 'exp_avg')."
        )

    @property
    def cost(self) -> tuple[float, float]:
        return (1.0, 1.0)

    def needs_second_pass(self) -> bool:
        return False

    @torch.no_grad()
    def prepare(self) -> None:
        """Move to ``w - rho v / ||v||`` before the forward (once per step; a no-op before momentum exists)."""
        if self._prepared:
            return
        self._prepared = True
        state, key = self.base_optimizer.state, self._key
        params = [p for p in self._all_params() if state.get(p, {}).get(key) is not None]
        if not params:
            return
        momentum = [state[p][key] for p in params]
        self._move(params, momentum, -F.perturbation_scale(F.global_norm(momentum), self.rho))

    def perturb(self) -> bool:
        if not self._prepared and not self._perturb_called:
            if any(self.base_optimizer.state.get(p, {}).get(self._key) is not None for p in self._all_params()):
                raise ConfigurationError(
                    "MomentumSAM perturbs before the forward: call prepare() before computing the loss "
                    "(step(closure) does it for you)."
                )
        return super().perturb()


class FriendlySAM(SAM):
    r"""Friendly-SAM (Li et al., CVPR 2024, arXiv:2403.12350): ascend along the batch-specific gradient.

    The full-gradient component of the clean gradient is estimated by an EMA
    :math:`m_t = \lambda m_{t-1} + (1 - \lambda) g_t` and removed from the ascent direction:
    :math:`d = g_t - \sigma m_{t-1}`, :math:`e = \rho\, d / \lVert d\rVert` (eq. 7-8; the first step
    uses :math:`d = g_1`, :math:`m_1 = g_1`, as the official code). The EMA is in gradient units, so
    under a GradScaler whose scale changes it mixes scales; use the fp32/bf16 path for F-SAM.
    Cost: 2 passes per step, two extra gradient buffers.
    """

    variant: ClassVar[str] = "friendly_sam"
    per_worker_safe: ClassVar[bool] = False
    state_buffers: ClassVar[tuple[str, ...]] = ("ema",)

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        adaptive: bool = False,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, sigma=sigma, lmbda=lmbda, adaptive=adaptive)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self, *, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9, adaptive: bool = False
    ) -> None:
        rho, sigma, lmbda = _rho(rho), _non_negative("sigma", sigma), _in_unit_interval("lmbda", lmbda)
        self.rho, self.sigma, self.lmbda, self.adaptive, self.interval = rho, sigma, lmbda, bool(adaptive), 1

    def _ascent(self, params, grads):
        first = all("ema" not in self.sam_state[p] for p in params)
        ema = self._state_list("ema", params)
        ema_next = self._buffers("ema_next", params)
        if first:
            torch._foreach_copy_(ema_next, grads)
            return super()._ascent(params, grads)
        torch._foreach_copy_(ema_next, ema)
        torch._foreach_lerp_(ema_next, grads, 1.0 - self.lmbda)
        direction = self._buffers("direction", params)
        torch._foreach_copy_(direction, grads)
        torch._foreach_add_(direction, ema, alpha=-self.sigma)
        return super()._ascent(params, direction)

    def _after_perturbed_pass(self, params, grads):
        ema_next = self._buffers("ema_next", params)
        ok = torch.isfinite(F.global_norm(ema_next))
        F.select_(self._state_list("ema", params), ema_next, ok)
