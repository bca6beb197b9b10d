"""Friendly-SAM: ascend along the batch-specific part of the gradient (Li et al., CVPR 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import functional as F
from ..sam import SAM, _in_unit_interval, _non_negative, _rho

__all__ = ["FriendlySAM"]


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
    aliases: ClassVar[tuple[str, ...]] = ("fsam", "f_sam", "friendlysam")
    per_worker_safe: ClassVar[bool] = False
    state_buffers: ClassVar[tuple[str, ...]] = ("ema",)

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9, adaptive: bool = False
    ) -> dict[str, Any]:
        rho, sigma, lmbda = _rho(rho), _non_negative("sigma", sigma), _in_unit_interval("lmbda", lmbda)
        return {"rho": rho, "sigma": sigma, "lmbda": lmbda, "adaptive": bool(adaptive), "interval": 1}

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
