"""LookSAM: SAM's extra gradient every ``k`` steps only (Liu et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import functional as F
from ..sam import SAM, _non_negative, _positive_int, _rho
from ._shared import _ratio

__all__ = ["LookSAM"]


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
    aliases: ClassVar[tuple[str, ...]] = ("look_sam",)
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False
    state_buffers: ClassVar[tuple[str, ...]] = ("gv",)

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.05, k: int = 5, alpha: float = 0.7, adaptive: bool = False
    ) -> dict[str, Any]:
        return {"rho": _rho(rho), "k": _positive_int("k", k), "alpha": _non_negative("alpha", alpha),
                "adaptive": bool(adaptive)}

    @property
    def interval(self) -> int:  # type: ignore[override]
        """SAM's cadence, a perturbed pass every ``k``-th step (needs_second_pass): ``k`` under the base
        class's name."""
        return self.k

    @interval.setter
    def interval(self, value: int) -> None:
        self.k = value  # validated as the knob k

    @classmethod
    def _cost_of(cls, knobs: dict[str, Any]) -> tuple[float, float]:
        n = 1.0 + 1.0 / knobs["k"]
        return (n, n)

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
