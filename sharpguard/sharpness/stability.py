"""Edge-of-stability ratios and the curvature along one direction.

Gradient descent with heavy-ball momentum ``beta`` (``buf = beta buf + (1 - dampening) g``,
``w -= lr buf``) on a quadratic with curvature ``lambda`` is stable iff
``lambda < (2 + 2 beta) / ((1 - dampening) lr)``; with Nesterov momentum the bound is
``(2 + 2 beta) / ((1 + 2 beta) lr)``. Full-batch training drifts to and hovers at this threshold: the
"edge of stability" (Cohen, Kaur, Li, Kolter & Talwalkar, ICLR 2021). For Adam the relevant quantity is
the *preconditioned* sharpness ``lambda_max(P^-1/2 H P^-1/2)`` with ``P = diag(sqrt(v_hat) + eps)``
from the optimizer's ``exp_avg_sq``, against ``(2 + 2 beta1) / ((1 - beta1) lr)`` (38/lr for
beta1 = 0.9; Cohen et al., "Adaptive gradient methods at the edge of stability", 2022, sec. 3).
``ratio = lambda / threshold``: above 1 the optimizer is locally unstable along the top direction.

Coupled L2 weight decay (SGD's and Adam's ``weight_decay``) adds ``wd * I`` to the curvature the
update sees and is included; AdamW's decoupled decay is a contraction and is not. Parameter groups with
different learning rates are folded into the operator (``lr_g / lr_max``), and the threshold uses the
largest ``lr``.

:func:`directional_curvature` is ``u^T H u / ||u||^2`` along the probe gradient or the optimizer's
current update direction: one product, the cheap per-step companion of ``lambda_max`` (its crossing of
``2 / lr`` along the update precedes Adam loss spikes; arXiv 2506.04805).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .._batches import LossFn
from ..errors import ConfigurationError
from .._state import local_shard
from .._validation import positive_int
from .lanczos import (
    BasisDevice,
    _check_common,
    check_max_basis,
    default_max_basis,
    fixed_product_count,
    lanczos,
    make_operator,
    resolve_basis_device,
    start_vector,
)
from .operator import HVPMethod, HVPOperator
from .. import _validation as rules

__all__ = ["DirectionalCurvature", "EoSResult", "directional_curvature", "eos_ratio"]


@dataclass
class EoSResult:
    """``ratio = lambda_max / threshold`` for the optimizer in use (see the module docstring)."""

    ratio: float
    lambda_max: float
    threshold: float
    optimizer: str  # "sgd" or "adam"
    preconditioned: bool
    lr: float
    beta: float
    n_hvp: int
    residual: float
    converged: bool
    hvp_method: str = "autograd"
    eigenvector: torch.Tensor | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class DirectionalCurvature:
    """``value = u^T H u / ||u||^2`` along ``direction``."""

    value: float
    direction: str
    n_hvp: int
    hvp_method: str = "autograd"
    norm: float = float("nan")
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def _base_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # SAM-family wrappers keep the optimizer that applies the update in .base_optimizer
    inner = getattr(optimizer, "base_optimizer", optimizer)
    if not hasattr(inner, "param_groups") or not hasattr(inner, "state"):
        raise ConfigurationError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return inner


def _kind(opt: torch.optim.Optimizer) -> str:
    groups = opt.param_groups
    if all("betas" in g for g in groups):
        return "adam"
    if all("momentum" in g for g in groups):
        return "sgd"
    raise ConfigurationError(
        f"eos_ratio knows SGD (momentum) and Adam/AdamW (betas) thresholds; {type(opt).__name__} is neither."
    )


def _group_of(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    owner = {id(p): g for g in opt.param_groups for p in g["params"]}
    missing = sum(id(p) not in owner for p in params)
    if missing:
        raise ConfigurationError(
            f"{missing} trainable parameters are not in the optimizer; pass the optimizer that trains this model."
        )
    return [owner[id(p)] for p in params]


def _same(groups: list[dict], key: Any, what: str) -> Any:
    values = {repr(key(g)) for g in groups}
    if len(values) > 1:
        raise ConfigurationError(f"parameter groups use different {what}; eos_ratio needs one value.")
    return key(groups[0])


def _adam_denominator(opt: torch.optim.Optimizer, p: torch.Tensor, group: dict) -> torch.Tensor:
    """Adam's ``sqrt(v_hat) + eps`` for one parameter (bias-corrected, amsgrad-aware)."""
    state = opt.state.get(p, {})
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    if key not in state:
        raise ConfigurationError(
            "the optimizer has no exp_avg_sq yet; measure the Adam edge-of-stability ratio after the first step."
        )
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(state["step"]):  # a cost-only run (FakeTensorMode): no step count to read, no correction
        correction = 1.0
    else:
        correction = 1.0 - group["betas"][1] ** float(state["step"])
    return (state[key].detach() / correction).sqrt() + group["eps"]


def _preconditioner(op: HVPOperator, opt: torch.optim.Optimizer, kind: str):
    """Per-coordinate scale ``D`` and coupled decay ``wd`` so that the update's curvature is ``D(H + wd)D``."""
    # the optimizer's keys: the parameters themselves (a sharded model's DTensors; op.params are its slices)
    keys = getattr(op, "sharded_params", op.params)
    groups = _group_of(opt, keys)
    lrs = [float(g["lr"]) for g in groups]
    if min(lrs) < 0 or not all(math.isfinite(lr) for lr in lrs):
        raise ConfigurationError(f"the optimizer's learning rates must be finite and >= 0, got {sorted(set(lrs))}.")
    lr_max = max(lrs)
    stateless = _params_without_state(opt, keys, groups) if kind == "adam" else []
    if len(stateless) == len(op.params):
        raise ConfigurationError(
            "the optimizer has no exp_avg_sq yet; measure the Adam edge-of-stability ratio after the first step."
        )
    parts, decay, any_decay = [], [], False
    for i, (p, key, g) in enumerate(zip(op.params, keys, groups)):
        # relative step sizes of the groups; at lr = 0 everywhere (the end of a cosine schedule) the
        # preconditioned curvature is still defined, with equal weights, and the threshold is infinite
        relative = math.sqrt(float(g["lr"]) / lr_max) if lr_max > 0 else 1.0
        scale = torch.full(p.shape, relative, dtype=op.dtype, device=op.device)
        if kind == "adam" and i in stateless:
            # Adam never updated this parameter (it never had a gradient: an unused layer); it does not
            # move, so it is no direction of the update's dynamics - a zero scale removes it from D H D
            scale.zero_()
        elif kind == "adam":
            denominator = _adam_denominator(opt, key, g)
            if hasattr(denominator, "to_local"):  # a sharded Adam state: this rank's slice
                denominator = denominator.to_local()
            scale = scale / denominator.to(op.dtype).sqrt()
        parts.append(scale.reshape(-1))
        # torch >= 2.6 marks AdamW's groups decoupled_weight_decay=True; older AdamW has no key
        decoupled = g.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW))
        coupled = kind == "sgd" or not decoupled
        rate = float(g.get("weight_decay", 0.0)) if coupled else 0.0
        any_decay = any_decay or rate != 0.0
        decay.append(torch.full((p.numel(),), rate, dtype=op.dtype, device=op.device))
    # no coupled decay (AdamW, the default): no decay vector at all (decided on the host, nothing read back)
    return torch.cat(parts), torch.cat(decay) if any_decay else None, lr_max, groups, stateless


def _params_without_state(opt: torch.optim.Optimizer, params: list[torch.Tensor], groups: list[dict]) -> list[int]:
    """Indices of the trainable parameters for which Adam holds no second moment (never had a gradient)."""
    out = []
    for i, (p, g) in enumerate(zip(params, groups)):
        key = "max_exp_avg_sq" if g.get("amsgrad") else "exp_avg_sq"
        if key not in opt.state.get(p, {}):
            out.append(i)
    return out


@rules.checked()
def eos_ratio(
    model: nn.Module,
    batches: Any,
    optimizer: Any,
    loss_fn: LossFn | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 50,
    init: torch.Tensor | list[torch.Tensor] | None = None,
    seed: int = 0,
    hvp: HVPMethod = "auto",
    train: bool = False,
    check_determinism: bool = True,
    cache_graph: bool | None = None,
    micro_batches: int | Literal["auto"] = "auto",
    max_basis: int | None = None,
    basis_device: BasisDevice = "auto",
    fixed_products: int | None = None,
) -> EoSResult:
    """Top (preconditioned) curvature against the stability threshold of ``optimizer``.

    ``optimizer``: torch SGD (any momentum, dampening, Nesterov) or Adam/AdamW (after its first step), or a
    SAM-family wrapper around one. ``init`` warm-starts Lanczos from a previous ``result.eigenvector``.
    ``max_basis`` bounds the Lanczos vectors kept (see :func:`hessian_eigenvalues`). With Adam,
    parameters that never received a gradient (no ``exp_avg_sq``) are left out of the operator, with a
    ``RuntimeWarning`` and their count in ``settings["params_without_state"]``. ``micro_batches``,
    ``basis_device`` and ``fixed_products`` are those of :func:`hessian_eigenvalues`; on fake tensors
    (``FakeTensorMode``) the call is a cost-only run (NaN ratio, ``settings["cost_only"]``, exactly
    ``fixed_products`` products, by default ``min(max_iter, max_basis + 1)``).
    """
    _check_common(1, tol, max_iter)
    check_max_basis(max_basis, 1, "largest")
    if fixed_products is not None:
        positive_int("fixed_products", fixed_products)
    opt = _base_optimizer(optimizer)
    kind = _kind(opt)
    where = resolve_basis_device(basis_device, next(p for p in model.parameters()).device)
    start = time.perf_counter()
    op, reduce, generator = make_operator(
        model, batches, loss_fn, seed=seed, hvp=hvp, train=train, check_determinism=check_determinism,
        cache_graph=cache_graph, micro_batches=micro_batches, host_device=where,
    )
    with op:
        d, decay, lr, groups, stateless = _preconditioner(op, opt, kind)  # validates before any product
        if stateless:
            names = _names(model, [op.params[i] for i in stateless])
            warnings.warn(
                f"{len(stateless)} trainable parameters have no Adam state (they never received a gradient: "
                f"{names}); the preconditioned sharpness is measured over the {len(op.params) - len(stateless)} "
                f"parameters Adam updates.",
                RuntimeWarning,
                stacklevel=2,
            )
        if kind == "adam":
            beta = float(_same(groups, lambda g: g["betas"][0], "betas"))
            scale = (1 - beta) * lr
        else:
            beta = float(_same(groups, lambda g: g["momentum"], "momentum"))
            dampening = float(_same(groups, lambda g: g.get("dampening", 0.0), "dampening")) if beta else 0.0
            nesterov = bool(_same(groups, lambda g: g.get("nesterov", False), "nesterov"))
            scale = (1 + 2 * beta) * lr if nesterov else (1 - dampening) * lr
        # lr = 0: no step is taken, nothing can be unstable (ratio 0)
        threshold = (2 + 2 * beta) / scale if scale > 0 else math.inf

        def matvec(v: torch.Tensor) -> torch.Tensor:
            # D (H + wd I) D v with one model-size temporary besides the product (which is ours to modify)
            dv = d * v
            hv = op.matvec(dv)
            if decay is not None:
                hv.addcmul_(dv, decay)
            del dv
            return hv.mul_(d)

        def first_vector() -> torch.Tensor:
            # start in the subspace the operator acts on (out of place: init may be the caller's tensor)
            v0 = start_vector(op, init, generator)
            return v0 * (d != 0) if stateless else v0

        cap = max_basis if max_basis is not None else default_max_basis(1, "largest")
        fixed = fixed_product_count(fixed_products, op.cost_only, max_iter, cap)
        out = lanczos(
            matvec,
            first_vector(),  # not kept here: the basis holds its normalized copy
            k=1,
            which="largest",
            tol=tol,
            max_iter=max_iter if fixed is None else fixed,
            generator=generator,
            return_eigenvectors=True,
            max_basis=max_basis,
            reduce=reduce,
            basis_device=where,
            cost_only=op.cost_only,
            stop_early=fixed is None,
        )
    lam = out["eigenvalues"][0]
    return EoSResult(
        ratio=lam / threshold,
        lambda_max=lam,
        threshold=threshold,
        optimizer=kind,
        preconditioned=kind == "adam",
        lr=lr,
        beta=beta,
        n_hvp=op.n_hvp,
        residual=out["residuals"][0],
        converged=out["converged"],
        hvp_method=str(op.method),
        eigenvector=out["eigenvectors"][0],
        seconds=time.perf_counter() - start,
        settings={
            "tol": tol,
            "max_iter": max_iter,
            "seed": seed,
            "warm_start": init is not None,
            "train": train,
            "probe_examples": op.n_examples,
            "max_basis": max_basis,
            "params_without_state": len(stateless),
            "micro_batches": op.micro_batches,
            "basis_device": str(where),
            "fixed_products": fixed,
            "cost_only": op.cost_only,
        },
    )


def _names(model: nn.Module, params: list[torch.Tensor], limit: int = 3) -> str:
    ids = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _update_direction(op: HVPOperator, optimizer: Any) -> torch.Tensor:
    """The direction of the optimizer's next update from its state (momentum buffer or Adam's m/sqrt(v));
    on a sharded model this rank's slice of it, from the state of its DTensor parameters."""
    opt = _base_optimizer(optimizer)
    kind = _kind(opt)
    keys = getattr(op, "sharded_params", op.params)  # the optimizer's keys (a sharded model's DTensors)
    groups = _group_of(opt, keys)
    parts = []
    for p, key, g in zip(op.params, keys, groups):
        state = {k: local_shard(v) if isinstance(v, torch.Tensor) else v for k, v in opt.state.get(key, {}).items()}
        if kind == "sgd":
            buf = state.get("momentum_buffer")
            if buf is None:
                raise ConfigurationError(
                    "SGD keeps no update direction without momentum (or before its first step); "
                    "use direction='gradient'."
                )
            u = float(g["lr"]) * buf.detach()
        else:
            if "exp_avg" not in state:
                # never updated (no gradient yet): it contributes no update, unless nothing has state
                if not any("exp_avg" in opt.state.get(q, {}) for q in keys):
                    raise ConfigurationError("the optimizer has no exp_avg yet; measure after its first step.")
                parts.append(torch.zeros(p.numel(), device=op.device, dtype=op.dtype))
                continue
            step = float(state["step"])
            m_hat = state["exp_avg"].detach() / (1.0 - g["betas"][0] ** step)
            u = float(g["lr"]) * m_hat / local_shard(_adam_denominator(opt, key, g))
        parts.append(u.reshape(-1).to(device=op.device, dtype=op.dtype))
    return torch.cat(parts)


@rules.checked()
def directional_curvature(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    direction: Literal["gradient", "update"] | torch.Tensor | list[torch.Tensor] = "gradient",
    optimizer: Any = None,
    hvp: HVPMethod = "auto",
    train: bool = False,
    check_determinism: bool = True,
    cache_graph: bool | None = None,
    micro_batches: int | Literal["auto"] = "auto",
) -> DirectionalCurvature:
    """``u^T H u / ||u||^2`` for ``u`` the probe gradient, the optimizer's update direction
    (``direction="update"``, needs ``optimizer``) or a given vector. One product (two with the
    determinism check); ``"gradient"`` adds one gradient pass. On fake tensors (``FakeTensorMode``) a
    cost-only run: the same passes, NaN value and norm."""
    if not isinstance(direction, (str, torch.Tensor, list, tuple)):
        raise ConfigurationError(
            "direction must be 'gradient', 'update' or a vector (a tensor or a list of tensors), got "
            f"{rules.shown(direction)}."
        )
    if isinstance(direction, str) and direction not in ("gradient", "update"):
        raise ConfigurationError(f"direction must be 'gradient', 'update' or a vector, got {direction!r}.")
    if isinstance(direction, str) and direction == "update" and optimizer is None:
        raise ConfigurationError("direction='update' needs the optimizer; pass optimizer=.")
    start = time.perf_counter()
    op, _, _ = make_operator(
        model, batches, loss_fn, seed=0, hvp=hvp, train=train, check_determinism=check_determinism,
        cache_graph=cache_graph, micro_batches=micro_batches,
    )
    with op:
        if isinstance(direction, str) and direction == "gradient":
            _, u = op.loss_and_grad()
        elif isinstance(direction, str):
            u = _update_direction(op, optimizer)
        else:
            u = op.as_vector(direction, "direction")
        # norms and the inner product over every rank's slice of a sharded model
        if op.cost_only:  # nothing to read: the same operations, NaN results
            u = u / op._norm_tensor(u)
            norm = value = op._read(op._sum_over_slices(u @ op.matvec(u)))
        else:
            norm = op.vector_norm(u)
            if not (norm > 0 and math.isfinite(norm)):
                raise ConfigurationError(
                    f"the {direction if isinstance(direction, str) else 'given'} direction is zero "
                    "or not finite; curvature along it is undefined."
                )
            u = u / norm
            value = float(op._sum_over_slices(u @ op.matvec(u)))
    return DirectionalCurvature(
        value=value,
        direction=direction if isinstance(direction, str) else "given",
        n_hvp=op.n_hvp,
        hvp_method=str(op.method),
        norm=norm,
        seconds=time.perf_counter() - start,
        settings={"train": train, "probe_examples": op.n_examples, "micro_batches": op.micro_batches,
                  "cost_only": op.cost_only, **({"sharded": True} if op.supports_sharded else {})},
    )
