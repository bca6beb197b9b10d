"""Cheaper and requested sharpness-aware variants (issue 14): WSAM, m-RWP / m-ARWP and ESAM's SWP.

Each is a thin layer over :class:`~.sam.SAM` and speaks the same adapter protocol
(``prepare`` / ``perturb`` / ``unperturb`` / ``cancel``), so it runs unchanged in plain PyTorch, the
Lightning callback, the Hugging Face Trainer and the Accelerate helper. What is random (RWP's noise,
ESAM's subset) is drawn from a private generator reseeded from ``(seed, step)``: the same step draws
the same perturbation in every front end and after a resume, and the global RNG is never touched.

GAM and bSAM, which need more than one perturbed point per step or their own update, are in
:mod:`.variants_multi` (the engine's ``advance()`` step).

ESAM's other half, sharpness-sensitive data selection (SDS), acts on the per-example losses, which
only the user's loss code sees: it is the loss reducer
:class:`~sharpguard.optim.data_selection.SharpnessDataSelection` (works with any variant here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.optim import Optimizer

from .._validation import non_negative_int, positive
from ..errors import ConfigurationError
from . import functional as F
from ._noise import RowLayout, gaussian, step_generator
from .sam import SAM, _build_base, _in_unit_interval, _non_negative, _rho
from .variants import _ratio
from .. import _validation as rules

__all__ = ["WSAM", "RWP", "ARWP", "ESAM"]


def _seed(value: Any) -> int:
    return non_negative_int("seed", value)


# --------------------------------------------------------------------------------------------------
# WSAM
# --------------------------------------------------------------------------------------------------
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

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.05,
        gamma: float = 0.9,
        decouple: bool = True,
        adaptive: bool = False,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, gamma=gamma, decouple=decouple, adaptive=adaptive)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self, *, rho: float = 0.05, gamma: float = 0.9, decouple: bool = True, adaptive: bool = False
    ) -> None:
        rho, gamma = _rho(rho), _in_unit_interval("gamma", gamma)
        if gamma >= 1.0:
            raise ConfigurationError("gamma must be < 1 (the sharpness weight is gamma / (1 - gamma)); the paper uses 0.8 to 0.95.")
        self.rho, self.gamma, self.decouple, self.adaptive, self.interval = rho, gamma, bool(decouple), bool(adaptive), 1

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
            idx = [position[id(p)] for p in group["params"] if id(p) in position and params[position[id(p)]].grad is not None]
            if not idx:
                continue
            terms = [sharpness[i] for i in idx]
            F.scale_(terms, unit)
            lr = group["lr"]
            step = -self.alpha * (lr if torch.is_tensor(lr) else torch.tensor(float(lr), dtype=torch.float64))
            F.add_scaled_([params[i] for i in idx], terms, step)


# --------------------------------------------------------------------------------------------------
# random weight perturbation
# --------------------------------------------------------------------------------------------------
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
    uses_clean_gradient: ClassVar[bool] = True
    per_worker_safe: ClassVar[bool] = False  # the step mixes in the clean gradient
    state_buffers: ClassVar[tuple[str, ...]] = ("fisher",)

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        sigma: float = 0.01,
        lmbda: float = 0.5,
        eta: float = 0.0,
        beta: float = 0.9,
        seed: int = 0,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(sigma=sigma, lmbda=lmbda, eta=eta, beta=beta, seed=seed)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self, *, sigma: float = 0.01, lmbda: float = 0.5, eta: float = 0.0, beta: float = 0.9, seed: int = 0
    ) -> None:
        sigma = _non_negative("sigma", sigma, "; the paper's filter-wise noise scale is about 0.01")
        lmbda, eta = _in_unit_interval("lmbda", lmbda), _non_negative("eta", eta)
        beta, seed = _in_unit_interval("beta", beta), _seed(seed)
        self.sigma, self.lmbda, self.eta, self.beta, self.seed = sigma, lmbda, eta, beta, seed
        self.adaptive, self.interval = False, 1

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

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        sigma: float = 0.01,
        lmbda: float = 0.5,
        eta: float = 1.0,
        beta: float = 0.9,
        seed: int = 0,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(sigma=sigma, lmbda=lmbda, eta=eta, beta=beta, seed=seed)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self, *, sigma: float = 0.01, lmbda: float = 0.5, eta: float = 1.0, beta: float = 0.9, seed: int = 0
    ) -> None:
        super()._configure(sigma=sigma, lmbda=lmbda, eta=eta, beta=beta, seed=seed)


# --------------------------------------------------------------------------------------------------
# ESAM
# --------------------------------------------------------------------------------------------------
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

    @rules.checked()
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer_cls: type[Optimizer],
        *,
        rho: float = 0.05,
        beta: float = 0.6,
        adaptive: bool = False,
        seed: int = 0,
        model: nn.Module | None = None,
        sync_perturbation: bool = False,
        nonfinite: str = "skip",
        **base_kwargs: Any,
    ) -> None:
        self._configure(rho=rho, beta=beta, adaptive=adaptive, seed=seed)
        self._attach(_build_base(type(self).__name__, params, base_optimizer_cls, base_kwargs), model, sync_perturbation, nonfinite)

    def _configure(  # type: ignore[override]
        self, *, rho: float = 0.05, beta: float = 0.6, adaptive: bool = False, seed: int = 0
    ) -> None:
        rho, beta, seed = _rho(rho), positive("beta", beta), _seed(seed)
        if beta > 1.0:
            raise ConfigurationError(f"beta must lie in (0, 1] (the fraction of tensors perturbed), got {beta!r}.")
        self.rho, self.beta, self.adaptive, self.seed, self.interval = rho, beta, bool(adaptive), seed, 1

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
