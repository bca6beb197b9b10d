"""How many micro-batches a curvature check's products need: ``micro_batches="auto"``.

Splitting each probe batch into micro-batches bounds the double-backward graph a product holds
(docs/cost_model.md) at the price of the cached graph and of per-slice overhead; this module chooses the
number from what the probe's forward saves for backward against what a training step on the same batch
holds, so a check's peak stays within the training step's and small models keep the fast path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from .._batches import as_batches, batch_size, default_loss_fn, detach_inference, slice_bounds, split_batch
from .._modules import has_fake_tensors, unwrap_data_parallel
from .._state import local_shard, side_effect_free, trainable_parameters
from ..errors import ConfigurationError
from .cost import estimate_plan_memory
from .. import _validation as rules

__all__ = [
    "AUTO_MAX_MICRO_BATCHES",
    "AUTO_SLACK_BYTES",
    "ProductPlan",
    "auto_micro_batches",
    "plan_products",
]


@rules.checked()
def is_sharded(model: nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return any(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad)


#: the Hessian-vector product methods (``HVPOperator(hvp=...)`` and every curvature function)
HVPMethod = Literal["auto", "autograd", "finite_difference"]
HVP_CHOICES: tuple[str, ...] = get_args(HVPMethod)

#: the most a check's estimated extra memory may pass a training step's before ``micro_batches="auto"``
#: gives up the whole batch and its cached graph (below it, memory is not worth the time)
AUTO_SLACK_BYTES = 2**20
AUTO_MAX_MICRO_BATCHES = 8


@dataclass(frozen=True)
class ProductPlan:
    """How a check's Hessian-vector products run: micro-batches per probe batch and the product method
    (``"autograd"``: exact, double backward; ``"finite_difference"``: two gradients), with the reason when
    the method was chosen for memory."""

    micro_batches: int
    hvp: str
    reason: str = ""
    #: what a forward of the largest probe batch saves for backward, measured on a slice and scaled (bytes;
    #: 0 where nothing was measured): under the training step's attention kernel and under the math kernel
    #: the exact product needs (``estimate_check_memory(graph_bytes=...)``)
    saved_bytes: float = 0.0
    saved_math_bytes: float = 0.0
    #: one parameter-sized Krylov vector and the parameters' gradients, in bytes (this rank's shard under FSDP2)
    vector_bytes: float = 0.0
    gradient_bytes: float = 0.0
    #: the largest slice's share of the largest probe batch, and whether the Krylov basis shares the device
    slice_fraction: float = 1.0
    basis_on_device: bool = True


@rules.checked()
def auto_micro_batches(model: nn.Module, batches: Sequence[Any], loss_fn: Any = None, *,
                       distributed: bool | None = None, basis_on_device: bool | None = None) -> int:
    """How many micro-batches a check's exact products should run each probe batch in
    (``micro_batches="auto"``): :func:`plan_products` with ``hvp="autograd"``."""
    return plan_products(model, batches, loss_fn, hvp="autograd", distributed=distributed,
                         basis_on_device=basis_on_device).micro_batches


@rules.checked()
def plan_products(model: nn.Module, batches: Sequence[Any], loss_fn: Any = None, *, hvp: str = "auto",
                  distributed: bool | None = None, basis_on_device: bool | None = None) -> ProductPlan:
    """Micro-batches and product method that keep a check within a training step's memory.

    Measures what one forward of an eighth of the largest probe batch saves for backward, scaled to the
    whole batch (a saved-tensor hook, eval mode, inside :func:`sharpguard._state.side_effect_free`; the
    weights, which autograd saves by reference, are not counted; an eighth, not the whole batch, since
    glibc keeps the heap a whole-batch forward frees and the check's first peak would rise by it; a batch
    of fewer than 8 examples is measured on one example): ``A`` under the attention kernel a training step
    uses, ``A_math`` under the math kernel the exact product's double backward needs (no fused kernel has
    a derivative of its backward; the math kernel keeps each head's ``T x T`` attention weights, which at
    long sequences outgrow everything else). A training step on that batch holds at least ``A`` plus the
    gradient ``G`` (the parameters' bytes). On ``s`` slices a check's device peak is what the live-tensor cost
    model predicts from these measurements (:func:`~sharpguard.sharpness.cost.estimate_plan_memory`, a monitor's
    lambda_max check: an exact product's double backward ``EXACT_GRAPH_FACTOR * f A_math`` for the largest
    slice's share ``f``, a finite-difference check's gradient pass or flatten, each with its Krylov vectors on
    the device; the Lanczos basis counts where it shares the device and not where it lives in host memory:
    ``basis_on_device``, default whether the model is on the CPU, as
    :func:`~sharpguard.sharpness.lanczos.resolve_basis_device` decides).

    The slices are the fewest whose predicted peak is at most ``A + G + AUTO_SLACK_BYTES``, at most
    :data:`AUTO_MAX_MICRO_BATCHES` and one example per slice; where no split fits, the fewest of the lowest
    predicted peak (the most slices for an exact product's graph; a finite-difference check whose vectors
    alone pass the step gains nothing from slicing). ``hvp="auto"`` keeps
    exact products wherever they fit, and takes finite differences only where they do not and the
    finite-difference estimate is lower (long sequences, one example per device): the plan's ``reason``
    says so. On an FSDP2 model a rank measures its shard and the weights its forward gathers count as saved
    tensors. Under ``torch.distributed`` the ranks take the largest choice (``distributed=False``: this rank
    alone; any rank's finite differences make every rank's), so sharded products run the same collectives
    on every rank; on fake tensors (``FakeTensorMode``) nothing is read and the ranks are taken to be alike.
    """
    if hvp not in HVP_CHOICES:
        raise ConfigurationError(f"hvp must be one of {HVP_CHOICES}, got {hvp!r}.")
    if hvp == "auto" and is_sharded(model):
        # double backward never reaches FSDP's sharded parameters (sharded.py): no exact graph to measure, and
        # its math-kernel forward (each head's T x T weights) would be the plan's own peak at long sequences
        hvp = "finite_difference"
    batches = as_batches(batches)
    params = [local_shard(p) for p in trainable_parameters(model)]  # an FSDP2 rank holds (and measures) its shard
    vector_bytes = sum(p.numel() * max(p.element_size(), 4) for p in params)  # Krylov vectors: >= float32
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    if basis_on_device is None:
        basis_on_device = params[0].device.type == "cpu"
    fake = has_fake_tensors(model)
    batch = detach_inference(max(batches, key=batch_size))
    n = batch_size(batch)
    try:  # measure on the smallest slice the products could use, scaled to the batch (see the docstring)
        part = split_batch(batch, AUTO_MAX_MICRO_BATCHES)[0]
    except ConfigurationError:
        part = None  # a batch that cannot be split runs whole: nothing to choose (the monitor says so)
    exact_slices, fd_slices, use_fd = 1, 1, hvp == "finite_difference"
    reason, saved, saved_math = "", 0.0, 0.0
    if part is not None:
        scale = n / batch_size(part)
        attention = _AttentionCalls()
        with attention:
            saved = _saved_bytes(model, part, loss_fn) * scale
        saved_math = saved
        if attention.seen and hvp != "finite_difference" and _math_attention_kernel() is not None:
            with _math_attention_kernel()():
                saved_math = _saved_bytes(model, part, loss_fn) * scale
        most = min(AUTO_MAX_MICRO_BATCHES, n)
        allowed = saved + grad_bytes + AUTO_SLACK_BYTES  # the training step's own peak (and the slack)

        def candidate(method: str, slices: int) -> ProductPlan:
            return ProductPlan(micro_batches=slices, hvp=method, saved_bytes=saved, saved_math_bytes=saved_math,
                               vector_bytes=vector_bytes, gradient_bytes=grad_bytes,
                               slice_fraction=largest_slice(n, slices), basis_on_device=bool(basis_on_device))

        exact_slices, exact_peak = _fewest_fitting(lambda s: candidate("autograd", s), allowed, most)
        fd_slices, fd_peak = _fewest_fitting(lambda s: candidate("finite_difference", s), allowed, most)
        if hvp == "auto" and exact_peak > allowed and fd_peak + AUTO_SLACK_BYTES < exact_peak:
            use_fd = True
            reason = (f"finite-difference products: an exact product's double backward would hold "
                      f"~{exact_peak / 2**30:.3g} GiB at {exact_slices} micro-batch"
                      f"{'es' if exact_slices > 1 else ''} (math attention kernel), more than a training "
                      f"step's ~{allowed / 2**30:.3g} GiB; finite differences ~{fd_peak / 2**30:.3g} GiB")
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and not fake:
        agreed = torch.tensor([float(use_fd), float(exact_slices), float(fd_slices)], device=params[0].device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        flag, exact_slices, fd_slices = (int(x) for x in agreed.tolist())
        if flag and not use_fd:
            use_fd, reason = True, "finite-difference products: another rank's exact products would not fit"
    slices = fd_slices if use_fd else exact_slices
    return ProductPlan(micro_batches=slices, hvp="finite_difference" if use_fd else "autograd", reason=reason,
                       saved_bytes=saved, saved_math_bytes=saved_math, vector_bytes=vector_bytes,
                       gradient_bytes=grad_bytes, slice_fraction=largest_slice(n, slices),
                       basis_on_device=bool(basis_on_device))


def largest_slice(n: int, parts: int) -> float:
    """The largest of ``split_batch``'s slices of ``n`` examples in ``parts``, as a share of ``n``."""
    bounds = slice_bounds(n, parts)
    return max(b - a for a, b in zip(bounds, bounds[1:])) / n


def _saved_bytes(model: nn.Module, part: Any, loss_fn: Any) -> float:
    """Bytes a forward of ``part`` saves for backward, the weights (saved by reference) not counted.

    The saved tensors are counted, not kept (the hook hands autograd nothing to hold; the loss is never
    differentiated): the forward's memory is an inference forward's, so measuring the math attention
    kernel's graph, many times a training step's at long sequences, does not raise the peak. A storage
    saved twice counts once while it lives (a weak reference tells a live storage from a freed one whose
    address was reused)."""
    weights = {local_shard(p).untyped_storage()._cdata for p in model.parameters()}
    fn = loss_fn if loss_fn is not None else default_loss_fn
    live: dict[int, StorageWeakRef] = {}
    total = 0

    def pack(t: torch.Tensor) -> None:
        nonlocal total
        storage = t.untyped_storage()
        key = storage._cdata
        if key in weights or (key in live and not live[key].expired()):
            return None
        live[key] = StorageWeakRef(storage)
        total += storage.nbytes()
        return None

    module = unwrap_data_parallel(model)  # a DDP wrapper's forward would arm reduction hooks no backward fires
    # a forward writes no weight: no parameter copy (at 7B on one device it would be 25 GiB)
    with side_effect_free(model, parameters=False), torch.inference_mode(False), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(module, part)
        del loss  # the guard reshards an FSDP2 root the forward left gathered
    return float(total)


class _AttentionCalls(TorchFunctionMode):
    """Notes whether scaled-dot-product attention is called (directly or through ``nn.MultiheadAttention``,
    whose inner call a torch-function mode does not see) while it is active; changes nothing else."""

    _ATTENTION = (nn.functional.scaled_dot_product_attention, nn.functional.multi_head_attention_forward)

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func in self._ATTENTION:
            self.seen = True
        return func(*args, **(kwargs or {}))


def _math_attention_kernel() -> Callable[[], contextlib.AbstractContextManager] | None:
    """A factory for the math scaled-dot-product-attention kernel context, where PyTorch has one."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return None
    return lambda: sdpa_kernel(SDPBackend.MATH)


def _fewest_fitting(candidate: Callable[[int], ProductPlan], allowed: float, most: int) -> tuple[int, float]:
    """The fewest slices ``s <= most`` whose check the live-tensor cost model
    (:func:`~sharpguard.sharpness.cost.estimate_plan_memory`, a monitor's lambda_max check: the largest of the
    lambda_max checks) holds within ``allowed`` bytes, and that peak; where none fits, the fewest slices of the
    lowest peak (an exact product's graph shrinks with every slice; a finite-difference check's flatten does not)."""
    best = (1, math.inf)
    for slices in range(1, most + 1):
        memory = estimate_plan_memory(candidate(slices), measure="monitor")
        peak = math.inf if memory is None else memory.peak_bytes
        if peak <= allowed:
            return slices, peak
        if peak < best[1]:
            best = (slices, peak)
    return best


def _fewest_slices(graph: float, budget: float, most: int) -> int:
    """The fewest slices ``s <= most`` with ``graph / s <= budget`` (``most`` when none fits)."""
    if budget <= 0:
        return most
    return max(1, min(math.ceil(graph / budget), most))
