"""report.json / report.md, the figures and the history summary, on synthetic runs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sharpguard.errors import ConfigurationError
from sharpguard.study import history as hist
from sharpguard.study import plots
from sharpguard.study.report import SHARPNESS_MEASURES, build_report, correlations, render_markdown, write_report

SETTINGS = {"eps": 0.1, "epochs": 3, "seeds": 3, "rho": 0.05, "lr": 0.05, "model": "MLP",
            "dataset": {"name": "synthetic", "n_train": 10, "n_test": 5}}


def _runs(sam_flatter: bool = True, at_more_robust: bool = True) -> list[dict]:
    """sgd/sam/pgd-at/dropout, three seeds; robustness falls exactly as lambda_max rises (tau = -1)."""
    rng = np.random.default_rng(0)
    base = {"sgd": (10.0, 0.20), "sam": (4.0 if sam_flatter else 16.0, 0.30), "dropout": (8.0, 0.25),
            "pgd-at": (2.0, 0.80 if at_more_robust else 0.05)}
    runs = []
    for method, (lam, acc) in base.items():
        for seed in range(3):
            lam_s = lam + 0.1 * seed
            runs.append({
                "method": method, "seed": seed, "clean_acc": 0.95 - 0.01 * seed, "pgd_acc": acc - 0.001 * seed,
                "fgsm_acc": acc - 0.001 * seed + 0.05, "pgd_margin_acc": acc - 0.001 * seed - 0.01,
                "robust_acc": acc - 0.001 * seed - 0.01, "lambda_max": lam_s, "trace": 5 * lam_s,
                "worst_case_sharpness": 0.01 * lam_s, "adaptive_sharpness": 0.02 * lam_s + rng.uniform(0, 1e-4),
                "train_time_s": 1.0 + seed,
            })
    return runs


def test_report_schema_summary_and_verdicts(tmp_path):
    runs = _runs()
    report = build_report(runs, SETTINGS)
    assert set(report) >= {"runs", "correlations", "settings", "summary", "findings"}
    assert all({"method", "seed", "lambda_max", "pgd_acc"} <= r.keys() for r in report["runs"])
    sgd = report["summary"]["sgd"]["lambda_max"]
    assert sgd["n"] == 3 and sgd["mean"] == pytest.approx(10.1)
    # a positive quantity: t-interval of the logs, t(0.975, 2) = 4.3027, around the geometric mean
    logs = np.log([10.0, 10.1, 10.2])
    half = 4.302652729749464 * logs.std(ddof=1) / np.sqrt(3)
    assert sgd["scale"] == "log" and sgd["center"] == pytest.approx(np.exp(logs.mean()))
    assert (sgd["low"], sgd["high"]) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    # a fraction: the plain t-interval (s = 0.01), within [0, 1]
    acc = report["summary"]["sgd"]["clean_acc"]
    assert acc["half_width"] == pytest.approx(4.302652729749464 * 0.01 / np.sqrt(3)) and acc["scale"] == "linear"
    verdicts = {h["claim"]: h["verdict"] for h in report["findings"]["hypotheses"]}
    assert verdicts["sam lambda_max below sgd"] == "supported"
    assert verdicts["pgd-at pgd_acc above sgd"] == "supported"
    # lambda_max and pgd_acc are perfectly anti-ordered across all 12 runs
    lam = report["correlations"]["all_runs"]["lambda_max"]
    assert lam["tau"] == pytest.approx(-1.0) and lam["n"] == 12 and lam["p_value"] < 1e-3

    json_path, md_path = write_report(report, tmp_path, plots=["scatter.png"])
    loaded = json.loads(json_path.read_text())
    assert loaded["runs"][0]["method"] == "sgd"
    md = md_path.read_text()
    assert "| sam | 3 |" in md and "τ = -1.00" in md and "![scatter](scatter.png)" in md
    assert "What the data do not support" in md


def test_report_says_so_when_the_data_contradict_the_hypotheses():
    report = build_report(_runs(sam_flatter=False, at_more_robust=False), SETTINGS)
    hyps = {h["claim"]: h for h in report["findings"]["hypotheses"]}
    assert hyps["sam lambda_max below sgd"]["verdict"] == "contradicted"
    assert hyps["pgd-at pgd_acc above sgd"]["verdict"] == "contradicted"
    assert hyps["sam lambda_max below sgd"]["why"]  # the closing note explains
    text = " ".join(report["findings"]["not_supported"])
    assert "That sam's lambda_max is below sgd's: in this run it is not" in text
    assert "That pgd-at's pgd_acc is above sgd's: in this run it is not" in text
    md = render_markdown(report)
    assert "in this run it is not" in md


def test_direction_only_when_seeds_do_not_separate_the_methods():
    runs = _runs()
    for r in runs:  # make sam and sgd overlap heavily: same mean up to noise
        if r["method"] == "sam":
            r["lambda_max"] = 10.1 - 0.05 + [0.0, -0.5, 0.6][r["seed"]]
    report = build_report(runs, SETTINGS)
    verdicts = {h["claim"]: h["verdict"] for h in report["findings"]["hypotheses"]}
    assert verdicts["sam lambda_max below sgd"] == "direction only"


def test_correlation_views_separate_adversarial_training():
    runs = _runs()
    corr = correlations(runs)
    assert set(corr) == {"all_runs", "no_adversarial_training", "method_means"}
    assert corr["no_adversarial_training"]["lambda_max"]["n"] == 9  # pgd-at excluded
    assert corr["method_means"]["lambda_max"]["n"] == 4
    assert set(corr["all_runs"]) == set(SHARPNESS_MEASURES)


def test_gradient_masking_is_flagged_and_nan_becomes_null(tmp_path):
    runs = _runs()
    for r in runs:
        if r["method"] == "dropout":
            r["fgsm_acc"] = r["pgd_acc"] - 0.2  # FGSM stronger than PGD: masking
        if r["method"] == "pgd-at":
            r["robust_acc"] = r["pgd_acc"] - 0.3  # the margin loss breaks what PGD on CE could not
        if r["method"] == "sgd" and r["seed"] == 0:
            r["trace"] = float("nan")
        if r["method"] == "sam":
            r["lambda_max"] = 1e-16  # a saturated softmax: curvature vanishes
    report = build_report(runs, SETTINGS)
    masked = [s for s in report["findings"]["not_supported"] if "gradient masking" in s]
    assert len(masked) == 2
    assert "dropout's PGD-20 accuracy" in masked[0] and "brings its accuracy lower (0.049)" in masked[0]
    assert "pgd-at's PGD-20 accuracy" in masked[1] and "down to 0.499" in masked[1]
    assert any(s.startswith("sam's near-zero curvature") for s in report["findings"]["not_supported"])
    assert not any(s.startswith("sgd's near-zero curvature") for s in report["findings"]["not_supported"])
    assert report["runs"][0]["trace"] is None and report["summary"]["sgd"]["trace"]["n"] == 2
    json_path, _ = write_report(report, tmp_path)  # allow_nan=False would raise on a NaN
    assert json.loads(json_path.read_text())["runs"][0]["trace"] is None


def _labels(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def test_figures_have_labelled_axes_and_png_files_open(tmp_path):
    from matplotlib.image import imread

    runs = _runs()
    fig = plots.sharpness_vs_robustness_figure(runs, SHARPNESS_MEASURES)
    assert len(fig.axes) == len(SHARPNESS_MEASURES)
    assert all(x and y == "worst-case robust accuracy" for x, y in _labels(fig))
    assert fig.axes[0].get_xlabel() == "top Hessian eigenvalue λ_max"
    assert len(fig.axes[0].collections) == 4  # one scatter per method

    hist_records = {m: [{"step": s, "metric": "sharpness/lambda_max", "value": float(s)} for s in (10, 20)]
                    + [{"step": s, "metric": "robustness/pgd_acc", "value": 0.5} for s in (10, 20)]
                    for m in ("sgd", "sam")}
    curves = plots.training_curves_figure(hist_records)
    assert _labels(curves) == [("training step", "top Hessian eigenvalue λ_max"), ("training step", "PGD accuracy")]
    assert list(curves.axes[0].lines[0].get_ydata()) == [10.0, 20.0]

    slices = plots.loss_slices_figure({"sgd": ([-1, 0, 1], [2.0, 0.1, 2.0]), "sam": ([-1, 0, 1], [1.0, 0.1, 1.0])})
    assert [ax.get_title() for ax in slices.axes] == ["sgd", "sam"]
    assert all(x.startswith("α") and y == "training loss" for x, y in _labels(slices))

    for name, f in (("a", fig), ("b", curves), ("c", slices)):
        img = imread(plots.save(f, tmp_path / f"{name}.png"))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # not a blank canvas


def _write_history(path, n=8):
    with path.open("w") as fh:
        for i in range(n):
            step = 10 * (i + 1)
            fh.write(json.dumps({"step": step, "metric": "sharpness/lambda_max", "value": 1.0 + i,
                                 "settings": {"k": 1}}) + "\n")
            fh.write(json.dumps({"step": step, "metric": "robustness/pgd_acc", "value": 0.9 - 0.1 * i,
                                 "settings": {}}) + "\n")
            fh.write(json.dumps({"step": step, "metric": "monitor/overhead_pct", "value": 2.0, "settings": {}}) + "\n")
        fh.write("\n")


def test_history_summary_known_trends(tmp_path):
    path = tmp_path / "h.jsonl"
    _write_history(path)
    summary = hist.summarize_history(hist.read_history(path))
    lam = summary["metrics"]["sharpness/lambda_max"]
    assert (lam["n"], lam["first"], lam["last"], lam["min"], lam["max"]) == (8, 1.0, 8.0, 1.0, 8.0)
    assert lam["mean"] == pytest.approx(4.5)
    assert lam["trend"]["tau"] == pytest.approx(1.0)
    assert summary["metrics"]["robustness/pgd_acc"]["trend"]["tau"] == pytest.approx(-1.0)
    assert summary["metrics"]["monitor/overhead_pct"]["trend"]["tau"] is None  # constant
    assert summary["lambda_max_vs_pgd_acc"]["tau"] == pytest.approx(-1.0)

    out = hist.report_history(path, tmp_path / "out")
    md = out["markdown"].read_text()
    assert "sharpness/lambda_max rose over training" in md and "robustness/pgd_acc fell" in md
    fig = plots.history_figure(hist.read_history(path))
    # the constant monitor/overhead_pct gets no panel; the title names it with its value
    assert sorted(ax.get_title() for ax in fig.axes) == ["robustness/pgd_acc", "sharpness/lambda_max"]
    assert "monitor/overhead_pct = 2" in fig.get_suptitle()
    assert all(x == "training step" and y for x, y in _labels(fig))


@pytest.mark.parametrize("content, match", [
    ("not json\n", "is not valid JSON"),
    ('{"step": 1, "value": 2.0}\n', "needs 'step', 'metric' and 'value'"),
    ('{"step": 1, "metric": "a", "value": "x"}\n', "must be a number"),
    ("\n\n", "holds no records"),
])
def test_history_bad_input_names_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=match):
        hist.read_history(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        hist.read_history(tmp_path / "missing.jsonl")


def test_history_resumed_run_counts_a_step_once(tmp_path):
    path = tmp_path / "h.jsonl"
    lines = [{"step": 20, "metric": "m", "value": 2.0}, {"step": 10, "metric": "m", "value": 1.0},
             {"step": 20, "metric": "m", "value": 3.0}]  # step 20 measured again after a resume
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = hist.read_history(path)
    assert [(r["step"], r["value"]) for r in records] == [(10, 1.0), (20, 3.0)]
    with pytest.raises(ConfigurationError, match="'step' must be an integer"):
        path.write_text('{"step": "ten", "metric": "m", "value": 1.0}\n')
        hist.read_history(path)


def test_a_finding_is_supported_only_after_holm_correction():
    from scipy import stats

    from sharpguard.study.runner import headline

    runs = _runs()
    sam_lam = {0: 9.2, 1: 9.75, 2: 9.5}
    for r in runs:
        if r["method"] == "sam":
            r["lambda_max"] = sam_lam[r["seed"]]
    report = build_report(runs, SETTINGS)
    hyp = next(h for h in report["findings"]["hypotheses"] if h["claim"] == "sam lambda_max below sgd")
    raw = stats.ttest_ind([9.2, 9.75, 9.5], [10.0, 10.1, 10.2], equal_var=False).pvalue
    assert hyp["comparison"]["p_value"] == pytest.approx(raw) and raw < 0.05
    family = report["findings"]["multiple_comparisons"]
    ps = [t["p_value"] for t in family["tests"] if t["p_value"] is not None]
    assert family["n_tests"] == len(ps) > 10
    # Holm by hand: the adjusted p of this test is at least (m - rank) * p over the smaller ones
    rank = sorted(ps).index(hyp["comparison"]["p_value"])
    assert hyp["comparison"]["p_adjusted"] >= min(1.0, (len(ps) - rank) * raw) - 1e-12
    assert hyp["comparison"]["p_adjusted"] >= 0.05 and hyp["verdict"] == "direction only"
    assert not any(s.startswith("sam's lambda_max") for s in report["findings"]["supported"])
    assert hyp["comparison"]["hedges_g"] < 0  # effect size beside the p-value
    # every correlation carries its adjusted p too, and the console summary lists every supported finding
    assert all("p_adjusted" in c for view in report["correlations"].values() for c in view.values())
    lines = headline(report)
    supported = report["findings"]["supported"]
    assert supported and all(f"- {s}" in lines for s in supported)
    assert "Holm-adjusted" in render_markdown(report)


def test_scatter_grid_annotates_outliers_draws_tau_and_keeps_the_legend_outside():
    from scipy import stats

    runs = _runs()
    runs[3]["lambda_max"] = 1e-16  # a saturated softmax: would squash the log axis
    fig = plots.sharpness_vs_robustness_figure(runs, SHARPNESS_MEASURES)
    ax = fig.axes[0]
    assert "1 outlier annotated" in ax.get_title()
    assert any("sam: 1e-16" in t.get_text() for t in ax.texts)
    lo, _ = ax.get_xlim()
    assert lo > 1e-3  # the outlier did not set the scale
    # tau over every point (ranks: the outlier does not distort it), as the report computes it
    tau = stats.kendalltau([r["lambda_max"] for r in runs], [r["robust_acc"] for r in runs]).statistic
    assert f"τ = {tau:.2f}" in ax.get_title() and "n = 12" in ax.get_title()
    assert len(ax.lines) == 1 and ax.lines[0].get_linestyle() == "--"  # the Theil-Sen trend line
    assert all(a.get_legend() is None for a in fig.axes) and len(fig.legends) == 1
    rows = {round(a.get_position().y0, 3) for a in fig.axes}
    assert len(rows) == 2  # seven panels on a grid of two rows, not one strip


def test_training_curves_show_the_spread_across_seeds():
    recs = {"sgd": [{"step": s, "metric": "sharpness/lambda_max", "value": float(s + seed)}
                    for seed in (0, 2) for s in (10, 20)]}
    fig = plots.training_curves_figure(recs, metrics=("sharpness/lambda_max",))
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == [11.0, 21.0]  # the mean over the two seeds
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(10.0) and band[:, 1].max() == pytest.approx(22.0)  # min-max band


def test_report_merges_several_histories(tmp_path, capsys):
    from sharpguard.cli import main

    a, b = tmp_path / "a" / "run.jsonl", tmp_path / "b" / "run.jsonl"
    for i, path in enumerate((a, b)):
        path.parent.mkdir()
        _write_history(path, n=4 + i)
    out = hist.report_history([a, b], tmp_path / "merged")
    summary = json.loads(out["json"].read_text())
    assert set(summary["histories"]) == {"a/run", "b/run"}
    assert summary["histories"]["b/run"]["metrics"]["sharpness/lambda_max"]["n"] == 5
    assert summary["constant_metrics"] == {"monitor/overhead_pct": 2.0}
    md = out["markdown"].read_text()
    assert "## sharpguard monitor history: a/run" in md and "## sharpguard monitor history: b/run" in md
    fig = plots.history_figure({"a": hist.read_history(a), "b": hist.read_history(b)})
    assert len(fig.axes) == 2 and all(len(ax.lines) == 2 for ax in fig.axes) and len(fig.legends) == 1
    assert main(["report", str(a), str(b)]) == 0
    assert (tmp_path / "a" / "merged-report" / "history.png").exists()
    assert main(["report", str(a), str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
