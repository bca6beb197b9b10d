"""WSAM: sharpness as a weighted regulariser, applied after the base step (Yue et al., KDD 2023)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from ...errors import ConfigurationError
from .. import functional as F
from ..sam import SAM, _in_unit_interval, _rho
from ._shared import _ratio

__all__ = ["WSAM"]


class WSAM(SAM):
    r"""Weighted SAM (Yue et al., KDD 2023, arXiv:2305.15817): sharpness as a weighted regulariser.

    The loss is :math:`L(w) + \frac{\gamma}{1-\gamma}\,(L(w + e) - L(w))` with SAM's
    :math:`e = \rho g / \lVert g\rVert`. With ``decouple=True`` (the paper's "weight decouple",
    its default) the base optimizer steps with the clean gradient :math:`g` and
    the sharpness term is applied after its step, outside its state:
    :math:`w \leftarrow \mathrm{base}(w, g) - \eta\,\alpha\,(\tilde g - g)`, with
    :math:`\alpha = \gamma / (1-\gamma)`, :math:`\tilde g = \nabla L(w + e)` and :math:`\eta` the group's
    learning rate. With ``decouple=False`` the base optimizer gets :math:`g + \alpha(\tilde g - g)`
    ``gamma=0.5`` without decoupling is SAM.

    The decoupled term is applied by a step post-hook on the base optimizer, so it follows whatever
    calls ``base_optimizer.step()`` (every front end; a GradScaler that skips a step skips it too).
    It is measured in the units of the gradient the base optimizer receives: the term is rescaled by
    ``||grad at step|| / ||clean grad||``, so a loss scale unscaled (or a clip applied) before the
    step acts on it as on the gradient. Cost: 2 passes per step, one extra gradient buffer.
    """

    variant: ClassVar[str] = "wsam"
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False  # the step uses the clean gradient

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True, adaptive: bool = False
    ) -> dict[str, Any]:
        rho, gamma = _rho(rho), _in_unit_interval("gamma", gamma)
        if gamma >= 1.0:
            raise ConfigurationError(
                "gamma must be < 1 (the sharpness weight is gamma / (1 - gamma)); the paper uses 0.8 to 0.95."
            )
        return {"rho": rho, "gamma": gamma, "decouple": bool(decouple), "adaptive": bool(adaptive), "interval": 1}

    @property
    def alpha(self) -> float:
        """The sharpness weight :math:`\\gamma / (1 - \\gamma)`."""
        return self.gamma / (1.0 - self.gamma)

    def _validate_base(self, base: Optimizer) -> None:
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._hook = base.register_step_post_hook(self._decoupled_step)

    def perturb(self) -> bool:
        self._pending = None  # a sharpness term whose base step never ran (GradScaler skip) is dropped
        return super().perturb()

    def cancel(self) -> None:
        self._pending = None
        super().cancel()

    def _after_perturbed_pass(self, params, grads):
        clean = self._buffers("clean_grad", params)
        if not self.decouple:
            torch._foreach_lerp_(grads, clean, 1.0 - self.alpha)  # g~ + (1 - alpha)(g - g~) = g + alpha (g~ - g)
            return
        sharpness = self._buffers("sharpness", params)
        torch._foreach_copy_(sharpness, grads)
        torch._foreach_sub_(sharpness, clean)  # g~ - g
        ok = torch.isfinite(F.global_norm(sharpness))
        F.select_(sharpness, self._zeros(params), ~ok)  # never a non-finite term
        # the clean g when the step is sound; otherwise leave g~ so that the fault policy sees, counts
        # and handles it like any variant's (fallback to the clean gradient, or skip)
        F.select_(grads, clean, ok)
        self._pending = (params, sharpness, clean)

    def _zeros(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Zero tensors shaped like ``params`` that hold no memory (expanded 0-dim zeros), built once."""
        ids = list(map(id, params))
        cached = getattr(self, "_zero_views", None)
        if cached is None or cached[0] != ids:
            scalars: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
            views = []
            for p in params:
                key = (p.device, p.dtype)
                if key not in scalars:
                    scalars[key] = torch.zeros((), device=p.device, dtype=p.dtype)
                views.append(scalars[key].expand_as(p))
            cached = self._zero_views = (ids, list(params), views)
        return cached[2]

    @torch.no_grad()
    def _decoupled_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        params, sharpness, clean = pending
        live = [i for i, p in enumerate(params) if p.grad is not None]  # nonfinite="skip" sets them to None
        if not live:
            return
        # the gradient the base optimizer used, relative to the clean one we kept (1 exactly without
        # a scaler or clipping): the sharpness term follows the same unscaling
        unit = _ratio(F.global_norm([params[i].grad for i in live]), F.global_norm([clean[i] for i in live]))
        position = {id(p): i for i, p in enumerate(params)}
        for group in optimizer.param_groups:
            idx = [position[id(p)] for p in group["params"]
                   if id(p) in position and params[position[id(p)]].grad is not None]
            if not idx:
                continue
            terms = [sharpness[i] for i in idx]
            F.scale_(terms, unit)
            lr = group["lr"]
            step = -self.alpha * (lr if torch.is_tensor(lr) else torch.tensor(float(lr), dtype=torch.float64))
            F.add_scaled_([params[i] for i in idx], terms, step)
