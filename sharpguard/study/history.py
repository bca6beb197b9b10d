"""Read monitor histories (JSON lines ``{"step", "metric", "value", "settings"}``) and summarize them: the
``sharpguard report HISTORY.jsonl [MORE.jsonl ...]`` command (several histories are merged into one figure,
one line per history, and one summary section per history)."""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes
from ..errors import ConfigurationError
from ..monitor.history import HistoryRecords, HistoryWarning, dropped_message, parse_history
from .stats import kendall_tau

#: most distinct metrics one report draws (a panel each; sharpguard's monitors write a few dozen at most)
MAX_METRICS = 64


def read_history(path: str | Path) -> HistoryRecords:
    """Parse a history file for the report: every complete record, the last one per ``(step, metric)``
    (as in :func:`sharpguard.monitor.read_history`), sorted by step; torn lines of a crashed run are left
    out and listed in ``dropped``. Anything else malformed, a missing file or one without records is a
    :class:`ConfigurationError` of one line naming the file (and the line)."""
    path = Path(path)
    _check_is_file(path)
    try:
        records = parse_history(path)
    except OSError as exc:
        raise ConfigurationError(f"cannot read history file {_quoted(path)} ({exc.strerror or exc}).") from None
    records = HistoryRecords(({**r, "value": None if math.isnan(r["value"]) else r["value"]} for r in records),
                             records.dropped)
    if not records:
        torn = f" ({dropped_message(path, records)})" if records.dropped else ""
        raise ConfigurationError(f"history file {_quoted(path)} holds no records{torn}; was the monitor "
                                 "attached to a run?")
    return records


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise ConfigurationError(f"history file {_quoted(path)} does not exist; pass the JSON-lines file a "
                                 "monitor wrote.")
    if not path.is_file():
        raise ConfigurationError(f"history {_quoted(path)} is not a regular file; pass the JSON-lines file a "
                                 "monitor wrote.")


def _quoted(path: str | os.PathLike[str]) -> str:
    """A path for a one-line message: quoted, control characters escaped, at most 200 characters."""
    text = repr(os.fspath(path))
    return text if len(text) <= 200 else text[:200] + "...'"


def _series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    by_metric: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        if rec["value"] is not None and math.isfinite(rec["value"]):
            by_metric[rec["metric"]].append((rec["step"], rec["value"]))
    return {m: sorted(v) for m, v in sorted(by_metric.items())}


def _mean(values: Sequence[float]) -> float:
    """The mean of finite floats, finite too (a sum near the float range would overflow)."""
    mean = sum(values) / len(values)
    return mean if math.isfinite(mean) else sum(v / len(values) for v in values)


def summarize_history(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per metric: count, first/last step and value, min, max, mean, and the trend over training as
    Kendall's tau between step and value. Plus the rank correlation of ``sharpness/lambda_max`` with
    ``robustness/pgd_acc`` over the steps where both were measured."""
    series = _series(records)
    metrics = {}
    for name, pts in series.items():
        steps, values = [s for s, _ in pts], [v for _, v in pts]
        trend = kendall_tau(steps, values)
        metrics[name] = {
            "n": len(pts),
            "first_step": steps[0], "last_step": steps[-1],
            "first": values[0], "last": values[-1],
            "min": min(values), "max": max(values), "mean": _mean(values),
            "trend": trend.as_dict(),
        }
    out: dict[str, Any] = {"n_records": len(records), "metrics": metrics}
    a, b = series.get("sharpness/lambda_max"), series.get("robustness/pgd_acc")
    if a and b:
        pa, pb = dict(a), dict(b)
        common = sorted(set(pa) & set(pb))
        out["lambda_max_vs_pgd_acc"] = kendall_tau([pa[s] for s in common], [pb[s] for s in common]).as_dict()
    return out


_MD_SPECIAL = re.compile(r"[\\`*\[\]<>|#!~&]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def _visible(text: str) -> str:
    """Control, format, separator and surrogate characters as escapes (``\\n``, ``\\x07``, ``\\u2028``):
    text that stays on one line and encodes as UTF-8."""
    out = []
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
            out.append(repr(c)[1:-1] if c not in "\n\r\t" else {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        else:
            out.append(c)
    return "".join(out)


def md_text(text: str) -> str:
    """``text`` as inline Markdown that shows it literally: on one line, table-safe (``|`` escaped), no
    markup, links, HTML or block markers taking effect (CommonMark backslash escapes)."""
    text = _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), _visible(text))
    # not a list item or a setext underline
    return re.sub(r"^(\d+)([.)])", r"\1\\\2", re.sub(r"^([-+=])", r"\\\1", text))


def _plot_name(name: str) -> str:
    """A metric name as matplotlib draws it literally (``$`` would start mathtext)."""
    return _visible(name).replace("$", r"\$")


def render_history_markdown(summary: Mapping[str, Any], source: str, plot: str | None = None) -> str:
    """A short markdown summary of :func:`summarize_history`'s output (names and the source escaped)."""
    lines = [f"# sharpguard monitor history: {md_text(source)}", "", f"{summary['n_records']} records.", ""]
    dropped = summary.get("dropped_lines")
    if dropped:
        lines += [f"{len(dropped)} torn line(s) left out (a record cut short by a crash or a full disk): line "
                  + ", ".join(str(d["line"]) for d in dropped[:20]) + (" ..." if len(dropped) > 20 else "") + ".", ""]
    lines.append("| metric | n | steps | first | last | min | max | trend (Kendall τ vs step) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, s in summary["metrics"].items():
        t = s["trend"]
        trend = "n/a" if t["tau"] is None else f"τ = {t['tau']:.2f} (p = {t['p_value']:.3g})"
        lines.append(
            f"| {md_text(name)} | {s['n']} | {s['first_step']}–{s['last_step']} | {s['first']:.4g} | {s['last']:.4g} "
            f"| {s['min']:.4g} | {s['max']:.4g} | {trend} |"
        )
    lines.append("")
    for name, s in summary["metrics"].items():
        t = s["trend"]
        if t["tau"] is not None and t["p_value"] < 0.05:
            direction = "rose" if t["tau"] > 0 else "fell"
            lines.append(f"- {md_text(name)} {direction} over training (τ = {t['tau']:.2f}, p = {t['p_value']:.3g}).")
    c = summary.get("lambda_max_vs_pgd_acc")
    if c:
        if c["tau"] is None:
            lines.append(f"- λ_max vs PGD accuracy: undefined ({c['n']} common steps).")
        else:
            sig = "significant" if c["p_value"] < 0.05 else "not significant"
            lines.append(
                f"- λ_max vs PGD accuracy over {c['n']} common steps: τ = {c['tau']:.2f} "
                f"(p = {c['p_value']:.3g}, {sig} at 0.05; a trend shared over training, not a causal link)."
            )
    if summary.get("values_not_drawn"):
        lines += ["", f"{summary['values_not_drawn']} value(s) of magnitude over {PLOT_LIMIT:g} are in the table "
                      "but not drawn in the figure."]
    if plot:
        lines += ["", f"![history]({Path(plot).name})"]
    lines.append("")
    return "\n".join(lines)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short, distinct labels: the file stems, or the parent folder and stem where stems repeat."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]
    return labels if len(set(labels)) == len(labels) else [os.fspath(p) for p in paths]


def check_out_dir(out: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``out`` as a folder that can be made: refused when it, or a folder above it, exists and is not a folder."""
    path = Path(out)
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                where = "" if part == path else f" (its parent {_quoted(part)} is not a folder)"
                raise ConfigurationError(f"{flag} {_quoted(path)} is not a folder{where}; pass a new or "
                                         "existing folder.")
            break
    return path


def write_inside(folder: Path, name: str, data: bytes) -> Path:
    """Write ``folder/name`` atomically (a temporary file in ``folder``, fsync, rename over the name).

    The rename replaces whatever entry ``name`` is, a symlink included, and never writes through it, so
    nothing outside ``folder`` is touched."""
    target = folder / name
    if target.is_dir() and not target.is_symlink():
        raise ConfigurationError(f"{_quoted(target)} is a folder; the report writes a file there, remove it or pass "
                                 "another --out.")
    atomic_write_bytes(target, data)
    return target


def _png_bytes(fig) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")  # plots.save's resolution, into memory for write_inside
    return buffer.getvalue()


def _distinct(paths: Sequence[Path]) -> None:
    """Refuse a history given twice (its records would be one history drawn as two)."""
    seen: dict[tuple[int, int], int] = {}
    for i, p in enumerate(paths):
        _check_is_file(p)
        st = p.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise ConfigurationError(f"history file {_quoted(p)} is given twice (arguments {seen[key] + 1} and "
                                     f"{i + 1}, the same file); pass each history once.")
        seen[key] = i


#: the files a report writes into its folder
OUTPUT_FILES = ("history.png", "summary.md", "summary.json")

#: largest magnitude drawn: beyond it an axis spanning both signs overflows matplotlib's tick locator
PLOT_LIMIT = 1e300


def _plottable(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records as the figure draws them: names literal, values beyond ``PLOT_LIMIT`` left out."""
    names = {name: _plot_name(name) for name in {r["metric"] for r in records}}
    return [{**r, "metric": names[r["metric"]],
             "value": r["value"] if r["value"] is None or abs(r["value"]) <= PLOT_LIMIT else None} for r in records]


def _not_drawn(records: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for r in records
               if r["value"] is not None and math.isfinite(r["value"]) and abs(r["value"]) > PLOT_LIMIT)


def report_history(path: str | Path | Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Read one history (or several, merged), write ``history.png``, ``summary.json`` and ``summary.md``.

    With one file ``summary.json`` is :func:`summarize_history`'s dict; with several it is
    ``{"histories": {label: summary}, "constant_metrics": {...}}`` and the figure draws one line per history.
    Metrics constant over every history get no panel (the figure's title names them). Torn lines of a
    crashed run are left out and listed (``dropped_lines``). Every input is read and checked before anything
    is written; the files are written atomically inside ``out_dir`` only (a symlink there is replaced, never
    followed). Bad input is a :class:`ConfigurationError` of one line naming the file and the line."""
    from .plots import constant_metrics, history_figure

    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise ConfigurationError("no history file given; pass at least one JSON-lines file a monitor wrote.")
    _distinct(paths)
    loaded = {label: read_history(p) for label, p in zip(_labels(paths), paths)}  # all read before writing
    for p, records in zip(paths, loaded.values()):
        if records.dropped:
            warnings.warn(dropped_message(_quoted(p), records), HistoryWarning, stacklevel=2)
    names = {r["metric"] for records in loaded.values() for r in records}
    if len(names) > MAX_METRICS:
        raise ConfigurationError(f"the histories hold {len(names)} distinct metrics, more than the {MAX_METRICS} a "
                                 "report draws; a monitor writes a few dozen, so pass the histories of monitors, "
                                 "or split them.")
    out = check_out_dir(out_dir)
    inputs = {(p.stat().st_dev, p.stat().st_ino): p for p in paths}
    for name in OUTPUT_FILES:
        target = out / name
        if target.exists() and not target.is_symlink() and (target.stat().st_dev, target.stat().st_ino) in inputs:
            raise ConfigurationError(f"the report would overwrite the history {_quoted(target)}; pass another --out.")
    out.mkdir(parents=True, exist_ok=True)

    def summary_of(records: HistoryRecords) -> dict[str, Any]:
        summary = summarize_history(records)
        if records.dropped:
            summary["dropped_lines"] = [{"line": n, "reason": why} for n, why in records.dropped]
        if _not_drawn(records):
            summary["values_not_drawn"] = _not_drawn(records)
        return summary

    if len(paths) == 1:
        records = next(iter(loaded.values()))
        summary = summary_of(records)
        png = write_inside(out, "history.png", _png_bytes(history_figure(_plottable(records))))
        markdown = render_history_markdown(summary, os.fspath(paths[0]), str(png))
    else:
        summary = {"histories": {label: summary_of(r) for label, r in loaded.items()},
                   "constant_metrics": constant_metrics(loaded)}
        shown = [_plot_name(label) for label in loaded]
        if len(set(shown)) < len(shown):
            shown = [f"{i + 1}: {label}" for i, label in enumerate(shown)]
        figure = history_figure({label: _plottable(r) for label, r in zip(shown, loaded.values())})
        png = write_inside(out, "history.png", _png_bytes(figure))
        sections = [render_history_markdown(s, f"{label} ({os.fspath(p)})")
                    for (label, s), p in zip(summary["histories"].items(), paths)]
        markdown = (f"# {len(paths)} monitor histories\n\n![history]({png.name})\n\n"
                    + "\n".join("#" + sec for sec in sections))
    md = write_inside(out, "summary.md", markdown.encode("utf-8"))
    js = write_inside(out, "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return {"plot": png, "json": js, "markdown": md}
