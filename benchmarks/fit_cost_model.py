"""Fit the cost model of docs/cost_model.md to the last ``benchmarks/scale.py`` run (``scale_raw.json``).

The model (sharpguard/sharpness/cost.py): a check's extra peak is ``c_A A / m + (max_basis + 1 + c_v) P b``
with ``A = train extra peak - (1 + s) P b`` (AdamW: ``s = 2``), ``m`` micro-batches, ``P b`` the parameter
bytes. ``c_A`` and ``c_v`` are fitted by least squares on the relative error (so the small models weigh as
much as the large ones): for exact products jointly over the whole-batch check and the monitor's
micro-batched one (in the micro-batches its ``"auto"`` chose), for finite differences over its whole-batch check.
``c_t``: the mean of one product's time over a forward+backward, per method. Prints the constants, each model's
measured / predicted peak and the error range; the constants are then copied into cost.py by hand (the fit is a
decision to review).

Run: ``.venv/bin/python benchmarks/fit_cost_model.py`` (reads ``benchmarks/scale_raw.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


from sharpguard.sharpness.cost import DEFAULT_MAX_BASIS  # noqa: E402

RAW = Path(__file__).with_name("scale_raw.json")
STATE_VECTORS = 3  # gradient + AdamW's two moments


def _rows(raw: dict, check: str) -> list[tuple[str, float, float, float]]:
    """(model, A / m, P b, measured check extra peak) in MiB for every model with that check, ``m`` the
    micro-batches the check ran in (recorded by scale.py; 1 for whole batches)."""
    out = []
    for name, r in raw.items():
        mem = r["mem"]
        if check not in mem:
            continue
        pb = 4 * r["time"]["params"] / 2**20
        a = max(mem["train"]["extra_mib"] - STATE_VECTORS * pb, 0.0)
        micro = int(mem[check].get("micro_batches", 1))
        out.append((f"{name} ({check}, {micro} micro-batch{'es' if micro > 1 else ''})", a / micro, pb,
                    mem[check]["extra_mib"]))
    return out


def fit(rows: list[tuple[str, float, float, float]]) -> tuple[float, float, list[tuple[str, float, float]]]:
    """Least squares of ``y - (max_basis + 1) P b = c_A a + c_v P b`` on relative residuals."""
    a = np.array([[r[1], r[2]] for r in rows])
    y = np.array([r[3] - (DEFAULT_MAX_BASIS + 1) * r[2] for r in rows])
    w = 1.0 / np.array([r[3] for r in rows])
    (c_a, c_v), *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    pred = [(r[0], r[3], c_a * r[1] + (DEFAULT_MAX_BASIS + 1 + c_v) * r[2]) for r in rows]
    return float(c_a), float(c_v), pred


def main() -> None:
    raw = json.loads(RAW.read_text())
    for method, rows in (
        ("autograd", _rows(raw, "check") + _rows(raw, "check_mb")),
        ("finite_difference", _rows(raw, "check_fd")),
    ):
        c_a, c_v, pred = fit(rows)
        errors = [p / m - 1 for _, m, p in pred]
        print(f"{method}: c_A = {c_a:.2f}, c_v = {c_v:.1f}; error of the peak {min(errors):+.0%}..{max(errors):+.0%}")
        for name, measured, predicted in pred:
            print(f"  {name}: {measured:.0f} / {predicted:.0f} MiB ({predicted / measured - 1:+.0%})")
    for key, label in (("hvp", "autograd"), ("hvp_fd", "finite_difference"),
                       ("hvp_fwd_over_rev", "forward-over-reverse")):
        ratios = [r["time"][key] / r["time"]["fwd_bwd"] for r in raw.values() if key in r["time"]]
        if ratios:
            print(f"c_t {label}: mean {np.mean(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
