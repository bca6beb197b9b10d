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

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "plain_sam_digits.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout.lower()
    assert "sgd" in text and "sam" in text
