"""The ``sharpguard`` command end to end: a --quick study through the Lightning integration, the report
subcommand on a synthetic history, the dataset entry point and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sharpguard.cli import main
from sharpguard.study.config import METHODS
from sharpguard.study.report import METRICS, SHARPNESS_MEASURES

import pytorch_lightning  # noqa: F401

PNGS = ("sharpness_vs_robustness.png", "training_curves.png", "loss_slices.png")


def _open_png(path: Path):
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img[..., :3].std() > 0.01
    return img


def test_quick_study_writes_every_file_with_the_schema(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean lambda_max: sgd" in printed
    # a --quick run is a smoke test: its models are too weak for verdicts, and the console says so first
    assert printed.splitlines()[1].strip().startswith("Smoke test (--quick")
    assert "(supported)" not in printed and "(direction only)" not in printed and "smoke test" in printed

    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"runs", "correlations", "settings", "summary", "findings"}
    methods = {r["method"] for r in report["runs"]}
    assert methods == set(METHODS) | {"ensemble"}
    for run in report["runs"]:
        assert {"method", "seed"} <= run.keys()
        assert all(key in run for key, _, _ in METRICS)
        assert run["clean_acc"] is not None and 0.0 <= run["clean_acc"] <= 1.0
        assert run["lambda_max"] is not None
    assert sorted(r["seed"] for r in report["runs"] if r["method"] == "sam") == [0, 1]
    assert [r["members"] for r in report["runs"] if r["method"] == "ensemble"] == [[0, 1]]
    assert set(report["correlations"]) == {"all_runs", "no_adversarial_training", "method_means"}
    assert set(report["correlations"]["all_runs"]) == set(SHARPNESS_MEASURES)
    settings = report["settings"]
    assert settings["eps"] == 0.1 and "gray levels" in settings["eps_rationale"] and settings["quick"] is True

    md = (out / "report.md").read_text()
    assert md.startswith("# sharpguard study (smoke test: --quick, no verdicts)") and "| sgd | 2 |" in md
    assert "## What the data support" not in md
    assert {h["verdict"] for h in report["findings"]["hypotheses"]} == {"smoke test"}
    for png in PNGS:
        _open_png(out / png)
    # the monitors were attached to every Lightning run and wrote their history
    histories = sorted((out / "histories").glob("*.jsonl"))
    assert len(histories) == 2 * len(METHODS)
    metrics = {json.loads(line)["metric"] for line in (out / "histories" / "sam-seed0.jsonl").read_text().splitlines()}
    assert {"sharpness/lambda_max", "robustness/pgd_acc"} <= metrics


def test_user_dataset_entry_point_and_method_selection(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(textwrap.dedent("""
        import torch

        def load():
            g = torch.Generator().manual_seed(0)
            x = torch.rand(96, 5, generator=g)
            y = (x[:, 0] > 0.5).long()
            return x[:64], y[:64], x[64:], y[64:]

        def bad():
            x = torch.rand(8, 5) * 3
            return x, torch.zeros(8, dtype=torch.long), x, torch.zeros(8, dtype=torch.long)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    assert main(["study", "--quick", "--no-progress", "--dataset", "my_data:load", "--methods", "sgd,sam",
                 "--seeds", "2", "--no-ensemble", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {r["method"] for r in report["runs"]} == {"sgd", "sam"}
    assert report["settings"]["dataset"]["input_shape"] == [5]
    assert report["settings"]["dataset"]["n_classes"] == 2


def test_study_bad_input_is_one_clear_line(tmp_path, capsys, monkeypatch):
    assert main(["study", "--methods", "sgd,adamw", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) adamw" in capsys.readouterr().err
    assert main(["study", "--dataset", "nowhere_module:load", "--quick", "--out", str(tmp_path)]) == 2
    assert "cannot import module 'nowhere_module'" in capsys.readouterr().err
    (tmp_path / "bad_data.py").write_text("import torch\ndef load():\n    x = torch.rand(8, 3) * 3\n"
                                          "    y = torch.zeros(8, dtype=torch.long)\n    return x, y, x, y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["study", "--dataset", "bad_data:load", "--quick", "--out", str(tmp_path / "o")]) == 2
    assert "must be finite and lie in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o" / "report.json").exists()


def test_report_subcommand_on_a_synthetic_history(tmp_path, capsys):
    history = tmp_path / "run.jsonl"
    with history.open("w") as fh:
        for i in range(6):
            fh.write(json.dumps({"step": 50 * (i + 1), "metric": "sharpness/lambda_max", "value": 10.0 - i,
                                 "settings": {}}) + "\n")
            fh.write(json.dumps({"step": 50 * (i + 1), "metric": "robustness/pgd_acc", "value": 0.1 * i,
                                 "settings": {}}) + "\n")
    assert main(["report", str(history)]) == 0
    out = tmp_path / "run-report"
    assert "history.png" in capsys.readouterr().out
    _open_png(out / "history.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["sharpness/lambda_max"]["trend"]["tau"] == pytest.approx(-1.0)
    assert summary["lambda_max_vs_pgd_acc"]["tau"] == pytest.approx(-1.0)
    assert "sharpness/lambda_max fell over training" in (out / "summary.md").read_text()

    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_and_console_script_help():
    done = subprocess.run([sys.executable, "-m", "sharpguard", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "study" in done.stdout and "report" in done.stdout
    script = Path(sys.executable).with_name("sharpguard")
    if script.exists():
        done = subprocess.run([str(script), "study", "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--quick" in done.stdout and "--dataset" in done.stdout


def test_study_out_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert main(["study", "--methods", "sgd", "--quick", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "Traceback" not in err
    assert target.read_text() == "not a folder"


def test_help_gives_each_scenarios_default_epochs(capsys):
    from sharpguard.study.scenarios import DEFAULT_EPOCHS, ScenarioSettings, _epochs

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, (full, quick) in DEFAULT_EPOCHS.items():
        assert f"{name} {full} ({quick} with --quick)" in text
        assert _epochs(ScenarioSettings(), name) == full and _epochs(ScenarioSettings(quick=True), name) == quick
    assert DEFAULT_EPOCHS["robust_overfitting"][0] == 60  # the scenario the old help text called 30
