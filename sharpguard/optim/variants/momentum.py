"""Momentum-SAM: the perturbation along the base optimizer's momentum, one pass per step (Becker et al., 2024)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from ...errors import ConfigurationError
from .. import functional as F
from ..sam import SAM, _rho

__all__ = ["MomentumSAM"]


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
    aliases: ClassVar[tuple[str, ...]] = ("msam", "momentumsam")

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.3, momentum_key: str | None = None
    ) -> dict[str, Any]:
        if momentum_key is not None and not isinstance(momentum_key, str):
            raise ConfigurationError(
                f"momentum_key must be the name of a per-parameter state entry or None, got {momentum_key!r}."
            )
        return {"rho": _rho(rho), "momentum_key": momentum_key, "adaptive": False, "interval": 1}

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

    @classmethod
    def _cost_of(cls, knobs: dict[str, Any]) -> tuple[float, float]:
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
