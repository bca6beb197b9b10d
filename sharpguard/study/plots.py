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

from .._atomic import atomic_open
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


def _outliers(values: Sequence[float]) -> list[bool]:
    """Points far outside the bulk: more than 5 scaled median absolute deviations from the median (on a
    log scale when every value is positive, so a spread of decades is not an outlier by itself). These are
    annotated at the edge instead of setting the axis range (a saturated softmax's ~1e-16 curvature would
    otherwise squash every other point into one pixel)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if v.size < 4:
        return [False] * int(v.size)
    if (v > 0).all():
        v = np.log10(v)
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    if mad == 0:  # more than half the points equal: fall back to the mean absolute deviation (x sqrt(pi/2))
        mad = 1.2533 * np.mean(np.abs(v - med))
    if mad == 0:
        return [False] * int(v.size)
    return [bool(abs(x - med) > 5 * mad) for x in v]


def _trend(ax, xs: Sequence[float], ys: Sequence[float], log_x: bool, x_range: tuple[float, float]) -> str:
    """Draw the Theil-Sen line (the slope estimator that goes with Kendall's tau; Sen 1968) fitted to all the
    points, over ``x_range`` (the inliers' span), and return ``tau = .., p = ..`` over all the points (ranks:
    an outlier moves neither)."""
    import numpy as np
    from scipy import stats as st

    from .stats import kendall_tau

    rc = kendall_tau(xs, ys)
    if rc.tau is None:
        return "τ undefined"
    use_log = log_x and min(xs) > 0
    x = np.log10(xs) if use_log else np.asarray(xs, dtype=float)
    slope, intercept, _, _ = st.theilslopes(ys, x)
    lo, hi = (np.log10(v) for v in x_range) if use_log else x_range
    grid = np.linspace(lo, hi, 50)
    ax.plot(10**grid if use_log else grid, intercept + slope * grid, color="0.3", lw=1.2, ls="--", zorder=1)
    return f"τ = {rc.tau:.2f}, p = {rc.p_value:.2g}, n = {rc.n}"


def sharpness_vs_robustness_figure(runs: Sequence[Mapping[str, Any]], measures: Sequence[str],
                                   robust: str = "robust_acc"):
    """A grid of scatter panels, one per sharpness measure: measure (x, log scale when positive and spread
    over decades) against ``robust`` (y), one colour per method, one point per trained model; a Theil-Sen
    trend line with Kendall's tau in each title; outliers annotated at the panel's edge rather than setting
    its scale; one legend for the figure, outside the panels."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    colors = _colors(methods)
    fig, axes = _figure(len(measures))
    for ax, measure in zip(axes, measures):
        pts = [(r[measure], r[robust], r["method"]) for r in runs
               if r.get(measure) is not None and r.get(robust) is not None]
        flags = _outliers([x for x, _, _ in pts])
        inliers = [p for p, out in zip(pts, flags) if not out]
        xs_in = [x for x, _, _ in inliers]
        log_x = bool(xs_in) and min(xs_in) > 0 and max(xs_in) / min(xs_in) > 20
        if log_x:
            ax.set_xscale("log")
        for m in methods:
            mine = [(x, y) for x, y, mm in inliers if mm == m]
            if mine:
                ax.scatter([x for x, _ in mine], [y for _, y in mine], color=colors[m], label=m, s=28, alpha=0.85,
                           zorder=2)
        title = f"{measure} vs {robust}"
        if len(pts) >= 3 and xs_in:
            title += "\n" + _trend(ax, [x for x, _, _ in pts], [y for _, y, _ in pts], log_x, (min(xs_in), max(xs_in)))
        outs = [p for p, out in zip(pts, flags) if out]
        if outs and xs_in:
            lo, hi = min(xs_in), max(xs_in)
            groups: dict[tuple[str, bool], list[tuple[float, float]]] = defaultdict(list)
            for x, y, m in outs:  # one label per method and side, so labels do not pile up
                groups[(m, x < lo)].append((x, y))
            for i, ((m, low_side), xy) in enumerate(sorted(groups.items())):
                vals = sorted(x for x, _ in xy)
                text = f"{m}: {vals[0]:.2g}" if len(vals) == 1 else f"{m} ×{len(vals)}: {vals[0]:.2g}…{vals[-1]:.2g}"
                y_mean = sum(y for _, y in xy) / len(xy)
                ax.annotate(text, xy=(lo if low_side else hi, y_mean), xytext=(4 if low_side else -4, 10 + 10 * i),
                            textcoords="offset points", ha="left" if low_side else "right", fontsize=7,
                            color=colors[m], arrowprops={"arrowstyle": "->", "color": colors[m]})
            title += f" ({len(outs)} outlier{'s' if len(outs) > 1 else ''} annotated)"
        ax.set_xlabel(LABELS.get(measure, measure))
        ax.set_ylabel(LABELS.get(robust, robust))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    _figure_legend(fig, methods, colors, line=False)
    return fig


def _figure_legend(fig, names: Sequence[str], colors: Mapping[str, Any], line: bool = True) -> None:
    """One legend for the whole figure, to the right of the panels (never over the data)."""
    if not names:
        return
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="-" if line else "", color=colors[n], label=n) for n in names]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                           metrics: Sequence[str] = ("sharpness/lambda_max", "robustness/pgd_acc")):
    """``metric`` against training step, one line per method: the mean over that method's seeds at each
    step, with a band from the lowest to the highest seed (the spread across seeds). ``histories`` maps a
    method to its monitor records ``{"step", "metric", "value", ...}`` (all seeds together)."""
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
                if any(len(by_step[s]) > 1 for s in steps):
                    ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                    color=colors[m], alpha=0.15, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_title(f"{metric} during training\n(mean over seeds; band: min-max)", fontsize=9)
        ax.grid(alpha=0.3)
    _figure_legend(fig, methods, colors)
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


def constant_metrics(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """Metrics whose every finite value, over every history, is the same number: ``{metric: value}``."""
    values: dict[str, set[float]] = defaultdict(set)
    for records in histories.values():
        for rec in records:
            v = rec.get("value")
            if v is not None and math.isfinite(v):
                values[rec["metric"]].add(float(v))
    return {m: next(iter(v)) for m, v in values.items() if len(v) == 1}


def history_figure(records: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]]):
    """Every metric of one monitor history (a list of records) or of several (``{label: records}``, one line
    each, one legend outside the panels) against the step, one panel per metric, on a grid. Metrics that are
    constant over every history get no panel; the figure's title names them with their value."""
    histories = dict(records) if isinstance(records, Mapping) else {"": list(records)}
    constant = constant_metrics(histories)
    by_metric: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for label, recs in histories.items():
        for rec in recs:
            v = rec.get("value")
            if v is not None and math.isfinite(v):
                by_metric[rec["metric"]][label].append((int(rec["step"]), float(v)))
    names = sorted(m for m in by_metric if m not in constant) or sorted(by_metric)
    labels = list(histories)
    colors = _colors(labels)
    fig, axes = _figure(max(1, len(names)))
    for ax, name in zip(axes, names):
        for label in labels:
            pts = sorted(by_metric[name].get(label, []))
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, color=colors[label],
                        label=label or None)
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS.get(name, name))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    left_out = [m for m in sorted(constant) if m not in names]
    if left_out:
        fig.suptitle("constant, not plotted: " + ", ".join(f"{m} = {constant[m]:.4g}" for m in left_out), fontsize=9)
    if len(labels) > 1:
        _figure_legend(fig, labels, colors)
    return fig


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:  # a whole PNG or none
        fig.savefig(fh, dpi=dpi, format="png")
    return path
