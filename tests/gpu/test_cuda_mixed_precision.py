"""The GPU check's correctness part (tests/helpers/mixed_precision.py): a few SAM steps through every adapter
(plain ``sharpguard.SAM``, the Lightning callback, ``SharpGuardTrainer``, the Accelerate helper) in fp32
twice, fp16 and bf16, then an fp16 overflow forced into each.

A second fp32 run is bitwise the first (true fp32, deterministic kernels); a half-precision run really ran
(its update differs from fp32, a silent fp32 fallback would give exactly 0) and stays close (a gradient left
scaled, or unscaled twice, would be off by orders of magnitude); a forced overflow is skipped by the
GradScaler with the weights bitwise unchanged.

On CUDA at the GPU check's full sizes (GPT-2 small, ResNet-18), skipped only without CUDA (CI has no GPU;
``bash benchmarks/gpu_check.sh`` runs these on a GPU machine); on CPU at its tiny sizes, so that CI keeps
every code path working meanwhile.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import mixed_precision

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ADAPTERS = ("sharpguard.SAM", "Lightning callback", "HF SharpGuardTrainer", "Accelerate SAM")
DEVICES = [
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    pytest.param("cpu", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=DEVICES)
def results(request) -> dict:
    """The adapter runs, once per device for the module: full sizes on CUDA, tiny on CPU."""
    from benchmarks import gpu_check

    ctx = gpu_check.Ctx(cpu=request.param == "cpu", davda54=None)
    out: dict = {"device": request.param}
    mixed_precision.run_adapters(ctx, out)
    out["failures"] = mixed_precision.failures(out)
    out["notes"] = ctx.notes
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
    if results["device"] == "cpu":
        lightning = {r["precision"]: r for r in rows if r["adapter"] == "Lightning callback"}
        assert "bf16" in lightning["fp16 (16-mixed as requested)"]["ran_as"]
        assert any("16-mixed" in note and "bf16" in note for note in results["notes"])


def test_forced_overflow_is_skipped_by_every_adapter(results):
    rows = results["overflow"]
    assert {r["adapter"] for r in rows} == set(ADAPTERS)
    for row in rows:
        assert row["step_skipped"] and row["weights_finite"] and row["weights_unchanged"], row
        assert row["scale_after"] < row["scale_before"], row


def test_the_comparison_and_the_verdict_can_fail():
    """The helpers the checks rely on are not vacuous: a changed weight is seen, and failures are listed."""
    start = {"w": torch.zeros(3), "b": torch.zeros(2)}
    ref = {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.25, 0.0])}
    assert mixed_precision.rel_diffs(ref, ref, start) == (0.0, 0.0)
    moved = {"w": ref["w"].clone(), "b": ref["b"].clone()}
    moved["w"][1] = torch.nextafter(moved["w"][1], torch.tensor(0.0))  # one ulp
    worst, update = mixed_precision.rel_diffs(moved, ref, start)
    assert worst > 0 and update > 0
    assert mixed_precision.skipped_steps(65536.0, 16384.0) == 2 and mixed_precision.skipped_steps(1024.0, 1024.0) == 0

    results = {
        "adapters": [{"adapter": "x", "model": "m", "precision": "fp32 (repeat)", "max_rel_weight_diff": 1e-7,
                      "rel_update_diff": 0.0, "finite": True}],
        "overflow": [{"adapter": "x", "model": "m", "step_skipped": False, "weights_finite": True,
                      "weights_unchanged": False}],
    }
    fails = mixed_precision.failures(results)
    assert any("second fp32 run differs" in f for f in fails)
    assert any("not skipped" in f for f in fails)
