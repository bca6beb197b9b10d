"""Smoke test of examples/lightning_digits.py (a short run of the real script)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import pytorch_lightning  # noqa: F401

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_digits.py"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_digits_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("lightning_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(["--max-epochs", "1", "--out", str(tmp_path)])
    assert 0.0 <= metrics["robustness/pgd_acc"] <= metrics["robustness/clean_acc"] <= 1.0
    assert metrics["sharpness/lambda_max"] > 0 and metrics["monitor/first_check_s"] > 0
    assert metrics["monitor/overhead_pct"] >= 0  # the steady state after the first check
    assert (tmp_path / "sharpness.jsonl").read_text().strip()
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
