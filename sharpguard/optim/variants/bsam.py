"""bSAM: Bayesian SAM, an Adam-like optimizer over a Gaussian posterior (Möllenhoff & Khan, ICLR 2023).

It draws its noise before the clean forward (:meth:`~sharpguard.optim.SAM.prepare`, like Momentum-SAM),
ascends from the noise-free weights, and hands the base optimizer -- a plain ``torch.optim.SGD`` whose
``lr`` is bSAM's step size -- its own update direction. Its persistent state (``s``, ``g_m``) is committed
only from finite gradients and saved in ``state_dict()``; its noise comes from a private generator
reseeded from ``(seed, step)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from ..._validation import non_negative_int, positive, positive_int, real
from ...errors import ConfigurationError
from .. import functional as F
from .._noise import step_generator
from ..sam import SAM, _non_negative, _rho

__all__ = ["BSAM"]


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
    aliases: ClassVar[tuple[str, ...]] = ("b_sam", "bayesian_sam")
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False  # s is updated from the (noisy) clean gradient
    state_buffers: ClassVar[tuple[str, ...]] = ("s", "g_m")
    default_base_optimizer: ClassVar[type[Optimizer] | None] = torch.optim.SGD

    @classmethod
    def _configure(  # type: ignore[override]
        cls,
        *,
        rho: float = 0.1,
        num_data: int | None = None,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float | None = None,
        damping: float = 0.1,
        s_init: float = 1.0,
        seed: int = 0,
    ) -> dict[str, Any]:
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
        return {"rho": rho, "num_data": num_data, "beta1": beta1, "beta2": beta2, "weight_decay": weight_decay,
                "damping": damping, "s_init": s_init, "seed": seed, "adaptive": False, "interval": 1}

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
                "BSAM computes its own Adam-like update and needs a plain torch.optim.SGD as base optimizer, got "
                f"{got}; pass torch.optim.SGD(params, lr=<bSAM's step size>) with momentum=0 and weight_decay=0 "
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
