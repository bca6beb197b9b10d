"""How many micro-batches a curvature check's products need: ``micro_batches="auto"``.

Splitting each probe batch into micro-batches bounds the double-backward graph a product holds
(docs/cost_model.md) at the price of the cached graph and of per-slice overhead; this module chooses the
number from what the probe's forward saves for backward against what a training step on the same batch
holds, so a check's peak stays within the training step's and small models keep the fast path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._batches import as_batches, batch_size, default_loss_fn, detach_inference, split_batch
from .._modules import has_fake_tensors, unwrap_data_parallel
from .._state import local_shard, side_effect_free, trainable_parameters
from ..errors import ConfigurationError
from .cost import GRAPH_FACTOR
from .. import _validation as rules

__all__ = ["AUTO_MAX_MICRO_BATCHES", "AUTO_SLACK_BYTES", "PRODUCT_VECTORS", "auto_micro_batches"]


#: the most a check's estimated extra memory may pass a training step's before ``micro_batches="auto"``
#: gives up the whole batch and its cached graph (below it, memory is not worth the time)
AUTO_SLACK_BYTES = 2**20
AUTO_MAX_MICRO_BATCHES = 8
#: Krylov-sized vectors a product holds on the device besides the basis: the vector in, the accumulated
#: product and the gradient whose graph it differentiates (operator.py, ``_hvp_autograd``)
PRODUCT_VECTORS = 3


@rules.checked()
def auto_micro_batches(model: nn.Module, batches: Sequence[Any], loss_fn: Any = None, *,
                       distributed: bool | None = None, basis_on_device: bool | None = None) -> int:
    """How many micro-batches a check's products should run each probe batch in (``micro_batches="auto"``).

    Measures what one forward of an eighth of the largest probe batch saves for backward, scaled to the
    whole batch, ``A`` (a saved-tensor hook, eval mode, inside :func:`sharpguard._state.side_effect_free`;
    the weights, which autograd saves by reference, are not counted; an eighth, not the whole batch, since
    glibc keeps the heap a whole-batch forward frees and the check's first peak would rise by it). A
    training step on that batch holds at least ``A`` plus the gradient ``G`` (the parameters' bytes); a check
    on ``s`` slices holds ``GRAPH_FACTOR["autograd"] * A / s`` (the double-backward graph,
    docs/cost_model.md) plus ``V``, the Krylov vectors on the device: :data:`PRODUCT_VECTORS` and the
    Lanczos basis (``DEFAULT_MAX_BASIS + 1`` rows) where it shares the device, one row where it lives in
    host memory (``basis_on_device``, default: whether the model is on the CPU, as
    :func:`~sharpguard.sharpness.lanczos.resolve_basis_device` decides). The choice is the fewest slices
    with ``GRAPH_FACTOR * A / s + V <= A + G + AUTO_SLACK_BYTES``: the check's peak within the training
    step's, a whole batch (and the cached graph: one double backward a product) where the whole graph
    fits, at most :data:`AUTO_MAX_MICRO_BATCHES` slices and one example per slice. The bound is the
    training step's own peak, not a fixed graph size, because a fixed cap ignores what the step already
    holds (a large vocabulary's logits) and the Krylov vectors. Where the Krylov vectors alone pass the
    activations and gradient (no split can make the check fit), a slice's graph is held to
    ``AUTO_SLACK_BYTES``: the most slices for a large graph, none for a tiny one. On an FSDP2 model a rank
    measures its shard and the weights its forward gathers count as saved tensors (more slices, never
    fewer). Under ``torch.distributed`` the ranks take the largest choice (``distributed=False``: this
    rank alone), so sharded products run the same collectives on every rank; on fake tensors
    (``FakeTensorMode``) nothing is read and the ranks are taken to be alike.
    """
    batches = as_batches(batches)
    from .cost import DEFAULT_MAX_BASIS

    params = [local_shard(p) for p in trainable_parameters(model)]  # an FSDP2 rank holds (and measures) its shard
    vector_bytes = sum(p.numel() * max(p.element_size(), 4) for p in params)  # Krylov vectors: >= float32
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    if basis_on_device is None:
        basis_on_device = params[0].device.type == "cpu"
    vectors = (PRODUCT_VECTORS + (DEFAULT_MAX_BASIS + 1 if basis_on_device else 1)) * vector_bytes
    fake = has_fake_tensors(model)
    weights = {_storage_key(local_shard(p), fake) for p in model.parameters()}
    batch = detach_inference(max(batches, key=batch_size))
    n = batch_size(batch)
    try:  # measure on the smallest slice the products could use, scaled to the batch (see the docstring)
        part = split_batch(batch, AUTO_MAX_MICRO_BATCHES)[0]
    except ConfigurationError:
        part = None  # a batch that cannot be split is measured whole anyway (the monitor says so)
    slices = 1
    if part is not None:
        fn = loss_fn if loss_fn is not None else default_loss_fn
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            key = _storage_key(t, fake)
            if key not in weights:
                seen[key] = storage.nbytes()
            return t

        module = unwrap_data_parallel(model)  # a DDP wrapper's forward would arm reduction hooks no backward fires
        with side_effect_free(model), torch.inference_mode(False), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = fn(module, part)
            del loss
            _reshard(model)
        saved = sum(seen.values()) * n / batch_size(part)
        # where the Krylov vectors alone pass the training step's memory no split can make the check fit:
        # then each slice's graph is held to the slack (a tiny graph stays whole, a large one takes the most)
        budget = max(saved + grad_bytes + AUTO_SLACK_BYTES - vectors, AUTO_SLACK_BYTES)
        slices = _fewest_slices(GRAPH_FACTOR["autograd"] * saved, budget, min(AUTO_MAX_MICRO_BATCHES, n))
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not fake:
        agreed = torch.tensor([float(slices)], device=params[0].device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        slices = int(agreed.item())
    return slices


def _reshard(model: nn.Module) -> None:
    """Give FSDP2 modules their sharded parameters back: a forward without a backward leaves the root's
    gathered (the root does not reshard after forward), and the products expect DTensor parameters."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _fewest_slices(graph: float, budget: float, most: int) -> int:
    """The fewest slices ``s <= most`` with ``graph / s <= budget`` (``most`` when none fits)."""
    if budget <= 0:
        return most
    return max(1, min(math.ceil(graph / budget), most))


def _storage_key(t: torch.Tensor, fake: bool) -> int:
    """An identity for a tensor's storage: its address, or for a fake tensor (whose storages all report
    address 0) the storage object's own handle."""
    storage = t.untyped_storage()
    return storage._cdata if fake else storage.data_ptr()
