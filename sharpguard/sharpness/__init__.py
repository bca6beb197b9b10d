"""Sharpness and curvature of a model's loss on a frozen probe set, measured without side effects.

* :class:`HVPOperator` - Hessian-vector products (double backward; math-attention or finite-difference
  fallback), batch-size weighted over the probe, all-reduced under ``torch.distributed``.
* :func:`hessian_eigenvalues` (Lanczos), :func:`hessian_trace` (Hutchinson / Hutch++),
  :func:`spectral_density` (stochastic Lanczos quadrature) with :func:`plot_spectral_density`.
* :func:`worst_case_sharpness`, :func:`average_sharpness`, :func:`first_order_sharpness`,
  :func:`keskar_sharpness` - loss increase under weight perturbations (SAM-style and Keskar).
* :func:`loss_slice_1d`, :func:`loss_slice_2d`, :func:`plot_loss_slice` - filter-normalized slices.
* :func:`eos_ratio`, :func:`directional_curvature` - edge-of-stability diagnostics.
* :func:`relative_flatness` - Petzka et al.'s (NeurIPS 2021) relative flatness of a layer (closed form
  for a softmax head, as in Walter et al. 2026); :func:`robust_sharpness` - worst-case sharpness of the
  PGD loss (Stutz et al., ICCV 2021).
* :func:`input_hessian_eigenvalue` (CURE, Moosavi-Dezfooli et al. 2019), :func:`adversarial_geometry` -
  curvature and confidence in input space, at clean and at adversarial examples.

Every function leaves parameters, ``.grad``, ``requires_grad``, buffers, module modes and the global RNG
exactly as it found them, and runs the model in eval mode unless ``train=True``. See docs/sharpness.md.
"""

from .density import SpectralDensity, plot_spectral_density, spectral_density
from .input_space import (
    AdversarialGeometry,
    InputCurvature,
    adversarial_geometry,
    input_hessian_eigenvalue,
    robust_sharpness,
)
from .lanczos import EigenResult, hessian_eigenvalues
from .landscape import LossSlice, filter_normalized_direction, loss_slice_1d, loss_slice_2d, plot_loss_slice
from .operator import HVPOperator, NonDeterministicHVPError, ProbeLoss
from .perturbation import (
    SharpnessResult,
    average_sharpness,
    first_order_sharpness,
    keskar_sharpness,
    worst_case_sharpness,
)
from .relative import RelativeFlatnessResult, penultimate_linear, relative_flatness
from .stability import DirectionalCurvature, EoSResult, directional_curvature, eos_ratio
from .trace import TraceResult, hessian_trace

__all__ = [
    "AdversarialGeometry",
    "DirectionalCurvature",
    "EigenResult",
    "EoSResult",
    "HVPOperator",
    "InputCurvature",
    "LossSlice",
    "NonDeterministicHVPError",
    "ProbeLoss",
    "RelativeFlatnessResult",
    "SharpnessResult",
    "SpectralDensity",
    "TraceResult",
    "adversarial_geometry",
    "average_sharpness",
    "directional_curvature",
    "eos_ratio",
    "filter_normalized_direction",
    "first_order_sharpness",
    "hessian_eigenvalues",
    "hessian_trace",
    "input_hessian_eigenvalue",
    "keskar_sharpness",
    "loss_slice_1d",
    "loss_slice_2d",
    "penultimate_linear",
    "plot_loss_slice",
    "plot_spectral_density",
    "relative_flatness",
    "robust_sharpness",
    "spectral_density",
    "worst_case_sharpness",
]

# cost model of SAM steps and curvature checks (docs/cost_model.md)
from .cost import (CheckCost, CheckMemory, SamCost, estimate_check_cost, estimate_check_memory, estimate_plan_memory,
                   estimate_sam_cost)

__all__ += ["CheckCost", "CheckMemory", "SamCost", "estimate_check_cost", "estimate_check_memory",
            "estimate_plan_memory", "estimate_sam_cost"]

from .sharded import ShardedHVPOperator, is_sharded  # noqa: E402

__all__ += ["ShardedHVPOperator", "is_sharded"]

from .micro import ProductPlan, auto_micro_batches, plan_products

__all__ += ["ProductPlan", "auto_micro_batches", "plan_products"]
