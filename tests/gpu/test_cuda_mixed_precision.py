"""The GPU check's correctness part on a CUDA device, at its full sizes (GPT-2 small, ResNet-18): a few SAM
steps through every adapter (plain ``sharpguard.SAM``, the Lightning callback, ``SharpGuardTrainer``, the
Accelerate helper) in fp32 twice, fp16 and bf16, then an fp16 overflow forced into each.

A second fp32 run is bitwise the first (true fp32, deterministic kernels); a half-precision run really ran
(its update differs from fp32, a silent fp32 fallback would give exactly 0) and stays close (a gradient left
scaled, or unscaled twice, would be off by orders of magnitude); a forced overflow is skipped by the
GradScaler with the weights bitwise unchanged. The runs are those of ``benchmarks/gpu_check.py`` (which
reports their memory and times); ``tests/gpu/test_gpu_check.py`` runs the same code at tiny sizes on CPU.

Skipped without CUDA only: CI has no GPU. ``bash benchmarks/gpu_check.sh`` runs these tests on a GPU machine.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU check's correctness part)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ADAPTERS = ("sharpguard.SAM", "Lightning callback", "HF SharpGuardTrainer", "Accelerate SAM")


@pytest.fixture(scope="module")
def results() -> dict:
    """The adapters part of the GPU check, run once for the module on the current CUDA device."""
    from benchmarks import gpu_check

    ctx = gpu_check.Ctx(cpu=False, davda54=None)
    out: dict = {}
    gpu_check.part_adapters(ctx, out)
    out["failures"] = gpu_check.failures(out)
    return out


def test_every_run_finished_and_every_number_is_finite(results):
    assert results["failures"] == []
    for part in ("adapters", "overflow"):
        assert results[part], part
        for row in results[part]:
            assert "error" not in row, row
            assert row["peak_mib"] > 0, row
            for key, value in row.items():
                if isinstance(value, float):
                    assert math.isfinite(value), (key, row)


def test_fp32_repeats_are_exact_and_mixed_precision_really_ran(results):
    rows = results["adapters"]
    for adapter in ADAPTERS:
        mine = [r for r in rows if r["adapter"] == adapter]
        assert mine, adapter
        for model in {r["model"] for r in mine}:
            by = {r["precision"]: r for r in mine if r["model"] == model}
            assert {"fp32", "fp32 (repeat)", "fp16", "bf16"} <= set(by), (adapter, model, sorted(by))
            for key in ("max_rel_weight_diff", "rel_update_diff"):
                # bitwise the same run: exactly 0, so the comparison can tell when it is not
                assert by["fp32 (repeat)"][key] == 0.0, (adapter, model, key)
            for precision in ("fp16", "bf16"):
                row = by[precision]
                assert row["finite"], row
                # not 0: the half-precision path really ran (a silent fp32 fallback would give exactly 0)
                assert row["rel_update_diff"] > 0.0, row
                if model == "GPT-2":
                    # a gradient left scaled (65536x) or unscaled twice would be off by orders of magnitude
                    assert row["rel_update_diff"] < 0.1, row
            assert by["fp16"]["scale_before"] > 0, by["fp16"]


def test_forced_overflow_is_skipped_by_every_adapter(results):
    rows = results["overflow"]
    assert {r["adapter"] for r in rows} == set(ADAPTERS)
    for row in rows:
        assert row["step_skipped"] and row["weights_finite"] and row["weights_unchanged"], row
        assert row["scale_after"] < row["scale_before"], row
