"""Relative flatness of a layer (Petzka et al., NeurIPS 2021), exact, in closed form for a softmax head.

For a layer with weight matrix ``W`` (rows ``w_s``, one per output neuron ``s``) Petzka et al. define
(Definition 3, "relative flatness with respect to the trace")

    kappa(W) = sum_{s, s'} <w_s, w_s'> Tr(H_{s,s'}),

where ``H_{s,s'}`` is the block of the Hessian of the empirical loss with respect to ``w_s`` and ``w_s'``.
Scaling ``W`` by ``1/a`` and the layer's input features by ``a`` (the reparametrization of Dinh et al.,
ICML 2017, on a ReLU network) leaves it unchanged, unlike ``lambda_max`` or the trace. The *neuronwise*
variant keeps only the diagonal blocks, ``sum_s ||w_s||^2 Tr(H_{s,s})``; it is invariant to the same
layer-wise rescaling.

Walter et al. (ICLR 2026, arXiv 2510.14231) use the layer that maps the penultimate representation
``phi(x)`` to the logits, where the Hessian has a closed form: for ``z = W phi + b`` and cross entropy,
``d^2 l / dW_{s,i} dW_{s',j} = phi_i phi_j A_{s,s'}`` with ``A = diag(p) - p p^T``, ``p = softmax(z)``, so

    Tr(H_{s,s'}) = E_x[ ||phi(x)||^2 A_{s,s'}(x) ],
    kappa        = E_x[ ||phi(x)||^2 ( sum_s p_s ||w_s||^2 - ||W^T p||^2 ) ],

one forward pass over the probe set. Any other loss (or a layer whose output is not the logits) uses the
exact Hessian-vector-product path: one product per entry of ``W`` (``d_out * d_in`` of them) over that
layer's weight only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from .._batches import LossFn, as_batches, batch_size, logits_of
from .._state import side_effect_free
from ..errors import ConfigurationError, NonFiniteLossError
from .operator import HVPOperator, examples_over_ranks, is_sharded
from .. import _validation as rules

__all__ = ["RelativeFlatnessResult", "relative_flatness", "penultimate_linear"]

Method = Literal["auto", "closed_form", "hvp"]


@dataclass
class RelativeFlatnessResult:
    """Relative flatness ``value`` (Petzka et al.'s Definition 3, all blocks) and ``neuronwise`` (diagonal
    blocks only) of the layer ``layer``; ``block_traces[s][s']`` is ``Tr(H_{s,s'})``. ``method`` says how
    the Hessian blocks were obtained (``"closed_form"`` or ``"hvp"``, with ``n_hvp`` products)."""

    value: float
    neuronwise: float
    layer: str
    method: str
    n_examples: int
    block_traces: list[list[float]]
    n_hvp: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


@rules.checked()
def penultimate_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in ``model.named_modules()`` order: the layer fed by the penultimate
    representation in an MLP or a CNN/transformer with a linear head."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigurationError(
            "the model has no nn.Linear layer; pass layer= the module (or its name) whose weight relative flatness is "
            "about."
        )
    return found[-1]


def _resolve_layer(model: nn.Module, layer: str | nn.Module | None) -> tuple[str, nn.Module]:
    if layer is None:
        return penultimate_linear(model)
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            raise ConfigurationError(f"the model has no submodule named {layer!r}; pass a name from "
                                     "model.named_modules().")
        module = modules[layer]
        name = layer
    elif isinstance(layer, nn.Module):
        name = next((n for n, m in model.named_modules() if m is layer), None)
        if name is None:
            raise ConfigurationError("layer is not a submodule of model; pass one of model's own modules.")
        module = layer
    else:
        raise ConfigurationError(f"layer must be a module, a submodule name or None, got {type(layer).__name__}.")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigurationError(
            f"layer {name!r} has no 2-D weight (out_features x in_features); relative flatness needs a linear layer."
        )
    return name, module


def _closed_form(model: nn.Module, module: nn.Module, batches: list[Any],
                 sharded: bool = False) -> tuple[torch.Tensor, int] | None:
    """``Tr(H_{s,s'})`` from the softmax closed form and the examples it is averaged over, or ``None`` when it
    does not apply (the layer's output is not the model's logits, its input is not ``(batch, features)``, or the
    batches are not tuples). On fake tensors (no values to compare) a layer output of the logits' shape is taken
    to be the logits. ``sharded`` (FSDP2, every rank its own batches): the sums and the count over every rank's."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured["phi"], captured["z"] = inputs[0], output

    total = None
    n = 0
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    return None
                x, y = batch[0], batch[1]
                logits = logits_of(model(x))
                phi, z = captured.get("phi"), captured.get("z")
                # The closed form holds only if the layer's output *is* the logits the loss sees.
                if phi is None or z is None or phi.dim() != 2 or z.shape != logits.shape:
                    return None
                if not (is_fake(z) or torch.equal(z, logits)):
                    return None
                if not (isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point()):
                    return None
                p = torch.softmax(logits.double(), dim=-1)
                sq = (phi.double() ** 2).sum(dim=1)  # ||phi(x)||^2 per example
                # sum_x ||phi||^2 (diag(p) - p p^T), with the diagonal p_s (1 - p_s) formed without cancellation:
                # for the top class 1 - p_s is the sum of the other (small) probabilities, not 1 minus ~1, so a
                # saturated softmax gives a tiny positive curvature instead of rounding noise of either sign.
                top = F.one_hot(p.argmax(-1), p.shape[-1]).bool()
                rest = torch.where(top, p.masked_fill(top, 0.0).sum(-1, keepdim=True), 1.0 - p)
                block = -((sq[:, None] * p).T @ p)
                block.diagonal().copy_((sq[:, None] * p * rest).sum(0))
                total = block if total is None else total + block
                n += x.shape[0]
                captured.clear()
    finally:
        handle.remove()
    if total is not None and sharded:  # the same structure on every rank: all ranks reach this together
        torch.distributed.all_reduce(total)
        n = examples_over_ranks(n, is_fake(total), total.device)
    if total is None or (not is_fake(total) and not bool(torch.isfinite(total).all())):
        return None
    return total / n, n


def _hvp_blocks(model: nn.Module, module: nn.Module, batches: list[Any],
                loss_fn: LossFn | None) -> tuple[torch.Tensor, int]:
    """``Tr(H_{s,s'})`` from exact Hessian-vector products over the layer's weight only."""
    weight = module.weight
    d_out, d_in = weight.shape
    with side_effect_free(model, train=None, parameters=False):
        # Only the layer's weight stays trainable, so the operator's Hessian is the weight's block;
        # the guard restores every requires_grad flag afterwards.
        for p in model.parameters():
            p.requires_grad_(p is weight)
        op = HVPOperator(model, batches, loss_fn, hvp="autograd")
        blocks = torch.zeros(d_out, d_out, dtype=torch.float64)
        with op:
            for s2 in range(d_out):
                for i in range(d_in):
                    e = torch.zeros(d_out, d_in, dtype=op.dtype, device=op.device)
                    e[s2, i] = 1.0
                    column = op.matvec(e.reshape(-1)).reshape(d_out, d_in)
                    blocks[:, s2] += column[:, i].double().cpu()  # H[(s, i), (s2, i)] for every s
        return blocks, op.n_hvp


@rules.checked()
def relative_flatness(
    model: nn.Module,
    batches: Any,
    loss_fn: LossFn | None = None,
    *,
    layer: str | nn.Module | None = None,
    method: Method = "auto",
    max_hvp: int = 20_000,
) -> RelativeFlatnessResult:
    """Relative flatness ``sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'})`` of ``layer`` (Petzka et al. 2021, Def. 3).

    ``layer``: the module or its name; default the last ``nn.Linear`` (the penultimate-layer weights of
    Walter et al. 2026). ``method="auto"`` uses the softmax closed form (module docstring) when the loss
    is the default cross entropy and the layer outputs the logits, else exact Hessian-vector products
    over the layer's weight (refused above ``max_hvp`` products). The Hessian is that of the mean loss
    over the probe examples, in eval mode; the model is left exactly as found.
    """
    if method not in ("auto", "closed_form", "hvp"):
        raise ConfigurationError(f"method must be 'auto', 'closed_form' or 'hvp', got {method!r}.")
    sharded = is_sharded(model)
    name, module = _resolve_layer(model, layer)
    batch_list = as_batches(batches)
    weight = module.weight
    d_out, d_in = weight.shape
    start = time.perf_counter()
    closed = None
    used = "closed_form"
    n_hvp = 0
    if method in ("auto", "closed_form") and loss_fn is None:
        with side_effect_free(model, train=False, parameters=False):
            closed = _closed_form(model, module, batch_list, sharded)
    if closed is None and sharded:
        # the exact path differentiates with respect to the layer's weight, which FSDP keeps out of autograd's reach
        raise ConfigurationError(
            "on a sharded (FSDP2) model relative_flatness takes the closed form only: the default cross-entropy "
            "(no loss_fn, method 'auto' or 'closed_form'), (inputs, labels) batches and a layer whose output is the "
            "model's logits; measure an unsharded copy otherwise."
        )
    if closed is not None:
        blocks, n_examples = closed
    else:
        if method == "closed_form":
            raise ConfigurationError(
                "the closed form needs the default cross-entropy loss, (inputs, labels) batches and a layer whose "
                "output is the model's logits; pass method='hvp' (or 'auto') for any other case."
            )
        if d_out * d_in > max_hvp:
            raise ConfigurationError(
                f"the exact path needs {d_out * d_in} Hessian-vector products (one per weight of layer {name!r}), "
                f"more than max_hvp={max_hvp}; raise max_hvp or use the default cross-entropy loss for the closed form."
            )
        if not weight.requires_grad:
            raise ConfigurationError(f"layer {name!r}'s weight does not require grad; unfreeze it to measure "
                                     "its curvature.")
        blocks, n_hvp = _hvp_blocks(model, module, batch_list, loss_fn)
        used = "hvp"
        n_examples = sum(batch_size(b) for b in batch_list)
    # a sharded layer's weight is gathered whole on every rank (one layer: d_out x d_in)
    w = (weight.full_tensor() if hasattr(weight, "full_tensor") else weight).detach().double().cpu()
    gram = w @ w.T  # <w_s, w_s'>
    value_t = (gram * blocks).sum()
    neuronwise_t = (torch.diagonal(gram) * torch.diagonal(blocks)).sum()
    cost_only = is_fake(value_t)  # fake tensors: the same passes and products, nothing read (NaN)
    value = math.nan if cost_only else float(value_t)
    neuronwise = math.nan if cost_only else float(neuronwise_t)
    if not cost_only and not (torch.isfinite(torch.tensor([value, neuronwise])).all()):
        raise NonFiniteLossError("relative flatness is not finite; check the model and the probe set for overflow.")
    return RelativeFlatnessResult(
        value=value,
        neuronwise=neuronwise,
        layer=name,
        method=used,
        n_examples=n_examples,
        block_traces=[[math.nan] * d_out for _ in range(d_out)] if cost_only else blocks.tolist(),
        n_hvp=n_hvp,
        seconds=time.perf_counter() - start,
        settings={"layer": name, "method": method, "d_out": int(d_out), "d_in": int(d_in),
                  **({"cost_only": True} if cost_only else {})},
    )

