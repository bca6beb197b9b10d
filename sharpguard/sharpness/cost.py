"""What a SAM step and a lambda_max check cost, from a model's size and its training step (docs/cost_model.md).

Framework-free (floats in, floats out) so a monitor can print the expected cost of a check and size its
budget before it runs one. The model, fitted on the sizes of ``benchmarks/scale.py`` (GPT-2 decoders of
1.4M-29.4M parameters and a ResNet-style CNN, CPU float32, peak RSS in fresh processes):

* a **training step** holds its activations ``A`` plus ``(1 + s) P b`` bytes of gradients and optimizer
  state (``P`` parameters of ``b`` bytes, ``s`` state vectors: 2 for Adam, 1 for SGD with momentum);
* a **SAM step** adds at most one weight copy, ``P b`` bytes, during the step (the default
  ``nonfinite="skip"`` keeps nothing between steps; simulated, the copy does not raise the step's peak,
  being taken after the first pass's activations are freed), and costs two steps' time and FLOPs
  (Foret et al., ICLR 2021, Alg. 1: two forward/backward passes per update);
* a **lambda_max check** with ``n`` Hessian-vector products holds ``c_A A`` of graph memory (the
  double-backward graph for ``hvp="autograd"``; one gradient pass at a time for
  ``hvp="finite_difference"``) plus ``(max_basis + 1 + c_v) P b`` for the Lanczos basis and the
  solver's other vectors and the parameter-sized buffers of the product itself (tied embeddings'
  gradient accumulations, the product and its flat copy), and takes ``n t_h`` seconds, one product
  costing ``t_h = c_t`` forward+backward passes.

``c_A``, ``c_v`` and ``c_t`` are fitted per product method; docs/cost_model.md gives the fit and its error
on the measured sizes. At production sizes (GPT-2 124M, Llama-shaped 1.1B and 6.7B, ViT-Base; single
device and FSDP2) the FLOP ratios (``HVP_FLOPS``, ``SAM_FLOPS``) and the float32 activation layouts
(``ACTIVATION_LAYOUTS``) are derived from counts simulated under ``FakeTensorMode``
(:mod:`sharpguard.simulate`, benchmarks/simulate.py), which the predictions are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _validation as rules

__all__ = [
    "CheckCost",
    "CheckMemory",
    "SamCost",
    "check_flops_per_hvp",
    "check_passes_per_hvp",
    "estimate_check_cost",
    "estimate_check_memory",
    "estimate_plan_memory",
    "estimate_sam_cost",
    "transformer_activation_bytes",
]

# Fitted on benchmarks/scale.py (docs/cost_model.md, "Fit"): graph memory over the training step's
# activations, model-size vectors besides the basis, and one product's time in forward+backward passes.
# Least squares on relative errors over the five models of the "Scale" table (2026-12-02, fourth fit, by
# benchmarks/fit_cost_model.py): for exact products jointly over whole batches and the micro-batches the
# monitor's "auto" chose (4-8), peak error -21%..+20% (-10%..+11% on the micro-batched checks); finite differences
# -20%..+16%; product time 2.9-3.9 (exact, mean 3.23) and 2.0-2.3 (finite differences, mean 2.12) passes.
GRAPH_FACTOR = {"autograd": 3.04, "finite_difference": 1.23}
EXTRA_VECTORS = {"autograd": 6.0, "finite_difference": 5.9}
HVP_PASSES = {"autograd": 3.2, "finite_difference": 2.1}
# A product on a single-batch probe whose gradient graph stays cached (HVPOperator's default for one batch,
# one micro-batch) costs one double backward: 2.2-2.4 forward+backward passes in the third fit's table.
HVP_PASSES_CACHED = 2.3
DEFAULT_MAX_BASIS = 5  # sharpguard.sharpness.lanczos.default_max_basis(1, "largest")

# FLOPs (matrix products, counted by torch.utils.flop_counter.FlopCounterMode under FakeTensorMode:
# benchmarks/simulate.py) over one forward+backward of the same batch. A forward+backward is 3 units of a
# dense layer's forward product; an exact product on an uncached graph adds the 6 units of the second
# backward (docs/cost_model.md, "Time"), 9 in all; on a cached graph only those 6; finite differences
# are two gradients. A SAM step is two forward+backward passes (the optimizer's elementwise work is not
# counted). The simulated counts on GPT-2 124M, the Llama-shaped 1B and 7B decoders and ViT-Base are
# these ratios to four digits (benchmarks/RESULTS.md, "Simulated production scale").
HVP_FLOPS = {"autograd": 3.0, "finite_difference": 2.0}
HVP_FLOPS_CACHED = 2.0
SAM_FLOPS = 2.0


@dataclass(frozen=True)
class CheckCost:
    """Predicted cost of one lambda_max check (extra peak bytes over the model itself, seconds)."""

    peak_bytes: float
    seconds: float
    peak_over_step: float  # over the training step's own extra peak
    seconds_over_step: float  # over one training step (forward + backward + optimizer)
    basis_bytes: float
    n_hvp: int
    hvp: str
    flops_over_step: float = 0.0  # matrix-product FLOPs over one forward+backward of a probe batch


@dataclass(frozen=True)
class SamCost:
    """Predicted cost of one SAM step: live extra bytes (the weight copy), seconds, time over a plain step."""

    extra_bytes: float
    seconds: float
    seconds_over_step: float
    flops_over_step: float = SAM_FLOPS  # matrix-product FLOPs over a plain step's


def _positive(name: str, value: float) -> float:
    from .._validation import positive

    return positive(name, value)


@rules.checked()
def estimate_check_cost(
    n_params: int,
    *,
    step_peak_bytes: float,
    step_seconds: float,
    hvp: str = "autograd",
    n_hvp: int = 20,
    max_basis: int = DEFAULT_MAX_BASIS,
    dtype_bytes: int = 4,
    optimizer_state_vectors: int = 2,
    micro_batches: int = 1,
    probe_batches: int = 1,
    basis_on_device: bool = True,
    check_determinism: bool = True,
) -> CheckCost:
    """Extra peak memory and time of ``hessian_eigenvalues(k=1)`` with ``n_hvp`` products.

    Args:
        n_params: trainable parameters ``P``.
        step_peak_bytes: the training step's own extra peak (activations + gradients + optimizer state),
            measured (``torch.cuda.max_memory_allocated`` around a step) or from
            :func:`transformer_activation_bytes` plus ``(1 + s) P b``.
        step_seconds: one training step's wall time; a product costs ``HVP_PASSES[hvp]`` of its
            forward+backward (taken as the whole step, which slightly overstates the check's time).
        hvp: ``"autograd"`` (exact, double backward) or ``"finite_difference"``.
        n_hvp: products per check, the determinism check's second product included, as a result's ``n_hvp``
            counts them (the monitor's default cap is 20; a warm start needs a few).
        max_basis: the Lanczos basis cap (``hessian_eigenvalues(max_basis=...)``).
        dtype_bytes: bytes per parameter (4 for float32; Krylov vectors are never below float32).
        optimizer_state_vectors: model-size state vectors of the optimizer (Adam 2, SGD momentum 1).
        micro_batches: ``hessian_eigenvalues(micro_batches=...)``: the product's graph holds one
            micro-batch's activations, ``c_A A / micro_batches``.
        probe_batches: probe batches of the training batch's size; with one batch and one micro-batch
            the gradient graph is cached and a product costs ``HVP_PASSES_CACHED`` passes.
        basis_on_device: whether the Lanczos basis shares the device (``basis_device="auto"`` keeps it in
            host memory on an accelerator: then one of its rows is on the device at a time).
        check_determinism: the check's determinism check (on by default): on a cached graph its second product
            builds the graph afresh, one forward and backward more.
    """
    from ..errors import ConfigurationError

    if hvp not in GRAPH_FACTOR:
        raise ConfigurationError(f"hvp must be one of {sorted(GRAPH_FACTOR)}, got {hvp!r}.")
    p = _positive("n_params", n_params)
    step_peak = _positive("step_peak_bytes", step_peak_bytes)
    step_s = _positive("step_seconds", step_seconds)
    b = max(4.0, _positive("dtype_bytes", dtype_bytes))
    if not (isinstance(n_hvp, int) and n_hvp >= 1 and isinstance(max_basis, int) and max_basis >= 3):
        raise ConfigurationError(f"n_hvp must be >= 1 and max_basis >= 3 (integers), got {n_hvp!r}, {max_basis!r}.")
    from .._validation import positive_int

    micro = positive_int("micro_batches", micro_batches)
    batches = positive_int("probe_batches", probe_batches)
    state = (1 + optimizer_state_vectors) * p * _positive("dtype_bytes", dtype_bytes)
    activations = max(step_peak - state, 0.0)
    basis = ((max_basis + 1) if rules.flag("basis_on_device", basis_on_device) else 1) * p * b
    peak = GRAPH_FACTOR[hvp] * activations / micro + basis + EXTRA_VECTORS[hvp] * p * b
    cached = hvp == "autograd" and micro == 1 and batches == 1
    seconds = n_hvp * batches * (HVP_PASSES_CACHED if cached else HVP_PASSES[hvp]) * step_s
    return CheckCost(
        peak_bytes=peak,
        seconds=seconds,
        peak_over_step=peak / step_peak,
        seconds_over_step=seconds / step_s,
        basis_bytes=basis,
        n_hvp=n_hvp,
        hvp=hvp,
        # a cached graph is built once (a forward and a backward), then every product is one double backward;
        # the determinism check's second product builds it again (a cached graph would hide randomness)
        flops_over_step=n_hvp * batches * check_flops_per_hvp(hvp, micro_batches=micro, probe_batches=batches)
        + ((1.0 + float(check_determinism)) if cached else 0.0),
    )


@dataclass(frozen=True)
class CheckMemory:
    """Predicted device peak of one curvature check as an allocator counts it (live tensors: what
    ``torch.cuda.max_memory_allocated`` reads, and MemTracker under ``FakeTensorMode``)."""

    peak_bytes: float  # the device's peak during the check, the resident bytes included
    over_step: float  # over the training step's peak
    phase: str  # the phase at the peak: "gradient pass", "flatten" or "exact product"
    device_vectors: float  # parameter-sized vectors the check keeps on the device through its products


#: parameter-sized vectors a finite-difference check keeps on the device besides its Krylov basis when the
#: basis is there: the weights' copy ``w0`` (operator.py, ``_hvp_finite_difference``)
FD_RESIDENT_VECTORS = 1
#: more parameter-sized vectors a monitor keeps there: the previous check's eigenvector (its warm start)
MONITOR_VECTORS = 1
#: Hutch++ keeps its sketch's ``s`` columns (``n_hvp // 3``) and 3 more vectors: ``Q``'s column, the product
#: and the probe (trace.py)
HUTCHPP_VECTORS = 3
#: the determinism check (on by default) holds the first product's result through its second product
#: (operator.py, ``HVPOperator.matvec``): one vector more during a Hutch++ check's first product, its peak with
#: the vectors on the device; a Lanczos check's basis is still short then
DETERMINISM_VECTORS = 1
#: an exact product's double-backward graph, live, over what the forward saves for backward under the math
#: attention kernel (``ProductPlan.saved_math_bytes``): simulated on GPT-2's uncached whole-batch product
#: (benchmarks/simulate.py, ``hvp_exact``; docs/cost_model.md, "Live memory")
EXACT_GRAPH_FACTOR = 2.87
#: parameter-sized vectors an exact product adds on the device: the vector in, the product and the gradient
#: being differentiated (operator.py, ``_hvp_autograd``)
EXACT_PRODUCT_VECTORS = 3
#: at the end of a gradient pass the device holds the parameters' gradients and their flat copy (with
#: micro-batches the flat sum of the slices before it too, counted once, among the check's vectors)
FLATTEN_VECTORS = 2


@rules.checked()
def estimate_check_memory(
    *,
    step_peak_bytes: float,
    resident_bytes: float,
    vector_bytes: float,
    pass_bytes: float | None = None,
    gradient_bytes: float | None = None,
    hvp: str = "finite_difference",
    micro_batches: int = 1,
    slice_fraction: float | None = None,
    basis_on_device: bool = True,
    measure: str = "lambda_max",
    max_basis: int = DEFAULT_MAX_BASIS,
    n_hvp: int = 9,
    graph_bytes: float | None = None,
) -> CheckMemory:
    """A check's device peak from the phases of its products, in live bytes (the simulated counterpart of
    :func:`estimate_check_cost`'s CPU RSS fit; docs/cost_model.md, "Live memory").

    A check runs its products one slice of the probe batch at a time. Its peak is the larger of:

    * the **gradient pass** of the largest slice: ``resident + f pass + V P`` (``f`` the slice's share of the
      batch; exact products hold ``c_x f graph`` instead, their double-backward graph);
    * the **flatten** that follows it: ``resident + FLATTEN_VECTORS G + V P``, the gradients and their flat copy
      (over several slices the running sum of the slices before is among ``V``);

    with ``V`` the parameter-sized vectors the check keeps on the device (:func:`_device_vectors`: the basis
    rows and the product's own; none for finite differences with the basis in host memory, as
    ``basis_device="auto"`` keeps it on an accelerator, where the flatten copies each gradient off the device
    as it goes).

    Args:
        step_peak_bytes: the training step's device peak (``torch.cuda.max_memory_allocated`` around a step).
        resident_bytes: what the device holds at the step's peak besides its transient: weights, buffers,
            optimizer state, and under FSDP2 the gathered weights and collective buffers of the blocks in flight.
        vector_bytes: one parameter-sized Krylov vector, ``P`` (this rank's shard under FSDP2; never below float32).
        pass_bytes: the transient of a forward and backward over the whole probe batch as the check runs it (eval
            mode: a model with dropout saves less than in training); default ``step_peak_bytes - resident_bytes``.
        gradient_bytes: the parameters' gradients, ``G`` (default ``vector_bytes``).
        hvp: ``"finite_difference"`` or ``"autograd"``.
        micro_batches: slices per probe batch, ``m``.
        slice_fraction: the largest slice's share of the batch (default ``1 / m``; 8 examples in 7 slices: 2/8).
        basis_on_device: whether the Krylov basis shares the device.
        measure: ``"lambda_max"`` (:func:`hessian_eigenvalues`, ``k=1``), ``"monitor"`` (the same in a
            :class:`~sharpguard.monitor.SharpnessMonitor`, after its first check) or ``"trace"`` (Hutch++).
        max_basis: the Lanczos basis cap.
        n_hvp: a trace's products (its sketch has ``n_hvp // 3`` columns).
        graph_bytes: for exact products, what the whole batch's forward saves for backward under the math
            attention kernel (``plan_products`` measures it: ``ProductPlan.saved_math_bytes``).
    """
    from ..errors import ConfigurationError

    rules.one_of("hvp", hvp, sorted(GRAPH_FACTOR))
    rules.one_of("measure", measure, ("lambda_max", "monitor", "trace"))
    step_peak = _positive("step_peak_bytes", step_peak_bytes)
    resident = rules.non_negative("resident_bytes", resident_bytes)
    if resident > step_peak:
        raise ConfigurationError(f"resident_bytes must be between 0 and step_peak_bytes ({step_peak:.4g}), "
                                 f"got {resident_bytes!r}.")
    vec = _positive("vector_bytes", vector_bytes)
    grad = vec if gradient_bytes is None else rules.non_negative("gradient_bytes", gradient_bytes)
    transient = step_peak - resident if pass_bytes is None else rules.non_negative("pass_bytes", pass_bytes)
    micro = rules.positive_int("micro_batches", micro_batches)
    max_basis, n_hvp = rules.positive_int("max_basis", max_basis), rules.positive_int("n_hvp", n_hvp)
    if graph_bytes is not None:
        graph_bytes = rules.non_negative("graph_bytes", graph_bytes)
    share = 1.0 / micro if slice_fraction is None else rules.between(0.0, 1.0, low_open=True)(
        "slice_fraction", slice_fraction)
    on_device = rules.flag("basis_on_device", basis_on_device)
    vectors = _device_vectors(hvp, measure, basis_on_device=on_device, several_slices=micro > 1,
                             max_basis=max_basis, n_hvp=n_hvp)
    if hvp == "autograd":
        if graph_bytes is None:
            raise ConfigurationError("exact products need graph_bytes (ProductPlan.saved_math_bytes).")
        passes = {"exact product": resident + EXACT_GRAPH_FACTOR * share * graph_bytes + vectors * vec}
    else:
        flatten = FLATTEN_VECTORS * grad if vectors else grad  # the slices' running sum is one of the vectors
        passes = {"gradient pass": resident + share * transient + vectors * vec,
                  "flatten": resident + flatten + vectors * vec}
    phase = max(passes, key=passes.__getitem__)
    return CheckMemory(peak_bytes=passes[phase], over_step=passes[phase] / step_peak, phase=phase,
                       device_vectors=float(vectors))


def _device_vectors(hvp: str, measure: str, *, basis_on_device: bool = True, several_slices: bool = False,
                   max_basis: int = DEFAULT_MAX_BASIS, n_hvp: int = 9) -> int:
    """Parameter-sized vectors a check keeps on the device beside its graph (:func:`estimate_check_memory`'s
    ``V``; arguments as there, ``several_slices``: more than one micro-batch).

    Finite differences: with the basis there, ``max_basis + 1`` rows and ``FD_RESIDENT_VECTORS`` (plus
    ``MONITOR_VECTORS`` for a monitor's warm start), or Hutch++'s ``n_hvp // 3 + HUTCHPP_VECTORS``, and the
    slices' running sum over several slices; with the basis in host memory none. Exact products:
    ``EXACT_PRODUCT_VECTORS``, and with the basis on the device the rows a product runs beside - Lanczos holds
    at most ``max_basis`` rows during a product (the next row is the product's result, stored after it) and its
    vector in is the last of them, not the copy a host basis makes (lanczos.py, ``Lanczos.step``):
    ``max_basis - 1`` more, and a monitor's warm start; Hutch++ its sketch's ``n_hvp // 3`` products. With its
    vectors on the device a Hutch++ check also holds ``DETERMINISM_VECTORS`` through the determinism check
    (tests/sharpness/test_simulated_scale.py; docs/cost_model.md, "Live memory")."""
    monitor = MONITOR_VECTORS if measure == "monitor" else 0
    if hvp == "autograd":
        if not basis_on_device:
            return EXACT_PRODUCT_VECTORS
        if measure == "trace":
            return EXACT_PRODUCT_VECTORS + n_hvp // 3 + DETERMINISM_VECTORS
        return EXACT_PRODUCT_VECTORS + max_basis - 1 + monitor
    if not basis_on_device:
        return 0
    if measure == "trace":
        return n_hvp // 3 + HUTCHPP_VECTORS + int(several_slices) + DETERMINISM_VECTORS
    return max_basis + 1 + FD_RESIDENT_VECTORS + int(several_slices) + monitor


def estimate_plan_memory(plan: Any, *, measure: str = "monitor", n_hvp: int = 9,
                         max_basis: int = DEFAULT_MAX_BASIS) -> CheckMemory | None:
    """:func:`estimate_check_memory` from what :func:`~sharpguard.sharpness.plan_products` measured, over the
    bytes the device holds between steps (weights, buffers, optimizer state: they cancel): the training step
    taken as the plan takes it, the probe batch's saved tensors plus the gradients. ``None`` where the plan
    measured nothing (a batch that cannot be split)."""
    # a ProductPlan, read by its fields (micro.py imports this module: no import back)
    fields = ("micro_batches", "hvp", "saved_bytes", "saved_math_bytes", "vector_bytes", "gradient_bytes",
              "slice_fraction", "basis_on_device")
    if not all(hasattr(plan, f) for f in fields):
        from ..errors import ConfigurationError

        raise ConfigurationError(f"plan must be a ProductPlan from plan_products, got {type(plan).__name__}.")
    if plan.saved_bytes <= 0 or plan.vector_bytes <= 0:
        return None
    step = plan.saved_bytes + plan.gradient_bytes
    return estimate_check_memory(
        step_peak_bytes=step, resident_bytes=0.0, vector_bytes=plan.vector_bytes, pass_bytes=step,
        gradient_bytes=plan.gradient_bytes or None, hvp=plan.hvp, micro_batches=plan.micro_batches,
        slice_fraction=plan.slice_fraction, basis_on_device=plan.basis_on_device, measure=measure,
        max_basis=max_basis, n_hvp=n_hvp, graph_bytes=plan.saved_math_bytes or plan.saved_bytes,
    )


def check_passes_per_hvp(hvp: str = "autograd", *, micro_batches: int = 1, probe_batches: int = 1) -> float:
    """One product's time in forward+backward passes of one probe batch (``HVP_PASSES``, or
    ``HVP_PASSES_CACHED`` when a single batch's gradient graph stays cached): what a monitor multiplies
    by its products per check to budget it."""
    if hvp == "autograd" and micro_batches == 1 and probe_batches == 1:
        return HVP_PASSES_CACHED
    return HVP_PASSES.get(hvp, HVP_PASSES["autograd"])


def check_flops_per_hvp(hvp: str = "autograd", *, micro_batches: int = 1, probe_batches: int = 1) -> float:
    """One product's matrix-product FLOPs over one forward+backward of a probe batch: ``HVP_FLOPS`` (3 exact,
    2 by finite differences), ``HVP_FLOPS_CACHED`` (2) on a single batch's cached gradient graph. The
    ratio a product's time tends to where matrix products dominate the step (large models, accelerators);
    :func:`check_passes_per_hvp` is the time measured on a CPU, where elementwise work adds to it."""
    if hvp == "autograd" and micro_batches == 1 and probe_batches == 1:
        return HVP_FLOPS_CACHED
    return HVP_FLOPS.get(hvp, HVP_FLOPS["autograd"])


@rules.checked()
def estimate_sam_cost(n_params: int, *, step_seconds: float, dtype_bytes: int = 4) -> SamCost:
    """A SAM step: at most one weight copy (``P b`` bytes, an upper bound of its extra peak) and two
    forward/backward passes (time and FLOPs)."""
    p = _positive("n_params", n_params)
    s = _positive("step_seconds", step_seconds)
    return SamCost(extra_bytes=p * _positive("dtype_bytes", dtype_bytes), seconds=2.0 * s, seconds_over_step=2.0)


# Bytes saved for backward per token and layer in float32, counted under FakeTensorMode by
# sharpguard.simulate on Hugging Face decoders with their default "sdpa" attention (benchmarks/simulate.py's
# fit: configs of 1-2 layers, varying s, b, h, m, V and the KV heads; exact to 0.1%):
# ``(per_h h + per_kv h kv / a + per_m m) s b`` per layer, ``per_s2 a s^2 b`` for an attention matrix the kernel
# keeps (GPT-2's dropout sends SDPA to the math kernel, which saves the weights and the dropout mask; Llama's flash
# kernel saves none), plus ``outside_h s b h`` outside the blocks and ``per_vocab s b V`` for the logits, their
# log-softmax and their gradient.
ACTIVATION_LAYOUTS: dict[str, dict[str, float]] = {
    "gpt2": {"per_h": 40.0, "per_kv": 0.0, "per_m": 20.0, "per_s2": 12.0, "outside_h": 12.0, "per_vocab": 12.0},
    "llama": {"per_h": 32.0, "per_kv": 8.0, "per_m": 16.0, "per_s2": 0.0, "outside_h": 13.0, "per_vocab": 12.0},
}


def transformer_activation_bytes(
    *,
    batch: int,
    seq_len: int,
    hidden: int,
    layers: int,
    heads: int,
    vocab: int,
    dtype_bytes: int = 4,
    layout: str = "korthikanti",
    mlp: int | None = None,
    kv_heads: int | None = None,
) -> float:
    """Activation bytes of a decoder's training step.

    ``layout="korthikanti"`` (default): ``s b h (34 + 5 a s / h)`` per layer in 2-byte activations
    (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022, eq. 1),
    rescaled to ``dtype_bytes``, plus the logits, their log-softmax and their gradient (``3 s b V``
    values), which dominate small models with a real vocabulary.

    ``layout="gpt2"`` or ``"llama"``: the float32 counts of Hugging Face's GPT-2 (GELU MLP of width
    ``mlp``, default ``4 h``, dropout on) and Llama (SwiGLU MLP of width ``mlp``, ``kv_heads`` key/value
    heads, default ``heads``) blocks as simulated
    (``ACTIVATION_LAYOUTS``), rescaled by ``dtype_bytes / 4``: what the training step of
    benchmarks/simulate.py holds at its peak besides weights, gradients and optimizer state.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("hidden", hidden), ("layers", layers),
                        ("heads", heads), ("vocab", vocab), ("dtype_bytes", dtype_bytes)):
        _positive(name, value)
    if layout == "korthikanti":
        per_layer = seq_len * batch * hidden * (34 + 5 * heads * seq_len / hidden) * dtype_bytes / 2
        return layers * per_layer + 3 * seq_len * batch * vocab * dtype_bytes
    if layout not in ACTIVATION_LAYOUTS:
        from ..errors import ConfigurationError

        raise ConfigurationError(
            f"layout must be 'korthikanti' or one of {sorted(ACTIVATION_LAYOUTS)}, got {layout!r}."
        )
    c = ACTIVATION_LAYOUTS[layout]
    width = 4 * hidden if mlp is None else _positive("mlp", mlp)
    tokens = seq_len * batch
    kv = heads if kv_heads is None else _positive("kv_heads", kv_heads)
    per_layer = (tokens * (c["per_h"] * hidden + c["per_kv"] * hidden * kv / heads + c["per_m"] * width)
                 + c["per_s2"] * heads * seq_len * tokens)
    total = layers * per_layer + tokens * (c["outside_h"] * hidden + c["per_vocab"] * vocab)
    return total * dtype_bytes / 4
