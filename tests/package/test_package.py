"""The public surface: every top-level name resolves, and importing sharpguard imports no framework."""

import subprocess
import sys

import sharpguard as sg


def test_every_export_resolves():
    for name in sg.__all__:
        assert getattr(sg, name) is not None, name


def test_core_import_pulls_in_no_training_framework():
    code = (
        "import sys, sharpguard as sg, sharpguard.optim, sharpguard.sharpness, sharpguard.attacks, "
        "sharpguard.adversarial, sharpguard.monitor; "
        "bad = [m for m in ('pytorch_lightning', 'lightning', 'transformers', 'accelerate') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_plain_sam_example_runs(tmp_path):
    """The plain-PyTorch example (README) trains SGD and SAM and prints both results."""
    import pathlib

    script = pathlib.Path(__file__).resolve().parents[2] / "examples" / "plain_sam_digits.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("SGD (momentum", "SAM(SGD)"))]
    assert len(rows) == 2, out.stdout
    results = {}
    for row in rows:
        *_, train_loss, train_acc, test_loss, test_acc, seconds = row.split()
        results[row[:3]] = [float(v) for v in (train_loss, train_acc, test_loss, test_acc, seconds)]
    for name, (train_loss, train_acc, test_loss, test_acc, seconds) in results.items():
        # an MLP on the digits reaches > 90% test accuracy in 30 epochs with either optimizer
        assert 0 < train_loss < 1 and 0.9 < train_acc <= 1 and 0 < test_loss < 1 and 0.9 < test_acc <= 1, name
    assert results["SGD"][:4] != results["SAM"][:4]  # two different trainings, not one printed twice
