"""GSAM: SAM with the surrogate gap descended as well (Zhuang et al., ICLR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import functional as F
from ..sam import SAM, _in_unit_interval, _rho
from ._shared import _ratio

__all__ = ["GSAM"]


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

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.05, alpha: float = 0.4, adaptive: bool = False
    ) -> dict[str, Any]:
        return {"rho": _rho(rho), "alpha": _in_unit_interval("alpha", alpha), "adaptive": bool(adaptive), "interval": 1}

    def _after_perturbed_pass(self, params, grads):
        clean = self._buffers("clean_grad", params)
        # g_p - alpha (g - c g_p) = (1 + alpha c) g_p - alpha g,  c = <g, g_p> / ||g_p||^2
        c = _ratio(F.dot(clean, grads), F.global_norm(grads).square())
        F.scale_(grads, 1.0 + self.alpha * c)
        torch._foreach_add_(grads, clean, alpha=-self.alpha)
