"""The numbers the docs quote come from runs: every generated block in the docs equals what
scripts/doc_numbers.py renders from the kept run files, through the report code the study uses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def doc_numbers():
    spec = importlib.util.spec_from_file_location("doc_numbers", ROOT / "scripts" / "doc_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks_in(path: Path, doc_numbers) -> dict[str, str]:
    return {m.group("name"): m.group("body") for m in doc_numbers.BLOCK.finditer(path.read_text())}


def test_every_generated_block_equals_its_rendering_from_the_kept_runs(doc_numbers):
    rendered = doc_numbers.blocks()
    assert "study-default-run" in rendered
    found = {}
    for path in doc_numbers.DOCS:
        found.update({(path.name, k): v for k, v in _blocks_in(path, doc_numbers).items()})
    assert {("study.md", "study-default-run"), ("README.md", "example-times"),
            ("huggingface.md", "hf-example-time"), ("README.md", "simulated-scale"),
            ("cost_model.md", "simulated-scale"), ("cost_model.md", "simulated-vs-cpu")} <= set(found)
    for (name, block), body in found.items():
        assert block in rendered, f"{name} has a block {block!r} that no kept run renders"
        assert body == rendered[block], f"{name}'s {block} block drifted: run python scripts/doc_numbers.py render"


def test_the_kept_study_run_is_a_default_run_and_the_block_quotes_its_report(doc_numbers):
    from sharpguard.study.report import build_report

    kept = json.loads(doc_numbers.STUDY_RUN.read_text())
    assert not kept["settings"].get("quick") and kept["settings"]["seeds"] == 3 and kept["settings"]["epochs"] == 30
    report = build_report(kept["runs"], kept["settings"])
    text = doc_numbers.render_study(kept)
    assert f"> {report['findings']['answer']}" in text
    tau = report["correlations"]["all_runs"]["input_curvature"]
    assert f"| input_curvature | {tau['tau']:.2f} (" in text


def test_a_changed_number_is_caught(doc_numbers, tmp_path):
    doc = tmp_path / "doc.md"
    body = doc_numbers.blocks()["study-default-run"]
    doc.write_text(f"x\n<!-- doc-numbers:study-default-run -->\n{body.replace('29 tests', '28 tests')}"
                   "<!-- /doc-numbers:study-default-run -->\n")
    assert doc_numbers.rewrite([doc]) == [doc] and "29 tests" in doc.read_text()


def test_example_times_cover_every_example_and_say_how_busy_the_machine_was(doc_numbers):
    times = json.loads(doc_numbers.EXAMPLE_TIMES.read_text())
    examples = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
    assert sorted(times["examples"]) == examples
    text = doc_numbers.render_example_times(times)["example-times"]
    for name, t in times["examples"].items():
        assert f"`examples/{name}` ({t['seconds']:.0f} s at load {t['load_average']:g})" in text
