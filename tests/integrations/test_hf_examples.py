"""Smoke tests: the Hugging Face and Accelerate examples run end to end on CPU (--quick)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import transformers  # noqa: F401
import accelerate  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_hf_text_classification_example_quick():
    out = _run("examples/hf_text_classification.py", "--quick", "--adversarial", "smart")
    assert "eval accuracy" in out
    assert sum(line.startswith("step ") for line in out.splitlines()) == 3  # every 2 of 6 steps


def test_accelerate_loop_example_quick():
    out = _run("examples/accelerate_loop.py", "--quick", "--variant", "gsam")
    assert "optimizer steps 4" in out  # 8 micro-batches, accumulation of 2
