"""Curvature in *input* space, the sharpness of the *robust* loss, and the geometry at adversarial examples.

* :func:`input_hessian_eigenvalue` - the top eigenvalue of the Hessian of each example's loss with
  respect to its input, ``lambda_max(nabla_x^2 l(f(x), y))``, by Lanczos on input-space Hessian-vector
  products (the curvature CURE regularizes: Moosavi-Dezfooli et al., CVPR 2019, sec. 3), averaged over
  examples.
* :func:`robust_sharpness` - worst-case (or adaptive) sharpness of the robust loss
  ``R(w) = E max_{||delta|| <= eps} l(f_w(x + delta), y)``: ``max_{||nu|| <= rho} R(w + nu) - R(w)``, with
  the PGD examples recomputed at every perturbed weight (Stutz et al., ICCV 2021, sec. 4, "flatness of the
  robust loss"). By Danskin's theorem the weight gradient of ``R`` is the gradient of the loss at the
  adversarial examples, which is what the ascent of :func:`~sharpguard.sharpness.worst_case_sharpness`
  takes when its loss runs PGD.
* :func:`adversarial_geometry` - where the adversarial examples sit (Walter et al., ICLR 2026, sec. 6):
  confidence, input-gradient norm and input curvature at the PGD examples against the clean ones.

Every function is side-effect free (parameters, ``.grad``, buffers, modes and the global RNG are as found)
and runs the model in eval mode.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .._batches import as_batches, logits_of
from .._state import held_gathered, side_effect_free
from ..attacks import pgd
from ..attacks._context import check_labels
from ..attacks.losses import resolve_loss
from ..errors import ConfigurationError
from .lanczos import lanczos
from .operator import _math_attention_kernel, is_sharded
from .perturbation import SharpnessResult, worst_case_sharpness
from .. import _validation as rules

__all__ = [
    "AdversarialGeometry",
    "InputCurvature",
    "adversarial_geometry",
    "input_hessian_eigenvalue",
    "robust_sharpness",
]


def _xy(batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``(inputs, labels)`` batches; input-space measures need continuous tensor inputs."""
    xs, ys = [], []
    for batch in as_batches(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[0], torch.Tensor):
            raise ConfigurationError(
                "input-space measures take (inputs, labels) batches of continuous tensor inputs; "
                "for token inputs measure in embedding space instead."
            )
        x, y = batch[0], batch[1]
        if not x.dtype.is_floating_point:
            raise ConfigurationError(f"inputs must be floating point to differentiate through them, got {x.dtype}.")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ConfigurationError("labels must be a 1-D tensor of class indices, one per input.")
        y = check_labels(y, x.shape[0], required=True)
        xs.append(x.detach())
        ys.append(y.detach())
    return torch.cat(xs), torch.cat(ys)


@dataclass
class InputCurvature:
    """Per-example top eigenvalues of the input Hessian of the loss; ``mean``/``median``/``max`` over the
    ``n_examples`` measured, ``converged`` the fraction whose Lanczos residual met ``tol``."""

    mean: float
    median: float
    max: float
    values: list[float]
    n_examples: int
    n_hvp: int
    converged: float
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def _union(sharded: bool, cost_only: bool, *per_example: list[float]) -> tuple[list[float], ...]:
    """Per-example values over every rank's examples (rank order), where ``sharded``: each rank of an FSDP2 model
    measures its own probe batches, and a measure reports the union, as the weight-space measures do. A
    cost-only run reads nothing, so its (NaN) values stay this rank's."""
    if not sharded or cost_only:
        return per_example
    ranks: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, per_example)
    return tuple([v for rank in ranks for v in rank[i]] for i in range(len(per_example)))


def _input_eigs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, tol: float, max_iter: int,
                seed: int) -> tuple[list[float], int, int]:
    """Lanczos per example on ``v -> nabla_x (nabla_x l . v)``; the first-order graph is built once per
    example, under the math attention kernel, and reused by every product (one extra backward each). On
    fake tensors (``FakeTensorMode``) each example's Lanczos is a cost-only run of exactly ``max_iter``
    products (NaN values)."""
    loss_fn = resolve_loss(loss)
    cost_only = is_fake(x)
    generator = torch.Generator().manual_seed(int(seed))
    values: list[float] = []
    n_hvp = converged = 0
    kernel = _math_attention_kernel() or contextlib.nullcontext
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        # a view, not the leaf: torch's module trackers break autograd.grad with respect to a leaf input
        with kernel():  # the fused attention kernels have no double backward (operator.py)
            value = loss_fn(logits_of(model(xi.view_as(xi))), y[i : i + 1], None).sum()
            (g,) = torch.autograd.grad(value, xi, create_graph=True)
        if g.grad_fn is None:  # a loss linear in x (or a model without a curved path): zero Hessian
            values.append(0.0)
            converged += 1
            continue

        def matvec(v: torch.Tensor, g: torch.Tensor = g, xi: torch.Tensor = xi) -> torch.Tensor:
            (hv,) = torch.autograd.grad(g, xi, grad_outputs=v.view_as(xi).to(g.dtype), retain_graph=True,
                                        allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv.reshape(-1).to(v.dtype)

        v0 = torch.randn(xi.numel(), generator=generator,
                         dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        # vectors the size of one example's input: up to 20 of them cost little, and spare the restarts a
        # model-size basis needs (default_max_basis)
        out = lanczos(matvec, v0.to(x.device), k=1, which="largest", tol=tol, max_iter=max_iter, generator=generator,
                      max_basis=max(3, min(max_iter, 20)), cost_only=cost_only)
        values.append(out["eigenvalues"][0])
        n_hvp += out["n_iter"]
        converged += int(out["converged"])
    return values, n_hvp, converged


def _summary(values: list[float]) -> tuple[float, float, float]:
    if any(math.isnan(v) for v in values):  # a cost-only run (fake tensors): nothing was measured
        return math.nan, math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.median()), float(t.max())


@rules.checked()
def input_hessian_eigenvalue(
    model: nn.Module,
    batches: Any,
    *,
    n_examples: int = 64,
    loss: str = "ce",
    tol: float = 1e-3,
    max_iter: int = 30,
    seed: int = 0,
) -> InputCurvature:
    """Top eigenvalue of ``nabla_x^2 l(f(x), y)`` for each of the first ``n_examples`` probe examples.

    The input-space curvature of CURE (Moosavi-Dezfooli et al., CVPR 2019): a robust model has a loss
    that is nearly linear around its data, so small values. Lanczos (:func:`~sharpguard.sharpness.lanczos.lanczos`)
    on exact input Hessian-vector products (double backward through the input only), ``max_iter``
    products per example at most. ``loss``: an attack objective name (``"ce"``, ``"margin"``, ...).
    On a sharded (FSDP2) model every rank measures its own probe batches with the whole model gathered for
    the call (the second backward reads the weights FSDP2 would free after the first: the unsharded
    parameters' bytes on every rank while it runs), and every rank returns the values over all ranks' examples;
    ``n_hvp`` counts this rank's products.
    """
    if not (isinstance(n_examples, int) and n_examples >= 1):
        raise ConfigurationError(f"n_examples must be a positive integer, got {n_examples!r}.")
    if not (tol > 0 and math.isfinite(tol)) or not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigurationError(f"tol must be positive and max_iter a positive integer, got {tol!r} and {max_iter!r}.")
    x, y = _xy(batches)
    x, y = x[:n_examples], y[:n_examples]
    sharded, cost_only = is_sharded(model), is_fake(x)
    start = time.perf_counter()
    with side_effect_free(model, train=False, parameters=False), held_gathered(model), \
            torch.inference_mode(False), torch.enable_grad():
        values, n_hvp, converged = _input_eigs(model, x, y, loss, tol, max_iter, seed)
    values, flags = _union(sharded, cost_only, values, [float(converged)])
    mean, median, top = _summary(values)
    return InputCurvature(
        mean=mean, median=median, max=top, values=values, n_examples=len(values), n_hvp=n_hvp,
        converged=sum(flags) / len(values), seconds=time.perf_counter() - start,
        settings={"n_examples": n_examples, "loss": loss, "tol": tol, "max_iter": max_iter, "seed": seed,
                  **({"sharded": True} if sharded else {}), **({"cost_only": True} if cost_only else {})},
    )


def _pgd_attack(eps: float, alpha: float | None, steps: int, norm: str, seed: int,
                bounds: tuple[float, float] | None) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    if not (eps > 0 and math.isfinite(eps)):
        raise ConfigurationError(f"eps must be a positive number, got {eps!r}.")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigurationError(f"steps must be a positive integer, got {steps!r}.")
    step = 2.5 * eps / steps if alpha is None else alpha  # Madry et al.'s rule: the walk can cross the ball

    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # A fresh generator per call: the same random starts at every weight, so R(w) is a deterministic
        # function of w and the ascent on it is reproducible.
        gen = torch.Generator(device=x.device).manual_seed(int(seed))
        return pgd(model, x, y, eps=eps, alpha=step, steps=steps, norm=norm, bounds=bounds, generator=gen).detach()

    return attack


@rules.checked()
def robust_sharpness(
    model: nn.Module,
    batches: Any,
    *,
    eps: float,
    attack_steps: int = 10,
    alpha: float | None = None,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    rho: float = 0.05,
    steps: int = 5,
    adaptive: bool = False,
    seed: int = 0,
) -> SharpnessResult:
    """Worst-case sharpness of the robust (PGD) loss, ``max_{||nu|| <= rho} R(w + nu) - R(w)`` (Stutz et al. 2021).

    ``R`` is the mean cross entropy at PGD-``attack_steps`` examples (``eps``, ``norm``, step ``alpha``,
    default ``2.5 eps / attack_steps``), recomputed at every weight the ascent visits; ``steps`` ascent
    steps in the l2 ball of radius ``rho`` (``adaptive=True``: ASAM's ball ``|| nu / |w| || <= rho``,
    Stutz et al.'s scale-invariant choice). Returns the :class:`SharpnessResult` of
    :func:`~sharpguard.sharpness.worst_case_sharpness`; ``loss`` is ``R(w)``.
    """
    attack = _pgd_attack(eps, alpha, attack_steps, norm, seed, bounds)
    _xy(batches)  # refuse token or unlabeled batches before anything runs

    def robust_loss(net: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch[0], check_labels(batch[1], batch[0].shape[0], required=True)
        x_adv = attack(net, x, y)
        return F.cross_entropy(logits_of(net(x_adv)), y)

    result = worst_case_sharpness(model, batches, robust_loss, rho=rho, steps=steps, adaptive=adaptive)
    result.definition = "robust_" + result.definition
    result.settings = {**result.settings, "eps": eps, "attack_steps": attack_steps, "norm": norm, "seed": seed}
    return result


@dataclass
class AdversarialGeometry:
    """Where the PGD examples sit, against the clean inputs they came from (Walter et al. 2026, sec. 6).

    ``fooled``: fraction of examples the attack misclassifies; ``*_confidence``: mean top softmax
    probability (at the adversarial examples, ``adv_confidence_fooled`` over the fooled ones only: a model
    that is *confidently wrong* has it near 1); ``*_grad_norm``: mean ``||nabla_x l||_2``;
    ``*_curvature``: mean top eigenvalue of the input Hessian over the first ``n_curvature`` examples.
    """

    fooled: float
    clean_confidence: float
    adv_confidence: float
    adv_confidence_fooled: float | None
    clean_grad_norm: float
    adv_grad_norm: float
    clean_curvature: float
    adv_curvature: float
    n_examples: int
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def _confidence_and_grad(model: nn.Module, x: torch.Tensor,
                         y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u = x.clone().requires_grad_(True)
    logits = logits_of(model(u.view_as(u)))  # a view, not the leaf (see _input_eigs)
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), u)
    probs = torch.softmax(logits.detach().double(), dim=-1)
    return probs.max(-1).values, logits.detach().argmax(-1), torch.linalg.vector_norm(g.flatten(1).double(), dim=1)


@rules.checked()
def adversarial_geometry(
    model: nn.Module,
    batches: Any,
    *,
    eps: float,
    attack_steps: int = 20,
    alpha: float | None = None,
    norm: str = "linf",
    bounds: tuple[float, float] | None = (0.0, 1.0),
    n_curvature: int = 32,
    seed: int = 0,
) -> AdversarialGeometry:
    """Confidence, input-gradient norm and input curvature at PGD examples against the clean inputs.

    Walter et al. (ICLR 2026) find adversarial examples in large flat regions where the model is confidently
    wrong: there ``adv_confidence_fooled`` is high and ``adv_curvature`` low. One PGD run, one forward and
    backward per input set, and Lanczos on ``n_curvature`` examples of each. On a sharded (FSDP2) model every
    rank attacks and measures its own probe batches with the whole model gathered for the call (as
    :func:`input_hessian_eigenvalue`), and every rank returns the figures over all ranks' examples.
    """
    attack = _pgd_attack(eps, alpha, attack_steps, norm, seed, bounds)
    x, y = _xy(batches)
    sharded = is_sharded(model)
    start = time.perf_counter()
    with side_effect_free(model, train=False, parameters=False), held_gathered(model), \
            torch.inference_mode(False), torch.enable_grad():
        x_adv = attack(model, x, y)
        clean_conf, _, clean_g = _confidence_and_grad(model, x, y)
        adv_conf, adv_pred, adv_g = _confidence_and_grad(model, x_adv, y)
        k = min(n_curvature, x.shape[0])
        clean_curv, _, _ = _input_eigs(model, x[:k], y[:k], "ce", 1e-3, 30, seed)
        adv_curv, _, _ = _input_eigs(model, x_adv[:k], y[:k], "ce", 1e-3, 30, seed)
    fooled = adv_pred != y
    if is_fake(fooled):  # a cost-only run (fake tensors): the same passes, the reductions kept unread
        fooled_count = fooled.sum()
        _ = (adv_conf * fooled).sum() / fooled_count.clamp_min(1), clean_conf.mean(), clean_g.mean(), adv_g.mean()
        nan = math.nan
        return AdversarialGeometry(
            fooled=nan, clean_confidence=nan, adv_confidence=nan, adv_confidence_fooled=nan, clean_grad_norm=nan,
            adv_grad_norm=nan, clean_curvature=nan, adv_curvature=nan, n_examples=int(x.shape[0]),
            seconds=time.perf_counter() - start,
            settings={"eps": eps, "attack_steps": attack_steps, "norm": norm, "n_curvature": k, "seed": seed,
                      "cost_only": True},
        )
    # one host copy of each per-example figure, over every rank's examples where the model is sharded
    per_example = [t.detach().double().cpu().tolist() for t in (fooled, clean_conf, adv_conf, clean_g, adv_g)]
    union = _union(sharded, False, *per_example, clean_curv, adv_curv)
    fooled, clean_conf, adv_conf, clean_g, adv_g = (torch.tensor(v, dtype=torch.float64) for v in union[:5])
    fooled = fooled.bool()
    return AdversarialGeometry(
        fooled=float(fooled.double().mean()),
        clean_confidence=float(clean_conf.mean()),
        adv_confidence=float(adv_conf.mean()),
        adv_confidence_fooled=float(adv_conf[fooled].mean()) if bool(fooled.any()) else None,
        clean_grad_norm=float(clean_g.mean()),
        adv_grad_norm=float(adv_g.mean()),
        clean_curvature=_summary(union[5])[0],
        adv_curvature=_summary(union[6])[0],
        n_examples=len(union[0]),
        seconds=time.perf_counter() - start,
        settings={"eps": eps, "attack_steps": attack_steps, "norm": norm, "n_curvature": k, "seed": seed,
                  **({"sharded": True} if sharded else {})},
    )
