"""``sharpguard report`` on hostile input: it writes only inside its output folder (a planted symlink is
replaced, never followed), escapes what it writes into Markdown (checked with markdown-it-py, a CommonMark
parser we did not write), bounds names, values and lines, and answers every malformed input with exit
code 2 and one line naming the file, the line and the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from sharpguard.cli import main
from sharpguard.study.history import MAX_METRICS

PREFIX = "sharpguard report: error: "


def _record(step, metric, value, **extra):
    return json.dumps({"step": step, "metric": metric, "value": value, "settings": {}, **extra})


def _history(path, names=("sharpness/lambda_max", "robustness/pgd_acc"), steps=4):
    path.write_text("".join(_record(s, n, float(s * (i + 1))) + "\n" for s in range(1, steps + 1)
                            for i, n in enumerate(names)))
    return path


def _report(capsys, *argv):
    rc = main(["report", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _refused(capsys, *argv) -> str:
    rc, out, err = _report(capsys, *argv)
    assert rc == 2 and out == "", (rc, out, err[:500])
    assert err.startswith(PREFIX) and err.endswith("\n") and err.count("\n") == 1 and len(err) < 500, err[:600]
    return err


def _table_rows(markdown: str) -> list[list[list]]:
    """The body rows of the first table in ``markdown``, as parsed by markdown-it-py (GFM tables): each
    cell the list of its inline child tokens."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    rows, row, in_body = [], None, False
    for tok in tokens:
        if tok.type == "tbody_open":
            in_body = True
        elif tok.type == "tbody_close":
            break
        elif in_body and tok.type == "tr_open":
            row = []
        elif in_body and tok.type == "tr_close":
            rows.append(row)
        elif in_body and tok.type == "inline":
            row.append(tok.children)
    return rows


def _no_constant(constant):
    raise AssertionError(f"summary.json holds {constant}, which strict JSON has not")


def _text(children) -> str:
    assert all(c.type == "text" for c in children), [c.type for c in children]  # no markup took effect
    return "".join(c.content for c in children)


# ------------------------------------------------------------------------------------------ the output
def test_a_symlink_planted_in_the_output_folder_is_replaced_not_followed(tmp_path, capsys):
    history = _history(tmp_path / "run.jsonl")
    out, outside = tmp_path / "out", tmp_path / "precious"
    out.mkdir()
    outside.mkdir()
    for name in ("summary.json", "summary.md", "history.png"):
        (outside / name).write_text("keep me")
        (out / name).symlink_to(outside / name)
    rc, stdout, _ = _report(capsys, history, "--out", out)
    assert rc == 0 and "summary.json" in stdout
    for name in ("summary.json", "summary.md", "history.png"):
        assert (outside / name).read_text() == "keep me"
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["metrics"]["sharpness/lambda_max"]["n"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["history.png", "summary.json", "summary.md"]  # no temp files


def test_names_that_would_break_the_markdown_table_are_escaped(tmp_path, capsys):
    names = ["a\nb | c", "<img src=x onerror=alert(1)>", "[click](http://x)", "- item", "1. first", "*em* _u_",
             "`code`", "x\\|y", "$\\frac{a}{b}$", "# head", "ok/name_x"]
    history = _history(tmp_path / "run.jsonl", names=names, steps=8)  # 8 rising values: a trend line each
    rc, _, _ = _report(capsys, history, "--out", tmp_path / "out")
    assert rc == 0
    md = (tmp_path / "out" / "summary.md").read_text()
    rows = _table_rows(md)
    assert len(rows) == len(names) and all(len(r) == 8 for r in rows)
    shown = {_text(r[0]) for r in rows}
    assert shown == {n.replace("\n", "\\n") for n in names}  # each name literally, on one line
    # the trend lines below the table: one list item per metric, the name literal there too
    tokens = MarkdownIt("commonmark").parse(md)
    items = [tokens[i + 2] for i, t in enumerate(tokens) if t.type == "list_item_open"]
    assert len(items) == len(names) and all(t.type == "inline" for t in items)
    assert {_text(t.children).removesuffix(" rose over training (τ = 1.00, p = 4.96e-05).") for t in items} == shown
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"].keys() == set(names)


def test_a_torn_history_is_reported_with_the_dropped_lines_said(tmp_path, capsys):
    history = _history(tmp_path / "run.jsonl")
    with history.open("a") as fh:
        fh.write(_record(9, "sharpness/lambda_max", 1.0)[:25])  # the crash cut the last record
    rc, _, err = _report(capsys, history, "--out", tmp_path / "out")
    assert rc == 0 and err.startswith("sharpguard report: note: ") and "dropped 1 torn line (line 9" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [d["line"] for d in summary["dropped_lines"]] == [9] and summary["n_records"] == 8
    assert "1 torn line(s) left out" in (tmp_path / "out" / "summary.md").read_text()


# -------------------------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("line, problem", [
    (b"\x80\x81 not text", ":2 is not UTF-8 text (byte 0x80 at column 1)"),
    (_record(1, 7, 1.0).encode(), ":2 'metric' must be a string, got a number (7)"),
    (_record(1, None, 1.0).encode(), ":2 'metric' must be a string, got null"),
    (_record(1, ["a"], 1.0).encode(), ":2 'metric' must be a string, got a JSON array"),
    (_record(1, {"a": 1}, 1.0).encode(), ":2 'metric' must be a string, got a JSON object"),
    (_record(1, "m", True).encode(), ":2 'value' must be a number or null, got a boolean (true)"),
    (b'{"step": 1, "metric": "m", "value": ' + b"7" * 400 + b"}", ":2 'value' is an integer of 400 digits, beyond"),
    (b'{"step": 1, "metric": "m", "value": ' + b"7" * 5000 + b"}", ":2 is not a usable JSON record"),
    (_record(1, "x" * 1_000_000, 1.0).encode(), ":2 'metric' must be a name of 1 to 256 characters, got 1000000"),
    (b'{"step": 1, "metric": "\\ud800", "value": 1}', ":2 'metric' holds an unpaired UTF-16 surrogate"),
    (b'{"step": 1, "metric": "m", "value": "' + b"9" * (5 << 20) + b'"}', ":2 is longer than 1048576 bytes"),
    (b'{"step": 1, "metric": "m", "value": "' + b"9" * 5000 + b'"}',
     ":2 'value' must be a number or null, got a string"),
    (b"[" * 100_000 + b"]" * 100_000, ":2 is nested too deeply"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ":2 is nested too deeply"),
    (b'{"step": 1e3, "metric": "m", "value": 1}', ":2 'step' must be an integer"),
    (b'{"step": 1, "metric": "m", "value": 1, "settings": "s"}', ":2 'settings' must be an object, got a string"),
])
def test_every_malformed_line_is_one_line_naming_the_file_and_line(tmp_path, capsys, line, problem):
    history = tmp_path / "run.jsonl"
    history.write_bytes(_record(1, "m", 1.0).encode() + b"\n" + line + b"\n")
    err = _refused(capsys, history, "--out", tmp_path / "out")
    assert f"{history}{problem}" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bad_arguments_are_one_line_each(tmp_path, capsys):
    history = _history(tmp_path / "run.jsonl")
    (tmp_path / "file").write_text("x")
    assert "is not a folder (its parent" in _refused(capsys, history, "--out", tmp_path / "file" / "sub")
    assert "is not a folder;" in _refused(capsys, history, "--out", tmp_path / "file")
    assert "is given twice (arguments 1 and 2" in _refused(capsys, history, history, "--out", tmp_path / "o")
    (tmp_path / "alias.jsonl").symlink_to(history)
    assert "is given twice (arguments 1 and 3" in _refused(
        capsys, history, _history(tmp_path / "other.jsonl"), tmp_path / "alias.jsonl", "--out", tmp_path / "o")
    assert "does not exist" in _refused(capsys, tmp_path / "missing.jsonl")
    assert "is not a regular file" in _refused(capsys, tmp_path, "--out", tmp_path / "o")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "holds no records" in _refused(capsys, tmp_path / "empty.jsonl")
    (tmp_path / "torn.jsonl").write_text('{"step": 1, "metr')
    assert "holds no records (" in _refused(capsys, tmp_path / "torn.jsonl")
    many = tmp_path / "many.jsonl"
    many.write_text("".join(_record(1, f"m{i}", 1.0) + "\n" for i in range(MAX_METRICS + 1)))
    assert f"{MAX_METRICS + 1} distinct metrics" in _refused(capsys, many, "--out", tmp_path / "o")
    (tmp_path / "o3").mkdir()
    own = _history(tmp_path / "o3" / "summary.json")
    assert "would overwrite the history" in _refused(capsys, own, "--out", tmp_path / "o3")
    assert json.loads(own.read_text().splitlines()[0])["step"] == 1
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "summary.json").mkdir()
    assert "is a folder" in _refused(capsys, history, "--out", tmp_path / "o2")
    assert not (tmp_path / "o").exists()


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        # root writes through permissions: a read-only mount is what stops it; a folder inside /proc is one
        err = _refused(capsys, _history(tmp_path / "run.jsonl"), "--out", "/proc/sharpguard-report")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        err = _refused(capsys, _history(tmp_path / "run.jsonl"), "--out", tmp_path / "ro" / "out")
    assert "cannot read or write" in err


def test_the_console_command_prints_no_traceback(tmp_path):
    history = tmp_path / "run.jsonl"
    history.write_bytes(b'{"step": 1, "metric": "m", "value": ' + b"7" * 5000 + b"}\n")
    done = subprocess.run([sys.executable, "-m", "sharpguard", "report", str(history)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(PREFIX) and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------- property test
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
NAMES = st.sampled_from(["sharpness/lambda_max", "a\nb|c", "<b>x</b>", "$x$", "- [y](z)", "é τ ✓", "\u2028", "_m_",
                         "\x00\x1b[31m", "`|`"] * 4 + ["x" * 300, ""])
VALUES = (st.none() | st.booleans() | st.floats() | st.integers(-10**500, 10**500) | st.text(max_size=5)
          | st.lists(st.integers(), max_size=2))


@st.composite
def record_line(draw) -> bytes:
    value = draw(st.floats() | st.integers(-10**6, 10**6) | st.none())
    return _record(draw(st.integers(0, 50)), draw(NAMES), value).encode()


@st.composite
def hostile_line(draw) -> bytes:
    kind = draw(st.sampled_from(["record"] * 4 + ["odd_record", "json", "bytes", "huge", "nested"]))
    if kind == "record":
        return draw(record_line())
    if kind == "odd_record":
        rec = {"step": draw(JSON | st.integers(-5, 5)), "metric": draw(NAMES | JSON), "value": draw(VALUES)}
        if draw(st.booleans()):
            rec["settings"] = draw(JSON)
        return json.dumps(rec).encode()
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    if kind == "huge":
        return b'{"step": 1, "metric": "m", "value": ' + b"9" * draw(st.integers(300, 6000)) + b"}"
    depth = draw(st.integers(1, 3000))
    return b'{"step": 1, "metric": "m", "value": 1, "settings": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


@settings(max_examples=100, deadline=timedelta(seconds=60), suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                                  HealthCheck.too_slow])
@given(lines=st.lists(record_line(), min_size=1, max_size=12) | st.lists(hostile_line(), min_size=1, max_size=8),
       torn=st.booleans(),
       twice=st.sampled_from([False] * 5 + [True]))
def test_hostile_histories_end_in_files_inside_out_or_one_line(tmp_path_factory, capsys, lines, torn, twice):
    root = tmp_path_factory.mktemp("hostile")
    history, out = root / "h.jsonl", root / "out"
    data = b"\n".join(lines)
    history.write_bytes(data if torn else data + b"\n")
    argv = [history, history] if twice else [history]
    rc, stdout, err = _report(capsys, *argv, "--out", out)
    event(f"exit {rc}")
    if rc == 2:
        assert err.startswith(PREFIX) and err.count("\n") == 1 and len(err) < 500, err[:600]
        assert not out.exists()  # every input is checked before anything is written
        return
    assert rc == 0 and not twice, (rc, err[:500])
    assert all(line.startswith("sharpguard report: note: ") for line in err.splitlines())
    assert sorted(p.name for p in root.iterdir()) == ["h.jsonl", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["history.png", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_no_constant)
    rows = _table_rows((out / "summary.md").read_text())
    assert len(rows) == len(summary["metrics"]) and all(len(r) == 8 for r in rows)
    for row in rows:
        _text(row[0])  # a metric name is plain text in its cell


def test_hostile_file_names_stay_inside_their_headings(tmp_path, capsys):
    a = _history(tmp_path / "x|y <b>.jsonl", steps=8)
    b = _history(tmp_path / "new\nline $q$.jsonl", names=("sharpness/lambda_max",), steps=8)
    rc, _, err = _report(capsys, a, b, "--out", tmp_path / "out")
    assert rc == 0, err
    md = (tmp_path / "out" / "summary.md").read_text()
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    headings = [_text(tokens[i + 1].children) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["2 monitor histories",
                        f"sharpguard monitor history: x|y <b> ({a})",
                        "sharpguard monitor history: new\\nline $q$ (" + str(b).replace("\n", "\\n") + ")"]
    assert sum(t.type == "table_open" for t in tokens) == 2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["histories"]) == {"x|y <b>", "new\nline $q$"}
    assert summary["histories"]["new\nline $q$"]["metrics"]["sharpness/lambda_max"]["n"] == 8


def test_values_at_the_edge_of_the_float_range_are_summarized_and_kept_off_the_figure(tmp_path, capsys):
    """±1.7e308 on one axis overflows matplotlib's tick locator: such values are in the table, not drawn."""
    history = tmp_path / "run.jsonl"
    values = [1.7e308, -1.7e308, 8.98e307, 8.98e307, 1.0, 5e-324]
    history.write_text("".join(_record(s, "m", v) + "\n" for s, v in enumerate(values))
                       + _record(9, "n", 1.0) + "\n" + _record(2**63 - 1, "n", 2.0) + "\n")
    rc, _, err = _report(capsys, history, "--out", tmp_path / "out")
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=_no_constant)
    m = summary["metrics"]["m"]
    assert (m["min"], m["max"], summary["values_not_drawn"]) == (-1.7e308, 1.7e308, 4)
    assert m["mean"] == pytest.approx(sum(v / 6 for v in values))  # the sum itself overflows
    assert summary["metrics"]["n"]["last_step"] == 2**63 - 1
    assert "4 value(s) of magnitude over 1e+300 are in the table" in (tmp_path / "out" / "summary.md").read_text()
