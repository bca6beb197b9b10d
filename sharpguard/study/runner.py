"""``sharpguard study``: train, measure, report.

The flow, one (method, seed) at a time: build the model and callbacks for the method
(:mod:`.train`, through sharpguard's Lightning integration, with a SharpnessMonitor and a
RobustnessMonitor writing a JSON-lines history), fit, then measure the final model (:mod:`.measure`).
After all runs: the ensemble of the sgd models, one 1D loss slice per method, the plots and the report.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import atomic_write_text
from ..errors import require
from .config import ENSEMBLE, StudyConfig
from .data import load_dataset
from .history import read_history
from .measure import SLICE_DIRECTION_SEED, loss_slice, measure_model, probe_batches
from .models import LogitEnsemble
from .report import ROBUST_METRIC, SHARPNESS_MEASURES, build_report, write_report


@dataclass
class StudyResult:
    """What a study produced: the report (as written to report.json), the files and a few headline lines."""

    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    headline: list[str] = field(default_factory=list)


def _mean(runs, method: str, metric: str) -> float | None:
    vals = [r[metric] for r in runs if r["method"] == method and r.get(metric) is not None]
    return sum(vals) / len(vals) if vals else None


def headline(report: Mapping[str, Any]) -> list[str]:
    """The answer in one sentence, then the numbers a reader looks at first, with the report's own verdicts
    (a ``--quick`` run gives none: it is a smoke test)."""
    runs = report["runs"]
    lines = [report["findings"]["answer"]] if report["findings"].get("answer") else []
    for method, base, metric in (("sam", "sgd", "lambda_max"), ("pgd-at", "sgd", "pgd_acc")):
        a, b = _mean(runs, method, metric), _mean(runs, base, metric)
        if a is None or b is None:
            continue
        verdict = next((h["verdict"] for h in report["findings"]["hypotheses"]
                        if h["comparison"]["a"] == method and h["comparison"]["metric"] == metric), "n/a")
        lines.append(f"mean {metric}: {base} {b:.4g}, {method} {a:.4g} ({verdict})")
    for measure in SHARPNESS_MEASURES:
        c = report["correlations"]["all_runs"].get(measure, {})
        if c.get("tau") is not None:
            adjusted = f", Holm-adjusted p = {c['p_adjusted']:.3g}" if c.get("p_adjusted") is not None else ""
            lines.append(f"Kendall tau({measure}, {c['against']}) = {c['tau']:.2f} (p = {c['p_value']:.3g}{adjusted}, "
                         f"n = {c['n']})")
    return lines + supported_lines(report)


def supported_lines(report: Mapping[str, Any]) -> list[str]:
    """Every finding the report calls supported (after its multiple-comparison correction), for the console."""
    f = report["findings"]
    if f.get("smoke_test"):
        return ["smoke test (--quick): no finding is called supported; run without --quick for verdicts"]
    family = f.get("multiple_comparisons") or {}
    supported = list(f["supported"])
    head = (f"supported after {family.get('method', 'the')} correction over {family.get('n_tests', '?')} tests "
            f"({len(supported)}):")
    return [head] + [f"- {s}" for s in supported] if supported else [head + " none"]


def _settings(config: StudyConfig, data_info: dict, model_name: str) -> dict[str, Any]:
    import sharpguard

    s = config.as_settings()
    s.update(
        dataset=data_info,
        model=model_name,
        measured_on={"accuracies": "the whole test set",
                     "sharpness": f"the training loss (cross entropy, eval mode) on the first {config.probe_size} "
                                  "training examples"},
        versions={"sharpguard": sharpguard.__version__, "torch": torch.__version__,
                  "python": platform.python_version()},
        machine={"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    )
    return s


def run_study(config: StudyConfig, out_dir: str | Path, progress: bool = True) -> StudyResult:
    """Run the whole study and write ``report.json``, ``report.md`` and the PNG plots into ``out_dir``.

    Runs with ``config.threads`` intra-op threads and restores the caller's setting afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, out_dir, progress)
    finally:
        torch.set_num_threads(previous)


def _run(config: StudyConfig, out_dir: str | Path, progress: bool) -> StudyResult:
    tqdm = require("tqdm", "study").tqdm
    from . import plots
    from .train import describe_model, train_run  # imports Lightning

    data = load_dataset(config.dataset)  # bad data fails here, before anything is written
    if config.subset is not None:
        data = data.subset(*config.subset)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hist_dir = out / "histories"
    hist_dir.mkdir(exist_ok=True)
    probe = probe_batches(data.x_train, data.y_train, config.probe_size)
    test = [(data.x_test, data.y_test)]

    jobs = [(m, s) for m in config.methods for s in range(config.seeds)]
    want_ensemble = config.ensemble and "sgd" in config.methods
    runs: list[dict[str, Any]] = []
    first_model: dict[str, torch.nn.Module] = {}
    first_seed: dict[str, int] = {}
    sgd_models: list[tuple[int, torch.nn.Module, float]] = []
    histories: dict[str, list[dict]] = {}
    total = 2 * len(jobs) + (1 if want_ensemble else 0) + 1
    with tqdm(total=total, desc="sharpguard study", unit="task", disable=not progress, dynamic_ncols=True) as bar:
        for method, seed in jobs:
            bar.set_postfix_str(f"train {method} seed {seed}")
            history_path = hist_dir / f"{method}-seed{seed}.jsonl"
            history_path.unlink(missing_ok=True)  # a rerun into the same folder starts a fresh history
            trained = train_run(method, seed, data, config, history_path)
            bar.update()
            bar.set_postfix_str(f"measure {method} seed {seed}")
            metrics = measure_model(trained.model, test, probe, config, seed=seed)
            runs.append({"method": method, "seed": seed, **metrics, "train_time_s": trained.seconds,
                         "steps": trained.steps, "monitor_overhead_pct": trained.monitor_overhead_pct})
            if history_path.exists():
                histories.setdefault(method, []).extend(read_history(history_path))
            first_model.setdefault(method, trained.model)
            first_seed.setdefault(method, seed)
            if method == "sgd":
                sgd_models.append((seed, trained.model, trained.seconds))
            bar.update()
        if want_ensemble:
            bar.set_postfix_str("measure ensemble")
            ensemble = LogitEnsemble([m for _, m, _ in sgd_models]).eval()
            metrics = measure_model(ensemble, test, probe, config, seed=0)
            runs.append({"method": ENSEMBLE, "seed": None, "members": [s for s, _, _ in sgd_models], **metrics,
                         "train_time_s": sum(t for _, _, t in sgd_models), "steps": None, "monitor_overhead_pct": None})
            first_model[ENSEMBLE] = ensemble
            bar.update()
        bar.set_postfix_str("loss slices and plots")
        slices = {name: loss_slice(model, probe) for name, model in first_model.items()}
        bar.update()

    files: list[Path] = []
    figures = {
        "sharpness_vs_robustness.png": plots.sharpness_vs_robustness_figure(runs, SHARPNESS_MEASURES,
                                                                            robust=ROBUST_METRIC),
        "training_curves.png": plots.training_curves_figure(histories),
        "loss_slices.png": plots.loss_slices_figure(
            slices, labels={name: (f"sgd seeds {', '.join(str(s) for s, _, _ in sgd_models)} averaged"
                                   if name == ENSEMBLE else f"seed {first_seed[name]}") for name in slices},
            direction_seed=SLICE_DIRECTION_SEED),
    }
    for name, fig in figures.items():
        files.append(plots.save(fig, out / name))
    atomic_write_text(out / "loss_slices.json", json.dumps(
        {name: {"alphas": a, "losses": [x if math.isfinite(x) else None for x in v]} for name,
         (a, v) in slices.items()},
        allow_nan=False))
    settings = _settings(config, data.describe(), describe_model(data, config))
    report = build_report(runs, settings)
    json_path, md_path = write_report(report, out, plots=[f.name for f in files])
    return StudyResult(report=report, files=[json_path, md_path, *files], headline=headline(report))
