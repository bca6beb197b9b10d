"""The GPU check's CPU dry run (benchmarks/gpu_check.py --cpu): every part runs at tiny sizes, every
number is finite, the forced overflows are skipped, fp32 repeats are exact, and RESULTS.md is untouched.

The script exists for a GPU that CI does not have; this test keeps its code paths working meanwhile."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

ADAPTERS = ("sharpguard.SAM", "Lightning callback", "HF SharpGuardTrainer", "Accelerate SAM")
HEADINGS = (
    "## GPU check (CPU dry run)",
    "### Mixed precision through each adapter",
    "### Forced overflow (fp16)",
    "### Step time: SAM against two plain steps and against peers",
    "### Hessian eigenvalue and PGD",
    "### Monitor budget",
    "### Verdict",
)


def _numbers(value, path="$"):
    """Every int/float in a JSON document, with where it is."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    md, js = out / "gpu_check.md", out / "gpu_check.json"
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(md), "--json", str(js)],
        cwd=out, env=env, capture_output=True, text=True, timeout=400,
    )
    after = RESULTS.read_bytes() if RESULTS.exists() else None
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"md": md.read_text(), "json": json.loads(js.read_text()), "results_unchanged": before == after,
            "stdout": done.stdout}


pytestmark = pytest.mark.slow


def test_every_section_is_there_complete_and_without_errors(dry_run):
    md, data = dry_run["md"], dry_run["json"]
    for heading in HEADINGS:
        assert heading in md, heading
    assert "**error**" not in md and "incomplete" not in md
    assert data["mode"] == "cpu" and data["pending"] == [] and data["failures"] == []
    assert set(data["done"]) >= {"adapters", "overflow", "step_time", "checks", "monitor"}
    assert dry_run["results_unchanged"], "a dry run with --out must not touch benchmarks/RESULTS.md"
    assert "### Verdict" in dry_run["stdout"]  # the section is printed too


def test_every_number_is_finite(dry_run):
    numbers = list(_numbers(dry_run["json"]))
    assert len(numbers) > 100
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad[:10]
    for part in ("adapters", "overflow", "checks", "monitor"):
        for row in dry_run["json"][part]:
            assert "error" not in row, row
            assert row["peak_mib"] > 0, row


def test_fp32_repeats_are_exact_and_mixed_precision_really_ran(dry_run):
    rows = dry_run["json"]["adapters"]
    for adapter in ADAPTERS:
        mine = [r for r in rows if r["adapter"] == adapter]
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
    lightning = {r["precision"]: r for r in rows if r["adapter"] == "Lightning callback"}
    assert "bf16" in lightning["fp16 (16-mixed as requested)"]["ran_as"]
    assert any("16-mixed" in note and "bf16" in note for note in dry_run["json"]["notes"])


def test_forced_overflow_is_skipped_by_every_adapter(dry_run):
    rows = dry_run["json"]["overflow"]
    assert {r["adapter"] for r in rows} == set(ADAPTERS)
    for row in rows:
        assert row["step_skipped"] and row["weights_finite"] and row["weights_unchanged"], row
        assert row["scale_after"] < row["scale_before"], row


def test_timing_checks_and_monitor_rows(dry_run):
    data = dry_run["json"]
    timing = data["step_time"]
    for model in ("ResNet-18", "GPT-2"):
        got = {r["contestant"]: r for r in timing if r["model"] == model}
        for name in ("plain step", "two plain steps", "sharpguard SAM", "pytorch_optimizer SAM"):
            assert got[name]["ms"] > 0 and got[name]["peak_mib"] > 0, got[name]
        for peer in ("composer SAM", "davda54/sam SAM"):  # measured, or said to be missing; never a failure
            assert peer in got and ("ms" in got[peer] or got[peer]["status"].startswith("not installed")), got.get(peer)
    checks = data["checks"]
    assert {(r["model"], r["check"].split(" ")[0]) for r in checks} == {
        (m, c) for m in ("ResNet-18", "GPT-2") for c in ("hessian_eigenvalues", "pgd")}
    for row in checks:
        if row["check"].startswith("hessian"):
            assert row["n_hvp"] > 0
        else:
            assert row["within_eps"] and row["adv_loss"] >= row["clean_loss"] - 1e-6, row
    monitor = {r["configuration"]: r for r in data["monitor"]}
    default = monitor["SharpnessMonitor() (defaults: adaptive, budget 5%)"]
    assert default["budget_pct"] == 5.0 and default["steps"] > 0 and default["within_budget"] in (True, False)
    fixed = next(r for name, r in monitor.items() if "every_n_steps" in name)
    assert fixed["n_checks"] == 2 and fixed["stopped"] == "next check due"


def test_the_comparison_and_the_verdict_can_fail():
    """The helpers the dry run relies on are not vacuous: a changed weight is seen, and failures are listed."""
    from benchmarks import gpu_check

    start = {"w": torch.zeros(3), "b": torch.zeros(2)}
    ref = {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.25, 0.0])}
    assert gpu_check.rel_diffs(ref, ref, start) == (0.0, 0.0)
    moved = {"w": ref["w"].clone(), "b": ref["b"].clone()}
    moved["w"][1] = torch.nextafter(moved["w"][1], torch.tensor(0.0))  # one ulp
    worst, update = gpu_check.rel_diffs(moved, ref, start)
    assert worst > 0 and update > 0
    assert gpu_check.skipped_steps(65536.0, 16384.0) == 2 and gpu_check.skipped_steps(1024.0, 1024.0) == 0

    results = {
        "adapters": [{"adapter": "x", "model": "m", "precision": "fp32 (repeat)", "max_rel_weight_diff": 1e-7,
                      "rel_update_diff": 0.0, "finite": True}],
        "overflow": [{"adapter": "x", "model": "m", "step_skipped": False, "weights_finite": True,
                      "weights_unchanged": False}],
    }
    fails = gpu_check.failures(results)
    assert any("second fp32 run differs" in f for f in fails)
    assert any("not skipped" in f for f in fails)
