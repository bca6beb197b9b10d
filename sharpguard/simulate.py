"""Production-scale cost, simulated: a step's peak memory by category and its FLOPs, nothing allocated.

A callable (a training step, a SAM step, a curvature check) runs under torch's
:class:`~torch._subclasses.fake_tensor.FakeTensorMode`, where a tensor carries its shape, dtype and
device but no storage, so a 7B-parameter model is built and stepped on any machine in seconds. Two of
torch's own dispatch-level counters watch it:

* :class:`torch.distributed._tools.mem_tracker.MemTracker` (single device) or
  :class:`torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker` (a ``fully_shard`` model) track
  every tensor storage that is alive and file it under parameters, gradients, optimizer state,
  activations, temporaries (the backward's), all-gather/reduce-scatter buffers or other; the peak is
  the largest sum of live storage bytes, per device (per rank under FSDP2);
* :class:`torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of matrix products, convolutions
  and attention from their shapes (2 per multiply-add; the fused CPU attention kernel by torch's formulas
  for the fused GPU ones); elementwise work is not counted.

FSDP2 runs on one process through a fake process group (``backend="fake"``): collectives return
without communicating, so every rank's shapes, and therefore its memory, are those of rank 0.

What is counted is live tensor storage, the quantity ``torch.cuda.max_memory_allocated`` reports
without the caching allocator's rounding and fragmentation; a CPU run's peak RSS adds the heap's own
overhead on top (docs/cost_model.md, "Simulation against the CPU").

Usage::

    with fake_tensors():
        model = GPT2LMHeadModel(GPT2Config())
        opt = torch.optim.AdamW(model.parameters())
        ids = torch.randint(0, 50257, (8, 1024))

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # the optimizer's state exists from here on
        profile = profile_step(step, model=model, optimizers=[opt], inputs=[ids])
    profile.memory.peak_bytes, profile.memory.peak_by_category["activations"], profile.flops
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "CATEGORIES",
    "MemoryProfile",
    "StepProfile",
    "fake_process_group",
    "fake_tensors",
    "flop_counter",
    "is_fake",
    "local_numel",
    "parameter_bytes",
    "profile_step",
]

# The trackers' categories (MemTracker's and FSDPMemTracker's labels) under one set of names.
_CATEGORY_OF = {
    "Parameter": "parameters",
    "Sharded Param": "parameters",
    "Unsharded Param": "unsharded_parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "unsharded_gradients",
    "Activation": "activations",
    "Temp": "temporaries",
    "Optstate": "optimizer_state",
    "OptState": "optimizer_state",
    "All Gather": "all_gather",
    "Reduce Scatter": "reduce_scatter",
    "Inputs": "inputs",
    "Other": "other",
}
CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(_CATEGORY_OF.values()))
#: what a training step's peak holds besides its transient (weights, optimizer state, inputs, FSDP2's gathered
#: weights and collective buffers): the resident bytes of ``sharpness.cost.estimate_check_memory``
RESIDENT_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if c not in ("activations", "temporaries",
                                                                                "gradients"))


@dataclass(frozen=True)
class MemoryProfile:
    """Live tensor bytes of one device (one rank): before the call, at its peak, and when it returned.

    ``peak_by_category`` is the breakdown at the moment of the peak (its values sum to
    ``peak_bytes``); ``end_by_category`` what is still alive after the call (a weight backup kept
    between steps shows here). ``peak_bytes - start_bytes`` is the call's extra peak, what a peak-RSS
    or ``max_memory_allocated`` difference around the call measures.
    """

    start_bytes: int
    peak_bytes: int
    peak_by_category: dict[str, int]
    end_bytes: int
    end_by_category: dict[str, int]


@dataclass(frozen=True)
class StepProfile:
    """What one call costs: its memory on one device (one rank) and its FLOPs on that device."""

    memory: MemoryProfile
    flops: int
    flops_by_operator: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for a JSON report."""
        return asdict(self)


def fake_tensors() -> contextlib.AbstractContextManager[Any]:
    """A :class:`~torch._subclasses.fake_tensor.FakeTensorMode`: build the model, optimizer and batch
    inside it, and run :func:`profile_step` inside it too. Reading a value (``.item()``, ``bool(t)``)
    raises ``DataDependentOutputException``: under fake tensors there are no values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (or a DTensor's local shard) is a fake tensor, which has no values to read."""
    from torch._subclasses.fake_tensor import FakeTensor

    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return isinstance(local, FakeTensor)


@contextlib.contextmanager
def fake_process_group(world_size: int = 8) -> Iterator[Any]:
    """A default process group of ``world_size`` fake ranks (this process is rank 0) and its 1-D CPU
    :class:`~torch.distributed.device_mesh.DeviceMesh`, for ``fully_shard(module, mesh=mesh)``.

    Enter it before :func:`fake_tensors` (the mesh is built from real tensors); the group is destroyed
    on exit. Collectives complete at once without moving data, so values are meaningless and shapes
    exact.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .errors import ConfigurationError

    if not (isinstance(world_size, int) and world_size >= 1):
        raise ConfigurationError(f"world_size must be a positive integer, got {world_size!r}.")
    if dist.is_initialized():
        raise ConfigurationError(
            "a process group is already initialized; simulate FSDP in a process without one "
            "(destroy it with torch.distributed.destroy_process_group() first)."
        )
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank holds: a DTensor's local shard, a plain tensor's whole."""
    return tensor.to_local().numel() if hasattr(tensor, "to_local") else tensor.numel()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters held on this device (this rank's shards under FSDP2)."""
    return sum(local_numel(p) * p.element_size() for p in model.parameters())


def _by_category(snapshot: Mapping[Any, Mapping[Any, int]], device: torch.device | None = None
                 ) -> tuple[int, dict[str, int]]:
    """One device's total and named categories from a tracker snapshot: ``device``'s (the model's: memory
    a check keeps elsewhere, such as a Krylov basis in host memory, is not the device's), else the largest."""
    best: tuple[int, dict[str, int]] = (0, {name: 0 for name in CATEGORIES})
    if device is not None:
        snapshot = {d: v for d, v in snapshot.items() if torch.device(d) == device} or snapshot
    for per_device in snapshot.values():
        out = {name: 0 for name in CATEGORIES}
        total = 0
        for key, value in per_device.items():
            label = getattr(key, "value", key)
            if label == "Total":
                total = int(value)
                continue
            name = _CATEGORY_OF.get(str(label), "other")
            out[name] += int(value)
        if total >= best[0]:
            best = (total, out)
    return best


def profile_step(
    fn: Callable[[], object],
    *,
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    inputs: Iterable[Any] = (),
    count_flops: bool = True,
) -> StepProfile:
    """Peak memory by category and FLOPs of one call ``fn()``.

    Args:
        fn: the work to measure (a training step, a SAM step, a check), called once.
        model: the model ``fn`` runs; a ``fully_shard`` model is tracked by ``FSDPMemTracker``
            (sharded and unsharded parameters, all-gather and reduce-scatter buffers per rank).
        optimizers: optimizers whose state exists before the call (their state is filed as
            optimizer state; state created during the call is filed by the tracker's hook).
        inputs: tensors alive across the call (the batch, a probe set), filed as inputs/other.
        count_flops: count FLOPs with ``FlopCounterMode`` in the same run (the whole call's count, without the
            per-module one: :func:`flop_counter`).

    Memory counts storages alive before the call too (the model, the optimizer's state), so the
    peak is the device's whole footprint, as ``torch.cuda.max_memory_allocated`` would report it: the
    model's device (what ``fn`` keeps on another device, such as a Krylov basis in host memory, is not
    counted).
    Works on real tensors as well (it then allocates what the call allocates).
    """
    optimizers = list(optimizers)
    tensors = [t for t in _tensors(inputs)]
    device = next((p.device for p in model.parameters()), None)  # the peaks reported are this device's
    tracker: Any
    if _is_fsdp(model):
        tracker = _fsdp_tracker_class()(model, optimizers[0] if optimizers else None)
        tracker.track_inputs(tuple(tensors))
        for extra in optimizers[1:]:
            tracker.track_external(extra)
    else:
        tracker = _tracker_class()()
        tracker.track_external(model, *optimizers, *tensors)
    counter = flop_counter() if count_flops else contextlib.nullcontext()
    with _module_pops_holding_no_graph(), tracker:
        start_total, _ = _by_category(tracker.get_tracker_snapshot("current"), device)
        with counter:
            fn()
        end_total, end = _by_category(tracker.get_tracker_snapshot("current"), device)
    peak_total, peak = _by_category(tracker.get_tracker_snapshot("peak"), device)
    flops = 0
    by_op: dict[str, int] = {}
    if count_flops:
        flops = int(counter.get_total_flops())  # type: ignore[union-attr]
        for op, n in counter.get_flop_counts().get("Global", {}).items():  # type: ignore[union-attr]
            by_op[str(op)] = int(n)
    return StepProfile(
        memory=MemoryProfile(start_bytes=start_total, peak_bytes=peak_total, peak_by_category=peak, end_bytes=end_total,
                             end_by_category=end),
        flops=flops,
        flops_by_operator=by_op,
    )


@contextlib.contextmanager
def _module_pops_holding_no_graph() -> Iterator[None]:
    """Trackers whose module pops in backward keep no gradient graph alive.

    torch's ``ModTracker`` (under ``MemTracker`` and ``FSDPMemTracker``) pops a module in backward through
    ``register_multi_grad_hook(inputs, fn, mode="all")``, whose hooks hold the inputs' autograd nodes: a cycle
    through C++ that Python's collector cannot see. A graph kept for reuse (``retain_graph=True``: a cached
    Hessian-vector product's gradient graph) is then never freed while the tracker runs, and the tracker counts
    its saved tensors to the end of the call, above what the same run allocates (a second cached graph built
    after the first is dropped counted both). Mode ``"any"`` holds no node. The categories and the peaks depend
    on whether a backward is running, not on when a module is popped in it, so only the per-module backward
    attribution, which nothing here reports, moves (a module leaves the stack at its first input gradient)."""
    from torch.distributed._tools import mod_tracker

    original = mod_tracker.register_multi_grad_hook

    def first_gradient(tensors: Any, fn: Callable[..., Any], *, mode: str = "all") -> Any:
        return original(tensors, fn, mode="any")

    mod_tracker.register_multi_grad_hook = first_gradient
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = original


class _WholeCall:
    """Stands for ``FlopCounterMode``'s module tracker: every count is the whole call's (``"Global"``)."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_WholeCall":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter() -> Any:
    """``FlopCounterMode`` counting the whole call (``"Global"``) with torch's formulas and the fused CPU
    attention kernel's, without its per-module breakdown: the module tracker behind that breakdown hooks the
    inputs and outputs of every module's forward for the backward, and across a double backward (an exact
    Hessian-vector product) those hooks keep tensors alive that the call alone would free, so the memory
    counted in the same run would be the counter's as well (docs/cost_model.md, "Live memory")."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    if hasattr(counter, "mod_tracker"):  # torch >= 2.4; the counts read nothing else from it
        counter.mod_tracker = _WholeCall()
    return counter


def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """torch's FLOP formulas of the fused attention kernels (``Q K^T`` and ``A V``; backward, their gradients
    and the recomputed ``Q K^T``), for the fused CPU kernel that ``FlopCounterMode`` leaves uncounted: a
    decoder on CPU tensors, fake or real, takes it wherever attention has no dropout (Llama; GPT-2 in eval
    mode), and its step would miss its attention products while a check on the math kernel counts them."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or backward is None:  # pragma: no cover - a torch without the fused CPU kernel
        return {}

    def forward_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    def backward_flops(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                       **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    return {forward: forward_flops, backward: backward_flops}


def _new_iteration(tracker: Any, module: nn.Module) -> None:
    """Forget the per-module statistics when the root module runs forward again outside backward.

    The trackers keep per-module snapshots for one iteration and refuse a second forward of the root
    (a SAM step runs two, a check many). Their device-level counts - live storages, the peak and its
    breakdown, which are all :func:`profile_step` reads - do not depend on those statistics, so they
    are cleared (``reset_mod_stats``, the trackers' own remedy) and counting goes on.
    """
    mods = tracker._mod_tracker
    if module in tracker.memory_tracking and not mods.is_bw:
        name = mods.get_known_fqn(module)
        if set(mods.parents) - {name} == {"Global"}:
            tracker.reset_mod_stats()


def _tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class _RepeatedForwardMemTracker(MemTracker):
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            _new_iteration(self, module)
            super()._pre_fw_hook(module, inputs)

    return _RepeatedForwardMemTracker


def _fsdp_tracker_class() -> type:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class _RepeatedForwardFSDPMemTracker(FSDPMemTracker):
        def _fsdp_state_pre_forward(self, fsdp_mod: Any, orig: Callable[..., Any]) -> Callable[..., Any]:
            inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

            def pre_forward(*args: Any, **kwargs: Any) -> Any:
                _new_iteration(self, fsdp_mod)
                return inner(*args, **kwargs)

            return pre_forward

    return _RepeatedForwardFSDPMemTracker


def _tensors(items: Iterable[Any]) -> Iterator[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    for leaf in tree_leaves(list(items)):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, FSDPModule)
