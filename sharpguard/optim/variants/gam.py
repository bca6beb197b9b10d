"""GAM: first-order flatness from gradients at three perturbed points per step (Zhang et al., CVPR 2023).

The step engine visits the points through :meth:`~sharpguard.optim.SAM.advance` (every micro-batch of the
window is replayed at each point), so GAM runs in plain PyTorch and in every framework adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..._validation import real
from .. import functional as F
from ... import _validation as rules
from ..sam import SAM, _non_negative, _rho

__all__ = ["GAM"]

#: the official GAM code's ``perturb_eps``: guards the norms in the decomposition
_GAM_EPS = 1e-12


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
    #: GAM's betas are weights (beta2 enters as |beta2|, as in the official code), not decay rates below 1
    knob_rules: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "beta1": rules.non_negative, "beta2": rules.real, "beta3": rules.non_negative,
    }

    @classmethod
    def _configure(  # type: ignore[override]
        cls,
        *,
        rho: float = 0.02,
        rho_norm: float = 0.2,
        beta1: float = 0.6,
        beta2: float = 0.5,
        beta3: float = 0.4,
        gamma: float = 0.03,
        adaptive: bool = False,
    ) -> dict[str, Any]:
        rho = _rho(rho)
        rho_norm = _non_negative("rho_norm", rho_norm, "; the radius of GAM's gradient-norm ascent is usually 0.2")
        beta1, beta2, beta3 = real("beta1", beta1), real("beta2", beta2), real("beta3", beta3)
        gamma = _non_negative("gamma", gamma)
        return {"rho": rho, "rho_norm": rho_norm, "beta1": beta1, "beta2": beta2, "beta3": beta3, "gamma": gamma,
                "adaptive": bool(adaptive), "interval": 1}

    @classmethod
    def _cost_of(cls, knobs: dict[str, Any]) -> tuple[float, float]:
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
