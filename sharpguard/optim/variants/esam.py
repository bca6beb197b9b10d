"""ESAM's stochastic weight perturbation, SWP (Du et al., ICLR 2022).

ESAM's other half, sharpness-sensitive data selection, acts on the per-example losses, which only the
user's loss code sees: it is the loss reducer :class:`~sharpguard.optim.SharpnessDataSelection`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..._validation import positive
from ...errors import ConfigurationError
from .. import functional as F
from .._noise import step_generator
from ..sam import SAM, _rho
from ._shared import _seed

__all__ = ["ESAM"]


class ESAM(SAM):
    r"""ESAM's stochastic weight perturbation, SWP (Du et al., ICLR 2022, arXiv:2110.03141).

    Each step perturbs a random subset of the parameter tensors: tensor ``j`` is chosen with
    probability ``beta`` (the official code's per-tensor draw), and the chosen ones move by
    :math:`e_j = \frac{\rho}{\beta}\,\frac{g_j}{\lVert g_S\rVert}` with :math:`g_S` the clean gradient
    of the chosen tensors, the :math:`1/\beta` keeping the expected perturbation SAM's.
    ``adaptive`` uses ASAM's ``T = |w|`` on the chosen tensors. The step uses :math:`\nabla L(w + e)`.

    SDS, the paper's other half (the perturbed pass on the examples whose loss rose most), is the loss
    reducer :class:`~sharpguard.optim.data_selection.SharpnessDataSelection` (``gamma`` lives there,
    default 0.5 as in the official code): call it on the per-example losses in the code both passes
    run. ESAM's paper setting is this optimizer plus that reducer.

    Cost: 2 passes per step. The paper's saving comes from not computing the clean gradient of the
    tensors left out and from running the perturbed pass on the selected subset only; here the clean
    pass is the framework's own backward and SDS masks a whole-batch replay, so neither saves compute.
    """

    variant: ClassVar[str] = "esam"
    aliases: ClassVar[tuple[str, ...]] = ("swp",)

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, rho: float = 0.05, beta: float = 0.6, adaptive: bool = False, seed: int = 0
    ) -> dict[str, Any]:
        rho, beta, seed = _rho(rho), positive("beta", beta), _seed(seed)
        if beta > 1.0:
            raise ConfigurationError(f"beta must lie in (0, 1] (the fraction of tensors perturbed), got {beta!r}.")
        return {"rho": rho, "beta": beta, "adaptive": bool(adaptive), "seed": seed, "interval": 1}

    def chosen(self, n: int) -> list[bool]:
        """Which of ``n`` parameter tensors this step perturbs (CPU generator: no device sync)."""
        if not hasattr(self, "_generators"):
            self._generators = {}
        # a real host draw even while a FakeTensorMode simulates the step: the choice is control flow
        with unset_fake_temporarily():
            gen = step_generator(self._generators, torch.device("cpu"), self.seed, self._step)
            return (torch.rand(n, generator=gen, dtype=torch.float64) < self.beta).tolist()

    def _ascent(self, params, grads):
        mask = self.chosen(len(params))
        sel = [i for i, c in enumerate(mask) if c]
        directions, norm = F.ascent_direction(
            [params[i] for i in sel], [grads[i] for i in sel], adaptive=self.adaptive
        )
        scale = F.perturbation_scale(norm, self.rho / self.beta) if sel else torch.zeros((), device=params[0].device)
        # the tensors left out move by 0 * g (exactly w for a finite g; a non-finite g is caught by
        # the clean-gradient check and restored by copy)
        chosen = set(sel)
        rest = [i for i in range(len(params)) if i not in chosen]
        out: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        for i, d in zip(rest, torch._foreach_mul([grads[i] for i in rest], 0.0) if rest else []):
            out[i] = d
        for i, d in zip(sel, directions):
            out[i] = d
        return out, scale
