"""Shared test fixtures. Every test runs on CPU with one intra-op thread (set by scripts/test.sh)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases on every run (CI included): a failure is a failure of the code,
# reproducible here, not of the draw. The case counts are those each test sets (docs/reliability.md).
settings.register_profile("sharpguard", derandomize=True, print_blob=True)
settings.load_profile("sharpguard")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _transformers_verbosity():
    """Every test starts at transformers' default verbosity (warnings shown): a module that quiets
    transformers (set_verbosity_error) must not hide the warnings sharpguard's HF front end sends there
    from the tests that run after it."""
    import sys

    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.set_verbosity_warning()
    yield


@pytest.fixture
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (AcceleratorState, GradientState); give a test its own.
    Modules that build Accelerators in every test use it through ``pytestmark``."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

