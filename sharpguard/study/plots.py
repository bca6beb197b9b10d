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


# Thirteen qualitative colours far apart in CIELAB (every pair differs by more than 25 ΔE*ab) with a single
# blue: tab10 with its cyan swapped for black, then teal, light orange and dark violet for larger sets.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#000000", "#00a087", "#fdbf6f", "#3c1361"]


def _colors(names: Sequence[str]) -> dict[str, Any]:
    """One colour per name from :data:`PALETTE`; beyond its length, matplotlib's tab20 (dark shades first)."""
    from matplotlib import colormaps

    if len(names) <= len(PALETTE):
        return {n: PALETTE[i] for i, n in enumerate(names)}
    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {n: cmap(order[i % 20]) for i, n in enumerate(names)}


def _off_scale(ranges: Mapping[str, tuple[float, float]], log: bool = False) -> list[str]:
    """The names whose own range sets the shared axis: leaving one out shrinks the span of all the others'
    ranges by more than 3x (on log scale when ``log``). At most a third of the names are left out, the
    largest first, so the axis shows the bulk and the few outliers are annotated instead."""
    import numpy as np

    def tf(v: float) -> float:
        return float(np.log10(v)) if log else v

    keep = {n: (tf(lo), tf(hi)) for n, (lo, hi) in ranges.items()}
    out: list[str] = []
    while len(keep) > 2 and len(out) < max(1, len(ranges) // 3):
        span = max(h for _, h in keep.values()) - min(lo for lo, _ in keep.values())
        if span <= 0:
            break
        best, best_span = None, span
        for n in keep:
            rest = [v for k, v in keep.items() if k != n]
            s = max(h for _, h in rest) - min(lo for lo, _ in rest)
            if s < best_span:
                best, best_span = n, s
        if best is None or best_span * 3 > span:
            break
        out.append(best)
        keep.pop(best)
    return out


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
    method to its monitor records ``{"step", "metric", "value", ...}`` (all seeds together). A method whose
    range alone would set a panel's scale (see :func:`_off_scale`) is still drawn, but the axis follows the
    others and the title names it with its range."""
    methods = list(histories)
    colors = _colors(methods)
    fig, axes = _figure(len(metrics), width=5.5)
    for ax, metric in zip(axes, metrics):
        ranges: dict[str, tuple[float, float]] = {}
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
                values = [v for vs in by_step.values() for v in vs]
                ranges[m] = (min(values), max(values))
        title = f"{metric} during training\n(mean over seeds; band: min-max)"
        off = _off_scale(ranges)
        if off:
            kept = [r for n, r in ranges.items() if n not in off]
            lo, hi = min(r[0] for r in kept), max(r[1] for r in kept)
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax.set_ylim(lo - pad, hi + pad)
            title += "\noff scale: " + ", ".join(f"{n} ({ranges[n][0]:.2g}..{ranges[n][1]:.2g})" for n in off)
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    _figure_legend(fig, methods, colors)
    return fig


def loss_slices_figure(slices: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       labels: Mapping[str, str] | None = None, direction_seed: int | None = None):
    """1D loss-landscape slices side by side: for each method, training loss against the step ``alpha``
    along one filter-normalized random direction (Li et al., 2018). The panels share one y axis so their
    curvature compares at a glance, except a method whose losses alone would set that scale (see
    :func:`_off_scale`): it keeps its own axis and its title says so. ``labels`` says which model each
    slice is of (e.g. ``"seed 0"``), ``direction_seed`` which random direction; both go into the titles."""
    names = list(slices)
    colors = _colors(names)
    fig, axes = _figure(max(1, len(names)), width=3.0, height=2.8)
    ranges = {n: (min(f), max(f)) for n, (_, losses) in slices.items()
              if (f := [v for v in losses if math.isfinite(v)])}
    off = _off_scale(ranges)
    kept = [r for n, r in ranges.items() if n not in off]
    top = max(hi for _, hi in kept) if kept else None
    for ax, name in zip(axes, names):
        alphas, losses = slices[name]
        ax.plot(list(alphas), list(losses), color=colors[name])
        title = name + (f" ({labels[name]})" if labels and name in labels else "")
        if name in off:
            title += "\nown scale"
        elif top is not None and top > 0:
            ax.set_ylim(bottom=0.0, top=top * 1.05)
        ax.set_xlabel("α (filter-normalized direction)")
        ax.set_ylabel("training loss")
        ax.set_title(title, fontsize=9, color="tab:red" if name in off else "black")
        ax.grid(alpha=0.3)
    what = "training loss along one filter-normalized random direction (Li et al., 2018)"
    if direction_seed is not None:
        what += f", direction seed {direction_seed}, the same for every method"
    fig.suptitle(what, fontsize=9)
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


def _overlaps(boxes) -> bool:
    boxes = sorted(boxes, key=lambda b: (b.x0, b.y0))
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def tick_label_boxes(fig, ax, which: str) -> list:
    """Window extents of ``ax``'s visible, non-empty tick labels on axis ``which`` ("x" or "y"), major and
    minor together (the figure must have been drawn)."""
    renderer = fig.canvas.get_renderer()
    axis = ax.xaxis if which == "x" else ax.yaxis
    ticks = axis.get_major_ticks() + axis.get_minor_ticks()
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    boxes = []
    for t in ticks:
        label = t.label1
        if label.get_visible() and label.get_text() and lo <= t.get_loc() <= hi:
            boxes.append(label.get_window_extent(renderer))
    return boxes


def declutter(fig) -> None:
    """Make every axis's tick labels readable: where they overprint (a log axis labels its minor ticks when
    it spans less than a few decades), drop the minor labels, then keep every k-th major label until none
    overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    for ax in fig.axes:
        for which in ("x", "y"):
            if not _overlaps(tick_label_boxes(fig, ax, which)):
                continue
            axis = ax.xaxis if which == "x" else ax.yaxis
            axis.set_minor_formatter(NullFormatter())
            fig.canvas.draw()
            for n in (5, 4, 3, 2):
                if not _overlaps(tick_label_boxes(fig, ax, which)):
                    break
                log = axis.get_scale() == "log"
                axis.set_major_locator(LogLocator(numticks=n) if log else MaxNLocator(nbins=n))
                fig.canvas.draw()


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` (tick labels decluttered first) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    declutter(fig)
    with atomic_open(path, "wb") as fh:  # a whole PNG or none
        fig.savefig(fh, dpi=dpi, format="png")
    return path
