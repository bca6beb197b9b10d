"""docs/study.md's scenario figures come from stored runs: every scenario's block is what
scripts/doc_numbers.py renders from benchmarks/scenario_runs.json, each kept run is a default (not --quick)
run of that scenario, each claim's number in the page is the stored one, and the Scenarios section holds no
number that is not in a generated block."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from sharpguard.study.scenarios import DEFAULT_EPOCHS, DEFAULT_SEEDS

ROOT = Path(__file__).resolve().parents[2]
STUDY = ROOT / "docs" / "study.md"


@pytest.fixture(scope="module")
def doc_numbers():
    spec = importlib.util.spec_from_file_location("doc_numbers_scenarios", ROOT / "scripts" / "doc_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kept(doc_numbers):
    return json.loads(doc_numbers.SCENARIO_RUNS.read_text())


def _scenarios_section() -> str:
    text = STUDY.read_text()
    return text[text.index("## Scenarios"):text.index("## `sharpguard report")]


def test_every_scenario_is_kept_from_a_default_run(doc_numbers, kept):
    assert sorted(kept["scenarios"]) == sorted(DEFAULT_SEEDS) == sorted(doc_numbers.SCENARIOS)
    for name, run in kept["scenarios"].items():
        report = run["report"]
        assert report["scenario"] == name and not report["settings"]["quick"]
        assert not report["multiple_comparisons"].get("smoke_test")
        assert report["settings"]["seeds"] == DEFAULT_SEEDS[name]
        assert report["settings"]["epochs"] == DEFAULT_EPOCHS[name][0]


def test_each_scenario_block_in_study_md_is_the_rendering_of_its_stored_run(doc_numbers, kept):
    blocks = {m.group("name"): m.group("body") for m in doc_numbers.BLOCK.finditer(STUDY.read_text())}
    for name in doc_numbers.SCENARIOS:
        body = blocks[f"scenario-{name}"]
        assert body == doc_numbers.render_scenario(name, kept), f"{name}: run python scripts/doc_numbers.py render"
        rows = [line for line in body.splitlines() if line.startswith("| ") and "(source)" not in line]
        claims = kept["scenarios"][name]["report"]["claims"]
        assert all(any(c["published"] in row for row in rows) for c in claims)
        for c in claims:  # the stored estimate and verdict, in that claim's row
            (row,) = [r for r in rows if r.startswith(f"| {c['published']} (")]
            assert f"= {doc_numbers._g(c['estimate'])}" in row and c["verdict"] in row


def test_a_figure_changed_by_hand_is_caught(doc_numbers, kept, tmp_path):
    body = doc_numbers.render_scenario("large_batch", kept)
    estimate = doc_numbers._g(kept["scenarios"]["large_batch"]["report"]["claims"][0]["estimate"])
    doc = tmp_path / "study.md"
    doc.write_text("<!-- doc-numbers:scenario-large_batch -->\n" + body.replace(f"= {estimate}", "= 9.99", 1)
                   + "<!-- /doc-numbers:scenario-large_batch -->\n")
    assert doc_numbers.rewrite([doc]) == [doc] and f"= {estimate}" in doc.read_text()


def test_the_scenarios_section_has_no_hand_written_number(doc_numbers):
    section = doc_numbers.BLOCK.sub("", _scenarios_section())
    section = re.sub(r"```.*?```", "", section, flags=re.S)
    prose_numbers = [m.group() for m in re.finditer(r"\S*\d\S*", section) if m.group() not in ("l+1",)]
    assert prose_numbers == [], "numbers outside the generated blocks: put them in scripts/doc_numbers.py"
