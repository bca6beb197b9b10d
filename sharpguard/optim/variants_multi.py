"""Sharpness-aware variants beyond one perturbed point and one wrapped update rule (issue 14): GAM and bSAM.

* :class:`GAM` takes gradients at three perturbed points per step, each chosen from the gradient at
  the one before; the step engine visits them through :meth:`~.sam.SAM.advance` (every micro-batch of
  the window is replayed at each point), so it runs in plain PyTorch and in every framework adapter.
* :class:`BSAM` is an Adam-like optimizer of its own (a precision ``s`` scales the noise, the ascent
  and the step): it draws its noise before the clean forward (:meth:`~.sam.SAM.prepare`, like
  Momentum-SAM), ascends from the noise-free weights, and hands the base optimizer -- a plain
  ``torch.optim.SGD`` whose ``lr`` is bSAM's step size -- its own update direction.

Both speak the protocol of :mod:`.sam` (``prepare`` / ``perturb`` / ``advance`` / ``unperturb`` /
``cancel``): weights are restored by copy, a non-finite gradient at any point falls back to the clean
one, and bSAM's persistent state (``s``, ``g_m``) is committed only from finite gradients and saved in
``state_dict()``; its noise comes from a private generator reseeded from ``(seed, step)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from .._validation import non_negative_int, positive, positive_int, real
from ..errors import ConfigurationError
from . import functional as F
from ._noise import step_generator
from .sam import SAM, _build_base, _non_negative, _rho
from .. import _validation as rules

__all__ = ["GAM", "BSAM"]

#: the official GAM code's ``perturb_eps``: guards the norms in the decomposition
_GAM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# GAM
# --------------------------------------------------------------------------------------------------
class GAM(SAM):
    r"""Gradient norm Aware Minimization (Zhang et al., CVPR 2023, arXiv:2303.03108): first-order flatness.

    GAM penalises the first-order flatness
    :math:`\rho' \max_{\lVert\delta\rVert\le\rho'} \lVert\nabla L(w+\delta)\rVert` (Sec. 3) beside
    SAM's zeroth-order term. Its Algorithm 1 needs Hessian-vector products; the official code (the
    GAM + SAM form reported in the paper) replaces them by gradient differences and takes four
    gradients per step, which is what this class does:

    * :math:`g_0 = \nabla L(w)` (the clean pass);
    * :math:`g_1 = \nabla L(w + \rho\, g_0/\lVert g_0\rVert)` (SAM's point);
    * :math:`g_2 = \nabla L(w_2)` at :math:`w_2 = w + \rho'\,(g_1 - g_0)/\lVert g_1 - g_0\rVert`, the
      finite-difference ascent on :math:`\lVert\nabla L\rVert` (its gradient :math:`H g/\lVert g\rVert`);
    * :math:`g_3 = \nabla L(w_2 + \rho\, g_2/\lVert g_2\rVert)`, SAM's ascent taken from :math:`w_2`.

    The update direction is :math:`d = \beta_1 g_1 + \beta_3 g_3` with
    :math:`m = g_0 + |\beta_2|\, g_2`, from which the component of :math:`m` orthogonal to :math:`d`
    is subtracted with weight :math:`\gamma` (the code's ``gradient_decompose``, in the manner of
    GSAM): :math:`d - \gamma\,(m - \cos(m, d)\,\lVert m\rVert\, d/\lVert d\rVert)`.
    ``adaptive`` uses ASAM's :math:`T = |w|` (eta 0) at every ascent, as the official code.

    Defaults: ``rho`` 0.02, ``rho_norm`` 0.2 and ``gamma`` 0.03 are the official code's
    (``grad_rho``, ``grad_norm_rho``, ``grad_gamma``); ``beta1`` 0.6, ``beta2`` 0.5 and ``beta3`` 0.4 are
    its CIFAR-100 ResNet setting (``grad_beta_1``, ``1 - grad_beta_0``, ``1 - grad_beta_1``).
    ``rho_norm=0, gamma=0, beta1=1, beta3=0`` is SAM. Cost: 4 forward/backward passes per step;
    memory: the weight backup, ``g_0``, ``g_1``, ``g_2`` and ``w_2 - w``. Needs ``step(closure)`` or a
    framework adapter (three perturbed points; the two-step form cannot express them).
    """

    variant: ClassVar[str] = "gam"
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False  # m mixes in the clean gradient
    perturbed_points: ClassVar[int] = 3

    @rules.checked(beta1=rules.non_negative, beta2=rules.real, beta3=rules.non_negative)
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.02,
        rho_norm: float = 0.2,
        beta1: float = 0.6,
        beta2: float = 0.5,
        beta3: float = 0.4,
        gamma: float = 0.03,
        adaptive: bool = False,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, rho_norm=rho_norm, beta1=beta1, beta2=beta2, beta3=beta3, gamma=gamma, adaptive=adaptive)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self,
        *,
        rho: float = 0.02,
        rho_norm: float = 0.2,
        beta1: float = 0.6,
        beta2: float = 0.5,
        beta3: float = 0.4,
        gamma: float = 0.03,
        adaptive: bool = False,
    ) -> None:
        rho = _rho(rho)
        rho_norm = _non_negative("rho_norm", rho_norm, "; the radius of GAM's gradient-norm ascent is usually 0.2")
        beta1, beta2, beta3 = real("beta1", beta1), real("beta2", beta2), real("beta3", beta3)
        gamma = _non_negative("gamma", gamma)
        self.rho, self.rho_norm, self.gamma, self.adaptive, self.interval = rho, rho_norm, gamma, bool(adaptive), 1
        self.beta1, self.beta2, self.beta3 = beta1, beta2, beta3

    @property
    def cost(self) -> tuple[float, float]:
        return (4.0, 4.0)

    def _next_point(self, params, grads, point):
        groups = self.__dict__.get("_pass_groups")
        offset = self._buffers("gam_offset", params)  # w_2 - w, kept so that w_2 is rebuilt bitwise from w
        if point == 1:
            # at w, after g_1: ascend on the gradient norm along g_1 - g_0 (official: grad_norm_ascent)
            torch._foreach_copy_(self._buffers("gam_g1", params), grads)
            torch._foreach_copy_(offset, grads)
            torch._foreach_sub_(offset, self._buffers("clean_grad", params))
            directions, norm = F.ascent_direction(params, offset, adaptive=self.adaptive, norm=self._norm(groups))
            if directions is not offset:  # adaptive: T^2 (g_1 - g_0)
                torch._foreach_copy_(offset, directions)
            F.scale_(offset, F.perturbation_scale(norm, self.rho_norm, eps=_GAM_EPS))
            torch._foreach_add_(params, offset)
            return
        # point 2, after g_2: SAM's ascent along g_2, taken from w_2 (the official code accumulates it there)
        g2 = self._buffers("gam_g2", params)
        torch._foreach_copy_(g2, grads)
        torch._foreach_add_(params, offset)  # w_2, bitwise the point where g_2 was taken
        directions, norm = F.ascent_direction(params, g2, adaptive=self.adaptive, norm=self._norm(groups))
        F.add_scaled_(params, directions, F.perturbation_scale(norm, self.rho, eps=_GAM_EPS), groups=groups)

    @staticmethod
    def _norm(groups: F.Groups | None):
        return lambda tensors: F.global_norm(tensors, groups=groups)

    def _after_perturbed_pass(self, params, grads):
        # grads holds g_3: d = beta1 g_1 + beta3 g_3, m = g_0 + |beta2| g_2 (g_2's buffer reused for m)
        torch._foreach_mul_(grads, self.beta3)
        torch._foreach_add_(grads, self._buffers("gam_g1", params), alpha=self.beta1)
        if self.gamma == 0.0:
            return
        m = self._buffers("gam_g2", params)
        torch._foreach_mul_(m, abs(self.beta2))
        torch._foreach_add_(m, self._buffers("clean_grad", params))
        d_norm, m_norm = F.global_norm(grads), F.global_norm(m)
        cosine = F.dot(m, grads) / (d_norm * m_norm + _GAM_EPS)
        # d - gamma (m - cos ||m|| d / ||d||) = (1 + gamma cos ||m|| / ||d||) d - gamma m
        F.scale_(grads, 1.0 + self.gamma * cosine * m_norm / (d_norm + _GAM_EPS))
        torch._foreach_add_(grads, m, alpha=-self.gamma)


# --------------------------------------------------------------------------------------------------
# bSAM
# --------------------------------------------------------------------------------------------------
class BSAM(SAM):
    r"""Bayesian SAM, bSAM (Möllenhoff & Khan, ICLR 2023, arXiv:2210.01620, Algorithm 1).

    SAM as the optimal convex relaxation of the Bayes objective gives an Adam-like method over a
    Gaussian posterior :math:`\mathcal N(\theta, \sigma^2)` with :math:`\sigma^2 = 1/(N s)`. Each step:

    1. :math:`\varepsilon \sim \mathcal N(0, \sigma^2)`; :math:`g = \nabla L(\theta + \varepsilon)` (the
       clean pass runs at the noisy weights: the noise is added in :meth:`prepare`);
    2. :math:`e = \rho\, g / s`; :math:`g_e = \nabla L(\theta + e)` (the ascent starts from :math:`\theta`,
       the noise removed by copy);
    3. :math:`g_m \leftarrow \beta_1 g_m + (1-\beta_1)(g_e + \delta\theta)`;
    4. :math:`s \leftarrow \beta_2 s + (1-\beta_2)(\sqrt{s}\,|g| + \delta + \gamma)`;
    5. :math:`\theta \leftarrow \theta - \alpha\, g_m / s`.

    Steps 3-5 are Algorithm 1's order (the official JAX code divides by the ``s`` of before step 4).
    bSAM is a whole optimizer: it writes :math:`g_m / s` into ``.grad`` and the base optimizer must be
    ``torch.optim.SGD`` with ``momentum=0`` and ``weight_decay=0``, whose ``lr`` is :math:`\alpha` (LR
    schedulers work as usual; the paper warms up and decays it). Defaults are the official code's:
    ``rho`` 0.1, ``beta1`` 0.9, ``beta2`` 0.999, ``damping`` :math:`\gamma` 0.1, ``s_init`` 1 and
    ``weight_decay`` :math:`\delta` = 25 / ``num_data`` (its prior precision 25); ``num_data`` (N, the
    training-set size) has no default. ``seed``: the noise of step ``t`` comes from ``(seed, t)``.
    The paper's m-sharpness (independent noise and ascent per sub-batch) is not done: one noise draw
    and one ascent per accumulation window. The update is in gradient units: use fp32/bf16, not a
    GradScaler that leaves the gradients scaled until the step. Cost: 2 forward/backward passes per
    step; memory: ``s`` and ``g_m`` (kept), the weight backup, the noisy gradient and two scratch buffers.
    """

    variant: ClassVar[str] = "bsam"
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False  # s is updated from the (noisy) clean gradient
    state_buffers: ClassVar[tuple[str, ...]] = ("s", "g_m")

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.1,
        num_data: int | None = None,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float | None = None,
        damping: float = 0.1,
        s_init: float = 1.0,
        seed: int = 0,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, num_data=num_data, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                        damping=damping, s_init=s_init, seed=seed)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self,
        *,
        rho: float = 0.1,
        num_data: int | None = None,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float | None = None,
        damping: float = 0.1,
        s_init: float = 1.0,
        seed: int = 0,
    ) -> None:
        if num_data is None:
            raise ConfigurationError(
                "BSAM needs num_data, the number of training examples N (its noise variance is 1 / (N s)); "
                "pass num_data=len(train_dataset)."
            )
        num_data = positive_int("num_data", num_data)
        rho = _rho(rho)
        beta1, beta2 = real("beta1", beta1), real("beta2", beta2)
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigurationError(f"{name} must lie in [0, 1), got {value!r}; the paper uses 0.9 and 0.999.")
        if weight_decay is not None:
            weight_decay = _non_negative("weight_decay", weight_decay)
        # damping > 0 keeps s > 0 after every update (s is a divisor), whatever the gradients
        damping = positive("damping", damping, "; it keeps the precision s away from 0 (the paper uses 0.1)")
        s_init = positive("s_init", s_init)
        seed = non_negative_int("seed", seed)
        self.rho, self.num_data, self.beta1, self.beta2 = rho, num_data, beta1, beta2
        self.weight_decay, self.damping, self.s_init, self.seed = weight_decay, damping, s_init, seed
        self.adaptive, self.interval = False, 1

    @property
    def delta(self) -> float:
        """The weight decay :math:`\\delta` in use: ``weight_decay``, or 25 / ``num_data`` (the official prior)."""
        return 25.0 / self.num_data if self.weight_decay is None else self.weight_decay

    def _validate_base(self, base: Optimizer) -> None:
        if type(base) is torch.optim.SGD:
            bad = sorted({f"{k}={g[k]!r}" for g in base.param_groups for k in ("momentum", "weight_decay", "nesterov",
                                                                                "maximize") if g.get(k)})
            got = f"SGD with {', '.join(bad)}" if bad else ""
        else:
            got = type(base).__name__
        if got:
            raise ConfigurationError(
                f"BSAM computes its own Adam-like update and needs a plain torch.optim.SGD as base optimizer, got {got}; "
                "pass torch.optim.SGD(params, lr=<bSAM's step size>) with momentum=0 and weight_decay=0 "
                "(bSAM's own beta1 and weight_decay replace them)."
            )

    # ----------------------------------------------------------------------------------- state
    def _state_filled(self, name: str, params: list[torch.Tensor], value: float) -> list[torch.Tensor]:
        """The persistent buffer ``name`` of each param, created as ``value`` where missing."""
        out = []
        for p in params:
            state = self.sam_state[p]
            if name not in state:
                state[name] = torch.full_like(p, value, memory_format=torch.preserve_format)
            out.append(state[name])
        return out

    def _standard_normal(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """N(0, 1) draws shaped like ``params`` from ``(seed, step)``: one ``randn`` per device/dtype group."""
        if not hasattr(self, "_generators"):
            self._generators: dict[torch.device, torch.Generator] = {}
        out: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for (device, dtype), idx in F.group_by_device_and_dtype(params).items():
            sizes = [params[i].numel() for i in idx]
            gen = step_generator(self._generators, device, self.seed, self._step)
            flat = torch.randn(sum(sizes), generator=gen, device=device, dtype=dtype)
            for i, chunk in zip(idx, torch.split(flat, sizes)):
                out[i] = chunk.view_as(params[i])
        return out

    # -------------------------------------------------------------------------------- protocol
    @torch.no_grad()
    def prepare(self) -> None:
        """Move to ``theta + eps``, ``eps ~ N(0, 1/(N s))``, before the forward (once per step)."""
        if self._prepared:
            return
        self._prepared = True
        params = [p for p in self._all_params() if p.requires_grad]
        if not params:
            return
        noise = self._standard_normal(params)
        std = self._buffers("direction", params)  # free until the ascent: no extra parameter copy
        torch._foreach_copy_(std, self._state_filled("s", params, self.s_init))
        torch._foreach_mul_(std, float(self.num_data))
        torch._foreach_rsqrt_(std)  # sigma = 1 / sqrt(N s)
        torch._foreach_mul_(noise, std)
        self._move(params, noise, torch.ones((), dtype=torch.float64))

    @torch.no_grad()
    def perturb(self) -> bool:
        if self._perturb_called:
            return super().perturb()  # refuses a second call before anything changes
        if not self._prepared:
            raise ConfigurationError(
                "BSAM adds its noise before the forward: call prepare() before computing the loss "
                "(step(closure) and the framework adapters do it for you)."
            )
        self._restore()  # theta back by copy: the ascent starts from the noise-free weights
        return super().perturb()

    def _ascent(self, params, grads):
        # e = rho g / s, elementwise (no norm: s is the precision)
        direction = self._buffers("direction", params)
        torch._foreach_copy_(direction, grads)
        torch._foreach_div_(direction, self._state_filled("s", params, self.s_init))
        return direction, torch.tensor(self.rho, dtype=torch.float64)

    def _after_perturbed_pass(self, params, grads):
        b1, b2, delta = self.beta1, self.beta2, self.delta
        noisy = self._buffers("clean_grad", params)  # g, taken at theta + eps
        s, g_m = self._state_filled("s", params, self.s_init), self._state_filled("g_m", params, 0.0)
        g_m_next = self._buffers("direction", params)  # the ascent direction is spent: reuse its memory
        torch._foreach_copy_(g_m_next, g_m)
        torch._foreach_mul_(g_m_next, b1)
        torch._foreach_add_(g_m_next, grads, alpha=1.0 - b1)
        if delta:
            torch._foreach_add_(g_m_next, params, alpha=(1.0 - b1) * delta)
        s_next = self._buffers("s_next", params)
        torch._foreach_copy_(s_next, s)
        torch._foreach_sqrt_(s_next)
        torch._foreach_mul_(s_next, noisy)
        torch._foreach_abs_(s_next)  # sqrt(s) |g| (sqrt(s) > 0), without a temporary |g|
        torch._foreach_add_(s_next, delta + self.damping)
        torch._foreach_mul_(s_next, 1.0 - b2)
        torch._foreach_add_(s_next, s, alpha=b2)
        # the direction the base SGD steps along: theta - lr g_m / s
        torch._foreach_copy_(grads, g_m_next)
        torch._foreach_div_(grads, s_next)
        ok = F.all_finite(grads) & self._clean_ok  # s_next >= b2 s > 0: finite iff g_m / s is
        F.select_(g_m, g_m_next, ok)  # the state is kept as it was after a non-finite gradient
        F.select_(s, s_next, ok)
