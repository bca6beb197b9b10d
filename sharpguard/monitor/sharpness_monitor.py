"""Periodic curvature measurements on a frozen probe set: lambda_max/min, trace, edge-of-stability
ratio, SAM-style (worst-case / adaptive / average) sharpness and the curvature along the batch gradient.

Each measure delegates to :mod:`sharpguard.sharpness`; the monitor adds the warm start (Lanczos begins
from the previous check's top eigenvector, which cuts most of the ``log n`` start-up cost once training
moves slowly; docs/sharpness.md, warm start) and the edge-of-stability ratio from the
optimizer's own step size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._batches import batch_size, default_loss_fn, split_batch
from .._validation import check_keywords, keywords_of, positive, positive_int
from ..errors import ConfigurationError
from ..sharpness.cost import (EXACT_GRAPH_FACTOR, CheckMemory, _device_vectors, check_passes_per_hvp,
                              estimate_plan_memory)
from ..sharpness.micro import AUTO_MAX_MICRO_BATCHES, ProductPlan, plan_products
from ..sharpness.lanczos import resolve_basis_device
from .alerts import AlertRule, default_sharpness_alerts
from .base import Monitor
from .. import _validation as rules

__all__ = ["SharpnessMonitor"]


def _base_optimizer(optimizer: Any) -> Any:
    """Unwrap Lightning's/Accelerate's optimizer wrappers and a SAM wrapper down to the base optimizer."""
    for _ in range(5):
        inner = getattr(optimizer, "base_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _sgd_shift(optimizer: Any) -> float | None:
    """For SGD with one learning rate and one weight decay ``wd`` in every group, ``wd``: its EoS operator
    is then ``H + wd I`` (coupled L2 decay, :mod:`sharpguard.sharpness.stability`), whose top eigenpair is
    the Hessian's shifted by ``wd``. ``None`` for any other optimizer (its operator is not a shift of H)."""
    opt = _base_optimizer(optimizer)
    if not isinstance(opt, torch.optim.SGD):
        return None
    groups = opt.param_groups
    decays = {float(g.get("weight_decay", 0.0) or 0.0) for g in groups}
    if len(decays) != 1 or len({float(g["lr"]) for g in groups}) != 1:
        return None
    return decays.pop()


def _plain_sgd(optimizer: Any) -> bool:
    """SGD with one learning rate and no weight decay: its EoS operator is the plain Hessian."""
    return _sgd_shift(optimizer) == 0.0


#: each measure's function and the arguments the monitor passes itself (the rest are measure_kwargs')
MEASURE_FUNCTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lambda_max": ("hessian_eigenvalues",
                   ("model", "batches", "loss_fn", "k", "which", "init", "return_eigenvectors", "seed")),
    "lambda_min": ("hessian_eigenvalues",
                   ("model", "batches", "loss_fn", "k", "which", "init", "return_eigenvectors", "seed")),
    "trace": ("hessian_trace", ("model", "batches", "loss_fn", "seed")),
    "eos_ratio": ("eos_ratio", ("model", "batches", "optimizer", "loss_fn", "init", "seed")),
    "worst_case": ("worst_case_sharpness", ("model", "batches", "loss_fn", "adaptive")),
    "adaptive_worst_case": ("worst_case_sharpness", ("model", "batches", "loss_fn", "adaptive")),
    "average": ("average_sharpness", ("model", "batches", "loss_fn")),
    "batch": ("directional_curvature", ()),  # takes no keywords: measured along the batch gradient
    "relative_flatness": ("relative_flatness", ("model", "batches", "loss_fn")),
    "robust_sharpness": ("robust_sharpness", ("model", "batches")),
}


def check_measure_kwargs(measure_kwargs: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a keyword a measure's function does not take (``tol_``), or a value its rule refuses
    (``max_iter=True``), at construction rather than at the first check."""
    from .. import sharpness as S

    for measure, given in measure_kwargs.items():
        function, fixed = MEASURE_FUNCTIONS[measure]
        allowed = [] if measure == "batch" else [k for k in keywords_of(getattr(S, function)) if k not in fixed]
        check_keywords(f"measure_kwargs[{measure!r}]", given, allowed)
        for name, value in given.items():
            rule = rules.KNOBS.get(name)
            if rule is not None and value is not None:
                rule(f"measure_kwargs[{measure!r}][{name!r}]", value)


class SharpnessMonitor(Monitor):
    """Sharpness of the loss on a frozen probe set, every few steps or within a cost budget.

    Measures (metric ``sharpness/<name>``):

    ``lambda_max`` / ``lambda_min``
        extreme Hessian eigenvalues by Lanczos (:func:`~sharpguard.sharpness.hessian_eigenvalues`),
        warm-started from the previous check's eigenvector.
    ``trace``
        Hutch++ estimate of ``tr H`` (:func:`~sharpguard.sharpness.hessian_trace`).
    ``eos_ratio``
        top curvature over the optimizer's stability threshold (:func:`~sharpguard.sharpness.eos_ratio`:
        ``(2 + 2 beta)/lr`` for SGD with momentum ``beta``, the preconditioned Hessian for Adam). Needs
        ``optimizer``. For plain SGD one Lanczos run gives both ``lambda_max`` and the ratio.
    ``worst_case`` / ``adaptive_worst_case`` / ``average``
        SAM-style sharpness ``max_{||e|| <= rho} L(w + e) - L(w)`` (plain or adaptive, Kwon et al. 2021)
        (radius ``rho=``) and the average-case version (Gaussian ``sigma`` in ``measure_kwargs``).
    ``batch``
        curvature along the gradient of the current training batch, ``g^T H g / g^T g``
        (:func:`~sharpguard.sharpness.directional_curvature` on the batch already in memory; the first
        probe batch when the adapter passes none).

    ``relative_flatness``
        Petzka et al.'s (NeurIPS 2021) relative flatness of the last linear layer
        (:func:`~sharpguard.sharpness.relative_flatness`; one forward for a cross-entropy head), logged
        with its neuron-wise part as ``sharpness/relative_flatness_neuronwise``.
    ``robust_sharpness``
        worst-case sharpness of the PGD loss (Stutz et al., ICCV 2021;
        :func:`~sharpguard.sharpness.robust_sharpness`); needs the threat model's radius:
        ``measure_kwargs={"robust_sharpness": {"eps": 8/255}}``.

    Extra keyword arguments for a measure go in ``measure_kwargs``, e.g.
    ``measure_kwargs={"lambda_max": {"tol": 1e-3, "max_iter": 20}, "trace": {"n_hvp": 30}}``.

    ``micro_batches`` (default ``"auto"``): the Hessian-vector products run each probe batch as that many
    micro-batches, so the double-backward graph (a multiple of a whole batch's activations,
    docs/cost_model.md) holds one slice at a
    time. ``"auto"`` (:func:`~sharpguard.sharpness.plan_products`, also the default of every curvature
    function) measures what a forward of an eighth of the probe saves for backward at the first check and
    splits only as far as a check's memory must stay within a training step's on the same batch (up to 8
    slices; where the exact products' graph would not fit even then, as with long sequences under the
    math attention kernel, it takes finite-difference products and says so once); a model whose whole
    graph fits keeps its cached graph and the fast products (slicing every
    probe costs a warm check several times the time of whole batches: a product per slice, no cached
    graph; docs/monitors.md). On an accelerator the Lanczos basis lives in host
    memory (``basis_device="auto"`` of :func:`~sharpguard.sharpness.hessian_eigenvalues`), and so does the
    warm-start vector kept between checks. An integer forces that many (``1``: whole batches,
    graph cached). A probe batch that cannot be split (a per-example tensor that is not batch-first) is
    measured whole, and the monitor says so once.
    Every check also logs ``monitor/n_hvp`` (Hessian-vector products spent) and
    ``monitor/overhead_pct``. Default alerts: :func:`~sharpguard.monitor.default_sharpness_alerts`.
    """

    MEASURES = ("lambda_max", "lambda_min", "trace", "eos_ratio", "worst_case", "adaptive_worst_case", "average",
                "batch", "relative_flatness", "robust_sharpness")
    DEFAULT_MEASURES = ("lambda_max", "eos_ratio")
    prefix = "sharpness"

    @rules.checked()
    def __init__(
        self,
        measures: Sequence[str] | None = None,
        *,
        rho: float = 0.05,
        measure_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        warm_start: bool = True,
        micro_batches: int | str = "auto",
        **kwargs: Any,
    ) -> None:
        check_keywords("SharpnessMonitor", kwargs,
                       keywords_of(Monitor.__init__) + keywords_of(SharpnessMonitor.__init__))
        rho = positive("rho", rho, "; the SAM default is 0.05")
        if micro_batches != "auto":
            if isinstance(micro_batches, str):
                raise ConfigurationError(f"micro_batches must be 'auto' or a positive integer, got {micro_batches!r}.")
            micro_batches = positive_int("micro_batches", micro_batches)
        if measure_kwargs is not None and (
            not isinstance(measure_kwargs, Mapping) or not all(isinstance(v, Mapping) for v in measure_kwargs.values())
        ):
            raise ConfigurationError(
                "measure_kwargs maps a measure name to its keywords, e.g. {'lambda_max': {'max_iter': 20}}."
            )
        if not isinstance(warm_start, bool):
            raise ConfigurationError(f"warm_start must be True or False, got {warm_start!r}.")
        super().__init__(measures, **kwargs)
        unknown = set(measure_kwargs or {}) - set(self.MEASURES)
        if unknown:
            raise ConfigurationError(f"measure_kwargs names unknown measures {sorted(unknown)}; choose among "
                                     f"{list(self.MEASURES)}.")
        check_measure_kwargs(measure_kwargs or {})
        if "robust_sharpness" in self.measures:
            eps = (measure_kwargs or {}).get("robust_sharpness", {}).get("eps")
            positive("measure_kwargs['robust_sharpness']['eps']", eps if eps is not None else float("nan"),
                     "; robust_sharpness attacks with PGD of that radius, e.g. {'robust_sharpness': {'eps': 8/255}}")
        self.rho = float(rho)
        self.measure_kwargs = {k: dict(v) for k, v in (measure_kwargs or {}).items()}
        self.warm_start = warm_start
        self.micro_batches = micro_batches
        # (probe batch ids, the plan) chosen by "auto" (sharpguard.sharpness.plan_products)
        self._auto: tuple[tuple[int, ...], ProductPlan] | None = None
        self._eigenvector: Any | None = None
        self._eos_vector: Any | None = None
        self.n_hvp_total = 0

    def default_alerts(self) -> list[AlertRule]:
        return default_sharpness_alerts()

    @property
    def HVP_STEPS(self) -> float:  # noqa: N802 (was a class constant)
        """One Hessian-vector product in training steps on the same examples: the fitted cost model of
        :mod:`sharpguard.sharpness.cost` (docs/cost_model.md) for exact products, cached graph or not."""
        batches = len(self.probe.batches) if self.probe.ready else 1
        slices = self._slices()
        # "auto" before its first choice: budget the most slices it may take (uncached: the dearer case)
        return check_passes_per_hvp(self._planned_hvp(), micro_batches=slices or AUTO_MAX_MICRO_BATCHES,
                                    probe_batches=batches)

    def _planned_hvp(self) -> str:
        """The product method ``micro_batches="auto"`` chose (exact products before its first choice)."""
        return self._auto[1].hvp if self.micro_batches == "auto" and self._auto is not None else "autograd"

    def _slices(self) -> int | None:
        """The micro-batches a probe batch actually splits into: ``micro_batches``, or fewer when the
        probe's smallest batch has fewer examples (one each); ``micro_batches`` before the probe exists.
        Under ``"auto"``: the last choice, or None before the first check."""
        if self.micro_batches == "auto":
            return None if self._auto is None else self._auto[1].micro_batches
        if not self.probe.ready:
            return self.micro_batches
        try:
            return max(1, min([self.micro_batches, *(batch_size(b) for b in self.probe.batches)]))
        except ConfigurationError:  # a batch without a batch dimension: measured whole (said when it happens)
            return 1

    def passes(self) -> float:
        want, hvps, steps = set(self.measures), 0.0, 0.0
        lanczos_runs = int(bool(want & {"lambda_max", "lambda_min"})) + int("eos_ratio" in want)
        if {"lambda_max", "eos_ratio"} <= want and "lambda_min" not in want:
            lanczos_runs = 1  # one run serves both for SGD (Adam's preconditioned run is extra)
        if lanczos_runs:
            iters = max(int(self._kw(m).get("max_iter", 20)) for m in ("lambda_max", "lambda_min", "eos_ratio"))
            hvps += lanczos_runs * (iters + 2)
        if "trace" in want:
            hvps += int(self._kw("trace").get("n_hvp", 60)) + 1
        for name in ("worst_case", "adaptive_worst_case"):
            if name in want:
                steps += int(self._kw(name).get("steps", 5)) + 1
        if "average" in want:
            steps += 0.5 * int(self._kw("average").get("n_samples", 10)) + 0.5
        if "batch" in want:
            hvps += 3
        if "relative_flatness" in want:
            steps += 0.5  # the closed form: one forward over the probe
        if "robust_sharpness" in want:
            kw = self._kw("robust_sharpness")
            steps += (int(kw.get("steps", 5)) + 1) * (int(kw.get("attack_steps", 10)) + 1)
        return hvps * self.HVP_STEPS + steps

    def check_memory(self) -> CheckMemory | None:
        """The live-memory cost model's prediction of a full check (docs/cost_model.md, "Live memory"), over the
        bytes the device holds between steps, from what ``micro_batches="auto"`` measured at the first check:
        :func:`~sharpguard.sharpness.cost.estimate_plan_memory` for its largest Krylov measure. ``None`` before
        that plan, or with ``micro_batches`` fixed by the caller."""
        if self.micro_batches != "auto" or self._auto is None:
            return None
        plan, want, predictions = self._auto[1], set(self.measures), []
        if want & {"lambda_max", "lambda_min", "eos_ratio"}:
            predictions.append(estimate_plan_memory(plan, measure="monitor"))
        if "trace" in want:
            predictions.append(estimate_plan_memory(plan, measure="trace",
                                                    n_hvp=int(self._kw("trace").get("n_hvp", 60))))
        known = [p for p in predictions if p is not None]
        return max(known, key=lambda p: p.peak_bytes) if known else None

    def describe(self) -> str:
        line = super().describe()
        if not set(self.measures) & {"lambda_max", "lambda_min", "eos_ratio", "trace"}:
            return line
        slices = self._slices()
        memory = self.check_memory()
        if memory is not None:  # a plan exists, so the slices are known
            return (f"{line[:-1]}; memory per check (live-tensor cost model, docs/cost_model.md): "
                    f"~{memory.over_step:.2f}x a training step's above the weights and optimizer state, at its "
                    f"{memory.phase} "
                    f"({slices} micro-batch{'es' if slices > 1 else ''} per probe batch, {self._planned_hvp()} "
                    f"products, {memory.device_vectors:.0f} model-size vectors on the device).")
        # no plan yet: the live-tensor model's exact product, its basis on the device
        vectors = _device_vectors("autograd", "monitor")
        if slices is None:
            graph = (f"the products' graph at most ~{EXACT_GRAPH_FACTOR / AUTO_MAX_MICRO_BATCHES:.1f}x what a "
                     "training step's forward saves, split so that the check fits in a training step's memory "
                     f"(micro-batches chosen at the first check, up to {AUTO_MAX_MICRO_BATCHES})")
        else:
            where = "" if self.probe.ready or slices == 1 else "up to "
            graph = (f"the products' graph ~{EXACT_GRAPH_FACTOR / slices:.1f}x what a training step's forward saves "
                     f"({where}{slices} micro-batch{'es' if slices > 1 else ''} per probe batch)")
        return (f"{line[:-1]}; memory per check (live-tensor cost model, docs/cost_model.md): {graph} plus "
                f"~{vectors:.0f} model-size vectors.")

    def _kw(self, name: str) -> dict[str, Any]:
        return dict(self.measure_kwargs.get(name, {}))

    def _micro_batches_for(self, model: nn.Module, batches: list[Any]) -> int:
        """``micro_batches`` (under ``"auto"``: :func:`~sharpguard.sharpness.plan_products`, once per probe), or 1 (said
        once) when a probe batch cannot be split by examples."""
        if self.micro_batches == 1 or self.__dict__.get("_micro_batches_failed"):
            return 1
        micro = self.micro_batches
        if micro == "auto":
            key = tuple(id(b) for b in batches)
            if self._auto is None or self._auto[0] != key:
                try:
                    kw = self._kw("lambda_max")
                    device = next(p for p in model.parameters()).device
                    # the basis where the check will keep it (host memory on an accelerator), as the function plans
                    on_device = resolve_basis_device(kw.get("basis_device", "auto"), device) == device
                    plan = plan_products(model, batches, self.loss_fn, hvp=kw.get("hvp", "auto"),
                                         basis_on_device=on_device)
                    self._auto = (key, plan)
                    if plan.reason:
                        self.warn_once("finite-difference", f"sharpness checks use {plan.reason}.")
                except ConfigurationError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the loss cannot run on a slice: whole batches
                    self._whole_batches_from_now_on(exc)
                    return 1
            micro = self._auto[1].micro_batches
            if micro == 1:
                return 1
        try:
            for b in batches:
                split_batch(b, micro)
        except ConfigurationError as exc:
            self.warn_once("micro-batches", f"the Hessian-vector products run on whole probe batches, so a check may "
                           f"need ~3-4x a training step's memory: {exc}")
            return 1
        return micro

    #: the relative Ritz-residual tolerance of a quick first check's Lanczos runs (full checks: 1e-3)
    QUICK_TOL = 1e-2
    #: the Hutch++ products of a quick first check's trace (full checks: 60)
    QUICK_TRACE_HVP = 15

    def quick_settings(self) -> dict[str, Any]:
        return {"tol": self.QUICK_TOL} if set(self.measures) & {"lambda_max", "lambda_min", "eos_ratio"} else {}

    def _quick_kw(self, kw: dict[str, Any], *, tol: bool = False, n_hvp: bool = False) -> dict[str, Any]:
        """A measure's keywords, loosened for the quick first check (never tightened)."""
        if not self.quick:
            return kw
        if tol:
            kw["tol"] = max(float(kw["tol"]), self.QUICK_TOL)
        if n_hvp:
            kw["n_hvp"] = min(int(kw.get("n_hvp", 60)), self.QUICK_TRACE_HVP)
        return kw

    def _measure(self, model: nn.Module, batches: list[Any], optimizer: Any | None, batch: Any | None):
        if self.quick:
            # the quick probe's micro-batch choice is its own: the full probe's is made at the full check
            saved, self._auto = self._auto, None
            try:
                return self._measure_full_or_sliced(model, batches, optimizer, batch)
            finally:
                self._auto = saved
        return self._measure_full_or_sliced(model, batches, optimizer, batch)

    def _measure_full_or_sliced(self, model: nn.Module, batches: list[Any], optimizer: Any | None, batch: Any | None):
        micro = self._micro_batches_for(model, batches)
        try:
            return self._measure_on(model, batches, optimizer, batch, micro)
        except ConfigurationError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried whole; a second failure propagates
            if micro == 1:
                raise
            self._whole_batches_from_now_on(exc)
            return self._measure_on(model, batches, optimizer, batch, 1)

    def _whole_batches_from_now_on(self, exc: Exception) -> None:
        """A loss that depends on the batch as a whole (a recurrent state sized for the training batch, a
        per-batch normalisation) cannot run on a part of it: measure whole batches from now on, said once."""
        self._micro_batches_failed = True
        self.warn_once("micro-batches", f"the Hessian-vector products run on whole probe batches from now on, so a "
                       f"check may need ~3-4x a training step's memory: the loss failed on a micro-batch "
                       f"({type(exc).__name__}: {exc})")

    def _measure_on(self, model: nn.Module, batches: list[Any], optimizer: Any | None, batch: Any | None, micro: int):
        from .. import sharpness as S

        metrics: dict[str, float] = {}
        settings: dict[str, dict[str, Any]] = {}
        n_hvp = 0
        want = set(self.measures)
        hvp_kw: dict[str, Any] = {"micro_batches": micro}
        if self._planned_hvp() == "finite_difference":  # exact products would not fit (plan_products)
            hvp_kw["hvp"] = "finite_difference"
        eos = "eos_ratio" in want and optimizer is not None
        if "eos_ratio" in want and optimizer is None:
            self.warn_once("eos", "sharpness/eos_ratio needs the optimizer; pass optimizer= to on_step_end.")
        # for plain SGD the edge-of-stability operator is the Hessian itself: one Lanczos run serves both
        # (with one weight decay wd in every group the operator is H + wd I: lambda_max is its top value - wd)
        shift = _sgd_shift(optimizer) if eos else None
        lambda_from_eos = eos and "lambda_max" in want and "lambda_min" not in want and shift is not None

        r = None
        if eos:
            kw = self._quick_kw({"tol": 1e-3, "max_iter": 20, **hvp_kw, **self._kw("eos_ratio")}, tol=True)
            init = self._eos_vector if self.warm_start else None
            self.progress_stage("eos_ratio")
            try:
                r = S.eos_ratio(model, batches, optimizer, self.loss_fn, init=init, seed=self.seed, **kw)
            except ConfigurationError as exc:
                # the optimizer is not measurable right now (Adam whose first step a GradScaler skipped,
                # an optimizer eos_ratio does not know): a monitor reports that, it never stops training
                self.warn_once("eos-unavailable", f"sharpness/eos_ratio skipped: {exc}")
                eos = lambda_from_eos = False
        if r is not None:
            self.progress_done("eos_ratio", 2 if lambda_from_eos else 1)
            n_hvp += int(r.n_hvp)
            self._eos_vector = r.eigenvector
            metrics["sharpness/eos_ratio"] = float(r.ratio)
            settings["sharpness/eos_ratio"] = {
                "threshold": float(r.threshold), "lambda_max": float(r.lambda_max), "optimizer": r.optimizer,
                "preconditioned": bool(r.preconditioned), "lr": float(r.lr), "beta": float(r.beta),
                "n_hvp": int(r.n_hvp), "residual": float(r.residual), "converged": bool(r.converged),
                "warm_start": init is not None, "cost_only": bool(r.settings.get("cost_only")), **_plain(kw),
            }
            if lambda_from_eos:
                metrics["sharpness/lambda_max"] = float(r.lambda_max) - shift
                settings["sharpness/lambda_max"] = {**settings["sharpness/eos_ratio"], "method": "lanczos",
                                                    "from": "eos_ratio's Lanczos run on H + wd I, minus wd",
                                                    "weight_decay": shift}

        need_max = "lambda_max" in want and not lambda_from_eos
        if need_max or "lambda_min" in want:
            which = "both" if need_max and "lambda_min" in want else ("largest" if need_max else "smallest")
            kw = self._quick_kw({"tol": 1e-3, "max_iter": 20, **hvp_kw, **self._kw("lambda_max"),
                                 **self._kw("lambda_min")}, tol=True)
            init = self._eigenvector if (self.warm_start and which != "smallest") else None
            self.progress_stage("lambda_max/min" if which == "both" else ("lambda_max" if need_max else "lambda_min"))
            res = S.hessian_eigenvalues(
                model, batches, self.loss_fn, k=1, which=which, init=init, return_eigenvectors=which != "smallest",
                seed=self.seed, **kw
            )
            n_hvp += int(res.n_hvp)
            common = {"method": "lanczos", "n_hvp": int(res.n_hvp), "converged": bool(res.converged),
                      "warm_start": init is not None, "cost_only": bool(res.cost_only), **_plain(kw)}
            if which != "smallest" and res.eigenvectors:
                self._eigenvector = res.eigenvectors[0]
            if need_max:
                metrics["sharpness/lambda_max"] = float(res.eigenvalues[0])
                settings["sharpness/lambda_max"] = {**common, "residual": float(res.residuals[0])}
            if "lambda_min" in want:
                metrics["sharpness/lambda_min"] = float(res.eigenvalues[-1])
                settings["sharpness/lambda_min"] = {**common, "residual": float(res.residuals[-1])}
            self.progress_done("lambda", int(need_max) + int("lambda_min" in want))

        if "trace" in want:
            kw = self._quick_kw({"method": "hutch++", **hvp_kw, **self._kw("trace")}, n_hvp=True)
            self.progress_stage("trace")
            res = S.hessian_trace(model, batches, self.loss_fn, seed=self.seed, **kw)
            n_hvp += int(res.n_hvp)
            metrics["sharpness/trace"] = float(res.trace)
            settings["sharpness/trace"] = {"n_hvp": int(res.n_hvp), "stderr": float(res.stderr),
                                           "cost_only": bool(res.settings.get("cost_only")), **_plain(kw)}
            self.progress_done("trace")

        for name, adaptive in (("worst_case", False), ("adaptive_worst_case", True)):
            if name in want:
                kw = {"rho": self.rho, **self._kw(name)}
                self.progress_stage(name)
                res = S.worst_case_sharpness(model, batches, self.loss_fn, adaptive=adaptive, **kw)
                metrics[f"sharpness/{name}"] = float(res.value)
                settings[f"sharpness/{name}"] = _result_settings(res, kw)
                self.progress_done(name)
        if "average" in want:
            kw = {"seed": self.seed, **self._kw("average")}
            self.progress_stage("average")
            res = S.average_sharpness(model, batches, self.loss_fn, **kw)
            metrics["sharpness/average"] = float(res.value)
            settings["sharpness/average"] = _result_settings(res, kw)
            self.progress_done("average")
        if "batch" in want:
            on_batch = batch is not None
            self.progress_stage("batch")
            res = S.directional_curvature(model, batch if on_batch else batches[0], self.loss_fn, direction="gradient")
            n_hvp += int(res.n_hvp)
            metrics["sharpness/batch"] = float(res.value)
            settings["sharpness/batch"] = {"definition": "g^T H g / g^T g along the batch gradient",
                                           "n_hvp": int(res.n_hvp),
                                           "on": "training batch" if on_batch else "first probe batch"}
            self.progress_done("batch")
        if "relative_flatness" in want:
            kw = self._kw("relative_flatness")
            # the default cross entropy has a closed form (one forward); any other loss costs HVPs
            loss_fn = None if self.loss_fn is default_loss_fn else self.loss_fn
            self.progress_stage("relative_flatness")
            res = S.relative_flatness(model, batches, loss_fn, **kw)
            n_hvp += int(res.n_hvp)
            metrics["sharpness/relative_flatness"] = float(res.value)
            metrics["sharpness/relative_flatness_neuronwise"] = float(res.neuronwise)
            settings["sharpness/relative_flatness"] = {"layer": res.layer, "method": res.method,
                                                       "n_hvp": int(res.n_hvp), **_plain(kw)}
            self.progress_done("relative_flatness")
        if "robust_sharpness" in want:
            kw = {"rho": self.rho, "seed": self.seed, **self._kw("robust_sharpness")}
            self.progress_stage("robust_sharpness")
            res = S.robust_sharpness(model, batches, **kw)
            metrics["sharpness/robust_sharpness"] = float(res.value)
            settings["sharpness/robust_sharpness"] = _result_settings(res, kw)
            self.progress_done("robust_sharpness")
        self.n_hvp_total += n_hvp
        metrics["monitor/n_hvp"] = float(n_hvp)
        return metrics, settings

    def _extra_state(self) -> dict[str, Any]:
        # the warm-start vector has the size of the model: not stored; the first check after a resume
        # starts Lanczos from a seeded random vector (the measured value does not depend on it)
        return {"n_hvp_total": self.n_hvp_total}

    def _check_extra_state(self, state):
        value = state.get("n_hvp_total", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(
                f"monitor checkpoint field 'extra.n_hvp_total' must be an integer >= 0, got {value!r}; nothing was "
                "loaded."
            )

    def _load_extra_state(self, state):
        self.n_hvp_total = int(state.get("n_hvp_total", 0))
        self._eigenvector = self._eos_vector = None


def _result_settings(res: Any, kw: Mapping[str, Any]) -> dict[str, Any]:
    return {**_plain(getattr(res, "settings", {}) or {}), **_plain(kw),
            "definition": str(getattr(res, "definition", ""))}


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}
