"""How many micro-batches a curvature check's products need: ``micro_batches="auto"``.

Splitting each probe batch into micro-batches bounds the double-backward graph a product holds
(docs/cost_model.md) at the price of the cached graph and of per-slice overhead; this module chooses the
number from what the probe's forward saves for backward, so small models keep the fast path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._batches import batch_size, default_loss_fn, split_batch
from .._batches import as_batches
from .._state import local_shard, side_effect_free, trainable_parameters
from ..errors import ConfigurationError
from .cost import GRAPH_FACTOR
from .. import _validation as rules

__all__ = ["AUTO_GRAPH_FLOOR_BYTES", "AUTO_MAX_MICRO_BATCHES", "auto_micro_batches"]


#: ``micro_batches="auto"`` splits a probe batch until its products' graph fits in the larger of the
#: model's own size and this floor (below it, memory is not worth the time; see auto_micro_batches)
AUTO_GRAPH_FLOOR_BYTES = 64 * 2**20
AUTO_MAX_MICRO_BATCHES = 8


@rules.checked()
def auto_micro_batches(model: nn.Module, batches: Sequence[Any], loss_fn: Any = None, *,
                       distributed: bool | None = None) -> int:
    """How many micro-batches a check's products should run each probe batch in (``micro_batches="auto"``).

    Measures what one forward of an eighth of the largest probe batch saves for backward, scaled to the
    whole batch (a saved-tensor hook, eval mode, inside :func:`sharpguard._state.side_effect_free`; the
    weights, which autograd saves by reference, are not counted; a whole-batch forward cost the check's
    first peak up to 1.1x a training step's more RSS on GPT-2 29.4M, glibc keeping its freed heap), takes
    the double-backward graph as ``GRAPH_FACTOR["autograd"]`` times that
    (docs/cost_model.md), and splits until one slice's graph is at most ``max(P b, 64 MiB)`` - the model's
    own size, or a floor below which memory is not worth the time - with at most
    :data:`AUTO_MAX_MICRO_BATCHES` slices and one example per slice. A small model keeps its whole batch and
    with it the cached graph (a product is then one double backward); a model whose activations dwarf
    its weights splits into up to 8 (on an FSDP2 model the weights its forward gathers count as saved
    tensors: more slices, never fewer). Measured on the client models of benchmarks/monitor_overhead.py: 8
    slices for every probe cost up to 60 training steps per warm check against 14 whole (the per-slice
    overhead of models whose steps take milliseconds); on the GPT-2s of benchmarks/scale.py 8 slices keep
    a check within 0.7-1.7x a training step's memory. Under ``torch.distributed`` the ranks take the
    largest choice (``distributed=False``: this rank alone), so sharded products run the same
    collectives on every rank.
    """
    batches = as_batches(batches)
    from .operator import _detach_inference, _unwrap  # here: operator.py imports this module

    params = [local_shard(p) for p in trainable_parameters(model)]  # an FSDP2 rank holds (and measures) its shard
    param_bytes = sum(p.numel() * max(p.element_size(), 4) for p in params)  # Krylov vectors: >= float32
    weights = {local_shard(p).untyped_storage().data_ptr() for p in model.parameters()}
    batch = _detach_inference(max(batches, key=batch_size))
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
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        module = _unwrap(model)  # a DDP wrapper's forward would arm reduction hooks no backward fires
        with side_effect_free(model), torch.inference_mode(False), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = fn(module, part)
            del loss
        graph = GRAPH_FACTOR["autograd"] * sum(seen.values()) * n / batch_size(part)
        slices = max(1, min(math.ceil(graph / max(param_bytes, AUTO_GRAPH_FLOOR_BYTES)), AUTO_MAX_MICRO_BATCHES, n))
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        agreed = torch.tensor([float(slices)], device=params[0].device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        slices = int(agreed.item())
    return slices
