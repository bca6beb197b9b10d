"""benchmarks/methods_study.py at a tiny size: the table has its rows and finite numbers, every registered SAM
variant is a row, and a method that cannot be built (or fails while training) is a row with the reason."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def ms():
    from benchmarks import methods_study

    return methods_study


@pytest.fixture(scope="module")
def tiny(ms):
    from sharpguard.study.config import StudyConfig
    from sharpguard.study.data import load_digits

    config = dataclasses.replace(StudyConfig().with_quick(), epochs=2, subset=(128, 64), probe_size=64,
                                 curvature_examples=4, trace_hvps=3)
    data = load_digits().subset(128, 64)
    return config, data


def _raising_step(ms):
    """A method whose build succeeds but whose optimizer fails at the first step."""

    class Boom(torch.optim.SGD):
        def step(self, closure=None):
            raise RuntimeError("injected step failure")

    def build(ctx):
        return ms.Built(Boom(ctx.model.parameters(), lr=0.1), closure_step=False, settings="")

    return ms.Method("boom", build, "SAM variant")


@pytest.fixture(scope="module")
def result(ms, tiny):
    config, data = tiny
    torch.set_num_threads(1)
    wanted = [m for m in ms.registry_methods() if m.name in ("sgd", "sam")]
    # a real registry variant given a knob it does not have: make_sam refuses it, as it would a bad override
    broken = ms.Method("asam", ms.variant_builder("asam", {"asam": ms.Override(knobs=lambda ctx: {"no_such_knob": 1})}),
                       "SAM variant")
    return ms.run([*wanted, broken, _raising_step(ms)], data, config, seeds=[0, 1])


def test_rows_and_finite_numbers(ms, result):
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["sgd", "sam", "asam", "boom"]
    for name in ("sgd", "sam"):
        r = rows[name]
        assert r["status"] == "ran" and len(r["seeds"]) == 2
        for key, _, _ in ms.METRICS:
            s = r["summary"][key]
            assert s["n"] == 2 and math.isfinite(s["mean"]) and math.isfinite(s["half_width"])
    assert rows["sgd"]["forwards_per_step"] == 1.0 and rows["sgd"]["backwards_per_step"] == 1.0
    assert rows["sam"]["forwards_per_step"] == 2.0 and rows["sam"]["backwards_per_step"] == 2.0
    # sam vs sgd once per metric (sgd vs sam is the same test, not repeated); every one carries a Holm p
    family = result["comparisons"]
    assert [(c["method"], c["baseline"]) for c in family] == [("sam", "sgd")] * len(ms.METRICS)
    assert all("p_holm" in c and math.isfinite(c["difference"]) for c in family)

    text = ms.tables(result)
    for name in ("sgd", "sam", "asam", "boom"):
        assert f"| {name} |" in text
    assert "nan" not in text.lower()


def test_unbuildable_and_failing_methods_are_rows_with_reasons(result):
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["asam"]["status"] == "not run" and "no_such_knob" in rows["asam"]["reason"]
    assert rows["boom"]["status"] == "failed" and "injected step failure" in rows["boom"]["reason"]
    assert rows["asam"]["seeds"] == [] and rows["boom"]["seeds"] == []


def test_findings_and_markdown(ms, tiny, result):
    config, data = tiny
    text = ms.markdown(result, config, data, [0, 1], 1.0, ["sam", "asam"])
    assert "What the numbers say" in text and "Did not run: asam" in text


def test_every_registered_variant_is_a_row(ms):
    from sharpguard.optim import VARIANTS

    names = [m.name for m in ms.registry_methods()]
    assert names[:2] == ["sgd", "sam"] and set(VARIANTS) <= set(names) and "mesa" in names


def test_paired_compare_zero_spread_is_untested(ms):
    c = ms.paired_compare([1.5, 2.5], [1.0, 2.0])
    assert c["n_pairs"] == 2 and c["difference"] == 0.5 and c["p_value"] is None
    c = ms.paired_compare([1.0, 2.0, 3.5], [0.0, 2.0, 2.0])
    assert c["p_value"] is not None and 0.0 < c["p_value"] < 1.0
