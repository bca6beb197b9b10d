"""The study's figures, rendered: tick labels that do not overprint (their window extents, as matplotlib
draws them), panels whose scale no single method sets, colours a reader can tell apart, and loss slices
that say which model and which direction they show."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.colors import to_rgb

from sharpguard.study import plots
from sharpguard.study.report import SHARPNESS_MEASURES

METHODS = ["sgd", "sam", "asam", "pgd-at", "trades", "fast-at", "weight-decay", "dropout", "spectral-norm",
           "distillation", "ensemble"]


def _no_overlapping_tick_labels(fig) -> None:
    for ax, which in itertools.product(fig.axes, ("x", "y")):
        boxes = plots.tick_label_boxes(fig, ax, which)
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), f"{which} tick labels overprint in panel {ax.get_title()!r}"


def _runs(lam_values) -> list[dict]:
    runs = []
    for i, (m, lam) in enumerate(zip(itertools.cycle(METHODS), lam_values)):
        runs.append({"method": m, "seed": i // len(METHODS), "robust_acc": 0.4 + 0.01 * i,
                     **{k: lam * (1 + 0.1 * j) for j, k in enumerate(SHARPNESS_MEASURES)}})
    return runs


def test_log_axis_tick_labels_do_not_overprint(tmp_path):
    # lambda_max over ~1.5 decades: a log axis, whose minor ticks matplotlib labels (2x10^-1, 3x10^-1, ...)
    lam = np.geomspace(0.25, 8.0, 33)
    fig = plots.sharpness_vs_robustness_figure(_runs(lam), SHARPNESS_MEASURES)
    assert fig.axes[0].get_xscale() == "log"
    plots.save(fig, tmp_path / "scatter.png")
    _no_overlapping_tick_labels(fig)
    assert any(t.get_text() for t in fig.axes[0].get_xticklabels())  # still labelled


def _history(values_by_method):
    return {m: [{"step": 100 * (k + 1), "metric": "sharpness/lambda_max", "value": float(v)}
                for k, v in enumerate(vals)] for m, vals in values_by_method.items()}


def test_training_curves_scale_is_not_set_by_one_method(tmp_path):
    values = {m: [8.0 - 0.5 * k - 0.3 * i for k in range(8)] for i, m in enumerate(METHODS[:9])}
    values["distillation"] = [26.0, 27.0, 15.0, 55.0, 13.0, 1e-20, 1e-22, 1e-24]
    fig = plots.training_curves_figure(_history(values), metrics=("sharpness/lambda_max",))
    plots.save(fig, tmp_path / "curves.png")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    bulk = [v for m, vals in values.items() if m != "distillation" for v in vals]
    assert hi < 2 * max(bulk) and hi - lo < 2 * (max(bulk) - min(bulk))  # the axis follows the bulk
    assert "off scale: distillation" in ax.get_title()
    _no_overlapping_tick_labels(fig)
    # without an outlier nothing is left out: every curve fits in the axis
    del values["distillation"]
    fig = plots.training_curves_figure(_history(values), metrics=("sharpness/lambda_max",))
    ax = fig.axes[0]
    assert "off scale" not in ax.get_title() and ax.get_ylim()[1] >= max(bulk) and ax.get_ylim()[0] <= min(bulk)


def test_loss_slices_share_a_scale_the_outlier_does_not_set_and_say_what_they_show(tmp_path):
    alphas = list(np.linspace(-1, 1, 21))
    slices = {m: (alphas, [0.05 + (1.0 + 0.1 * i) * a**2 for a in alphas]) for i, m in enumerate(METHODS)}
    slices["distillation"] = (alphas, [30.0 * a**6 for a in alphas])
    labels = {m: "seed 0" for m in METHODS}
    fig = plots.loss_slices_figure(slices, labels=labels, direction_seed=0)
    plots.save(fig, tmp_path / "slices.png")
    by_name = {ax.get_title().split(" ")[0]: ax for ax in fig.axes}
    assert set(by_name) == set(METHODS)
    for m, ax in by_name.items():
        assert "(seed 0)" in ax.get_title()
        top = ax.get_ylim()[1]
        if m == "distillation":
            assert "own scale" in ax.get_title() and top >= 30.0
        else:
            assert top < 3.0  # the others' curves fill their panels: 2.05 is their largest loss
    assert "direction seed 0" in fig.get_suptitle()
    _no_overlapping_tick_labels(fig)


def _lab(color) -> np.ndarray:
    """sRGB -> CIELAB (D65), the standard formulas (IEC 61966-2-1; CIE 15)."""
    rgb = np.asarray(to_rgb(color))
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ lin / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


@pytest.mark.parametrize("n", [4, 10, 11])
def test_method_colours_are_far_apart(n):
    colors = plots._colors(METHODS[:n])
    worst = min(np.linalg.norm(_lab(a) - _lab(b)) for a, b in itertools.combinations(colors.values(), 2))
    assert worst > 25  # ΔE*ab between every pair
    # one blue at most (hue 180-250 degrees, not grey): sgd, distillation and ensemble used to be three blues
    blues = [c for c in colors.values() if 180 <= _hue(c) <= 250 and _saturation(c) > 0.15]
    assert len(blues) <= 1


def _hue(color) -> float:
    import colorsys

    return 360.0 * colorsys.rgb_to_hsv(*to_rgb(color))[0]


def _saturation(color) -> float:
    import colorsys

    return colorsys.rgb_to_hsv(*to_rgb(color))[1]


def test_every_study_figure_renders_without_overprinting(tmp_path):
    rng = np.random.default_rng(0)
    runs = _runs(rng.lognormal(0.0, 1.2, 33))
    figs = [plots.sharpness_vs_robustness_figure(runs, SHARPNESS_MEASURES),
            plots.training_curves_figure(_history({m: rng.uniform(0.5, 6, 8) for m in METHODS[:10]})),
            plots.loss_slices_figure({m: ([-1, 0, 1], [1.0, 0.1, 1.2]) for m in METHODS})]
    for i, fig in enumerate(figs):
        plots.save(fig, tmp_path / f"{i}.png")
        _no_overlapping_tick_labels(fig)
