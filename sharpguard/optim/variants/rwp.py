"""Random weight perturbation: m-RWP and m-ARWP (Li et al., TMLR 2024).

The noise is drawn from a private generator reseeded from ``(seed, step)``: the same step draws the same
perturbation in every front end and after a resume, and the global RNG is never touched.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import functional as F
from .._noise import RowLayout, gaussian, step_generator
from ..sam import SAM, _in_unit_interval, _non_negative
from ._shared import _seed

__all__ = ["RWP", "ARWP"]


class RWP(SAM):
    r"""Mixed random weight perturbation, m-RWP (Li et al., TMLR 2024, arXiv:2404.00357).

    Minimises :math:`(1-\lambda) L(w) + \lambda\,\mathbb E_\varepsilon L(w + \varepsilon)` (the mixed
    loss): the step uses :math:`\lambda \nabla L(w + \varepsilon) + (1-\lambda) \nabla L(w)`.
    The perturbation is random, not gradient-directed, filter-wise as in the paper's code (github.com/nblt/mARWP):
    :math:`\varepsilon_{ij} \sim \mathcal N(0, \sigma^2 \lVert W_{i,:}\rVert^2)` for each output row
    ``i`` of a weight with two or more dimensions, :math:`\mathcal N(0, \sigma^2\lVert b\rVert^2)`
    for a 1-D tensor. With ``eta > 0`` it is m-ARWP: the noise of row ``i`` is divided by
    :math:`\sqrt{1 + \eta F_i}`, with :math:`F \leftarrow \beta F + \tilde g^2` accumulated from the
    perturbed gradients (summed over the row; per element for 1-D tensors), so directions of high
    curvature are perturbed less.

    The two gradients are independent (the noise does not depend on :math:`g`), so the paper can run
    them in parallel on two batches; here they are the clean pass and the replay of the same batch,
    sequential, cost 2 passes per step. The paper raises ``sigma`` during training (cosine
    increasing); set ``opt.sigma`` each step for that. ``seed``: the noise of step ``t`` comes from
    ``(seed, t)``.
    """

    variant: ClassVar[str] = "rwp"
    aliases: ClassVar[tuple[str, ...]] = ("m_rwp", "mrwp")
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False  # the step mixes in the clean gradient
    state_buffers: ClassVar[tuple[str, ...]] = ("fisher",)

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, sigma: float = 0.01, lmbda: float = 0.5, eta: float = 0.0, beta: float = 0.9, seed: int = 0
    ) -> dict[str, Any]:
        sigma = _non_negative("sigma", sigma, "; the paper's filter-wise noise scale is about 0.01")
        lmbda, eta = _in_unit_interval("lmbda", lmbda), _non_negative("eta", eta)
        beta, seed = _in_unit_interval("beta", beta), _seed(seed)
        return {"sigma": sigma, "lmbda": lmbda, "eta": eta, "beta": beta, "seed": seed,
                "adaptive": False, "interval": 1}

    def _layouts(self, params: list[torch.Tensor]) -> list[tuple[list[int], RowLayout, RowLayout]]:
        """Per device/dtype group: indices, the row layout of the noise and that of ARWP's ``F``."""
        key = list(map(id, params))
        cached = getattr(self, "_layout_cache", None)
        if cached is not None and cached[0] == key:
            return cached[2]
        groups = []
        for idx in F._group(params).values():
            ts = [params[i] for i in idx]
            noise_rows = RowLayout(ts, [0 if t.dim() > 1 else None for t in ts])
            fisher_rows = RowLayout(ts, [0 if t.dim() > 1 else "element" for t in ts])
            groups.append((idx, noise_rows, fisher_rows))
        self._layout_cache = (key, list(params), groups)
        return groups

    def _ascent(self, params, grads):
        if not hasattr(self, "_generators"):
            self._generators: dict[torch.device, torch.Generator] = {}
        directions: list[torch.Tensor] = [None] * len(params)  # type: ignore[list-item]
        fisher = self._state_list("fisher", params) if self.eta > 0 else None
        for idx, rows, frows in self._layouts(params):
            ts = [params[i] for i in idx]
            std = rows.row_sums(ts, square=True).sqrt_().mul_(self.sigma)
            gen = step_generator(self._generators, ts[0].device, self.seed, self._step)
            flat = gaussian(rows, std, gen, ts[0].dtype)
            if fisher is not None:  # the same flat order: both layouts read rows front to back
                f = frows.row_sums([fisher[i] for i in idx], square=False)
                frows.scale_rows_(flat, f.mul_(self.eta).add_(1.0).rsqrt_())
            for i, d in zip(idx, rows.split(flat)):
                directions[i] = d
        return directions, torch.ones((), device=params[0].device)

    def _after_perturbed_pass(self, params, grads):
        clean = self._buffers("clean_grad", params)
        if self.eta > 0:
            fisher = self._state_list("fisher", params)
            new = torch._foreach_mul(fisher, self.beta)
            torch._foreach_addcmul_(new, grads, grads)
            F.select_(fisher, new, torch.isfinite(F.global_norm(new)))  # keep F after an overflow
        torch._foreach_lerp_(grads, clean, 1.0 - self.lmbda)  # lambda g(w + eps) + (1 - lambda) g(w)


class ARWP(RWP):
    r"""m-ARWP (Li et al., TMLR 2024, arXiv:2404.00357): :class:`RWP` with the adaptive noise on (``eta=1``).

    The noise of output row ``i`` is :math:`\mathcal N(0, \sigma^2\lVert W_{i,:}\rVert^2 / (1 + \eta F_i))`
    with :math:`F \leftarrow \beta F + \tilde g^2` from the perturbed gradients (the paper's code).
    """

    variant: ClassVar[str] = "arwp"
    aliases: ClassVar[tuple[str, ...]] = ("m_arwp", "marwp")

    @classmethod
    def _configure(  # type: ignore[override]
        cls, *, sigma: float = 0.01, lmbda: float = 0.5, eta: float = 1.0, beta: float = 0.9, seed: int = 0
    ) -> dict[str, Any]:
        return super()._configure(sigma=sigma, lmbda=lmbda, eta=eta, beta=beta, seed=seed)
