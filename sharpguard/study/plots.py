"""The study's figures, built with matplotlib's object API (no pyplot, no global state, no display needed).

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` (tests read its axis labels);
:func:`save` writes it as a PNG.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import require

LABELS = {
    "lambda_max": "top Hessian eigenvalue λ_max",
    "trace": "Hessian trace tr(H)",
    "worst_case_sharpness": "worst-case sharpness (ρ-ball)",
    "adaptive_sharpness": "adaptive worst-case sharpness",
    "relative_flatness": "relative flatness κ (penultimate layer)",
    "robust_sharpness": "worst-case sharpness of the robust loss",
    "input_curvature": "input-Hessian λ_max",
    "pgd_acc": "PGD-20 accuracy",
    "robust_acc": "worst-case robust accuracy",
    "sharpness/lambda_max": "top Hessian eigenvalue λ_max",
    "robustness/pgd_acc": "PGD accuracy",
}


def _figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    require("matplotlib", "study")
    from matplotlib.figure import Figure

    cols = min(n_panels, 4)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    if len(names) <= 10:
        cmap = colormaps["tab10"]
        return {n: cmap(i) for i, n in enumerate(names)}
    # tab20 pairs a dark and a light shade of each hue: use all dark shades first, so neighbours differ
    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {n: cmap(order[i % 20]) for i, n in enumerate(names)}


def sharpness_vs_robustness_figure(runs: Sequence[Mapping[str, Any]], measures: Sequence[str],
                                   robust: str = "robust_acc"):
    """One scatter panel per sharpness measure: measure (x, log scale when positive) against ``robust`` (y),
    one colour per method, one point per trained model."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = _colors(methods)
    fig, axes = _figure(len(measures))
    for ax, measure in zip(axes, measures):
        xs_all = []
        for m in methods:
            pts = [(r[measure], r[robust]) for r in runs
                   if r["method"] == m and r.get(measure) is not None and r.get(robust) is not None]
            if pts:
                xs, ys = zip(*pts)
                xs_all += xs
                ax.scatter(xs, ys, color=colors[m], label=m, s=28, alpha=0.85)
        # log scale for positive values spanning decades; a near-zero outlier (a saturated softmax gives
        # curvature ~1e-16) would squash everything else, so then stay linear
        if xs_all and min(xs_all) > 0 and 20 < max(xs_all) / min(xs_all) < 1e4:
            ax.set_xscale("log")
        ax.set_xlabel(LABELS.get(measure, measure))
        ax.set_ylabel(LABELS.get(robust, robust))
        ax.set_title(f"{measure} vs {robust}")
        ax.grid(alpha=0.3)
    if methods:
        axes[-1].legend(fontsize=7, loc="best")
    return fig


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                           metrics: Sequence[str] = ("sharpness/lambda_max", "robustness/pgd_acc")):
    """``metric`` against training step, one line per method: the mean over that method's seeds at each
    step. ``histories`` maps a method to its monitor records ``{"step", "metric", "value", ...}``."""
    methods = list(histories)
    colors = _colors(methods)
    fig, axes = _figure(len(metrics), width=5.5)
    for ax, metric in zip(axes, metrics):
        for m in methods:
            by_step: dict[int, list[float]] = defaultdict(list)
            for rec in histories[m]:
                if rec.get("metric") == metric and rec.get("value") is not None and math.isfinite(rec["value"]):
                    by_step[int(rec["step"])].append(float(rec["value"]))
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], marker="o", ms=3,
                        color=colors[m], label=m)
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_title(f"{metric} during training (mean over seeds)")
        ax.grid(alpha=0.3)
    if methods:
        axes[-1].legend(fontsize=7, loc="best")
    return fig


def loss_slices_figure(slices: Mapping[str, tuple[Sequence[float], Sequence[float]]]):
    """1D loss-landscape slices side by side: for each method, training loss against the step ``alpha``
    along one filter-normalized random direction (Li et al., 2018), on a shared y axis."""
    names = list(slices)
    fig, axes = _figure(max(1, len(names)), width=3.0, height=2.8)
    finite = [v for a, losses in slices.values() for v in losses if math.isfinite(v)]
    top = min(max(finite), 10 * (min(finite) + 1.0)) if finite else None
    for ax, name in zip(axes, names):
        alphas, losses = slices[name]
        ax.plot(list(alphas), list(losses), color="tab:blue")
        if top is not None:
            ax.set_ylim(bottom=0.0, top=top * 1.05)
        ax.set_xlabel("α (filter-normalized direction)")
        ax.set_ylabel("training loss")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    return fig


def history_figure(records: Sequence[Mapping[str, Any]]):
    """Every metric of a monitor history against its step, one panel per metric."""
    by_metric: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        v = rec.get("value")
        if v is not None and math.isfinite(v):
            by_metric[rec["metric"]].append((int(rec["step"]), float(v)))
    names = sorted(by_metric)
    fig, axes = _figure(max(1, len(names)))
    for ax, name in zip(axes, names):
        pts = sorted(by_metric[name])
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS.get(name, name))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    return fig


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path
