"""Read monitor histories (JSON lines ``{"step", "metric", "value", "settings"}``) and summarize them: the
``sharpguard report HISTORY.jsonl [MORE.jsonl ...]`` command (several histories are merged into one figure,
one line per history, and one summary section per history)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .stats import kendall_tau


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Parse a history file, strictly: blank lines are skipped, anything else malformed is an error naming
    the line. As in :func:`sharpguard.monitor.read_history`, a resumed run that appended a ``(step, metric)``
    pair twice counts once (the last record wins), and records come back sorted by step."""
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"history file {str(path)!r} does not exist; pass the JSON-lines file a monitor wrote.")
    records: dict[tuple[int, str], dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"{path}:{lineno} is not valid JSON ({exc.msg}); each line must be one object.") from exc
            if not isinstance(rec, dict) or not {"step", "metric", "value"} <= rec.keys():
                raise ConfigurationError(
                    f"{path}:{lineno} is not a monitor record; each line needs 'step', 'metric' and 'value'."
                )
            value = rec["value"]
            if value is not None and not isinstance(value, (int, float)):
                raise ConfigurationError(f"{path}:{lineno}: 'value' must be a number or null, got {value!r}.")
            rec["value"] = None if value is None else float(value)
            if isinstance(rec["step"], bool) or not isinstance(rec["step"], int):
                raise ConfigurationError(f"{path}:{lineno}: 'step' must be an integer, got {rec['step']!r}.")
            records[(rec["step"], str(rec["metric"]))] = rec
    if not records:
        raise ConfigurationError(f"history file {str(path)!r} holds no records; was the monitor attached to a run?")
    return sorted(records.values(), key=lambda r: r["step"])


def _series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    by_metric: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for rec in records:
        if rec["value"] is not None and math.isfinite(rec["value"]):
            by_metric[rec["metric"]].append((rec["step"], rec["value"]))
    return {m: sorted(v) for m, v in sorted(by_metric.items())}


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
            "min": min(values), "max": max(values), "mean": sum(values) / len(values),
            "trend": trend.as_dict(),
        }
    out: dict[str, Any] = {"n_records": len(records), "metrics": metrics}
    a, b = series.get("sharpness/lambda_max"), series.get("robustness/pgd_acc")
    if a and b:
        pa, pb = dict(a), dict(b)
        common = sorted(set(pa) & set(pb))
        out["lambda_max_vs_pgd_acc"] = kendall_tau([pa[s] for s in common], [pb[s] for s in common]).as_dict()
    return out


def render_history_markdown(summary: Mapping[str, Any], source: str, plot: str | None = None) -> str:
    """A short markdown summary of :func:`summarize_history`'s output."""
    lines = [f"# sharpguard monitor history: {source}", "", f"{summary['n_records']} records.", ""]
    lines.append("| metric | n | steps | first | last | min | max | trend (Kendall τ vs step) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, s in summary["metrics"].items():
        t = s["trend"]
        trend = "n/a" if t["tau"] is None else f"τ = {t['tau']:.2f} (p = {t['p_value']:.3g})"
        lines.append(
            f"| {name} | {s['n']} | {s['first_step']}–{s['last_step']} | {s['first']:.4g} | {s['last']:.4g} | "
            f"{s['min']:.4g} | {s['max']:.4g} | {trend} |"
        )
    lines.append("")
    for name, s in summary["metrics"].items():
        t = s["trend"]
        if t["tau"] is not None and t["p_value"] < 0.05:
            direction = "rose" if t["tau"] > 0 else "fell"
            lines.append(f"- {name} {direction} over training (τ = {t['tau']:.2f}, p = {t['p_value']:.3g}).")
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
    if plot:
        lines += ["", f"![history]({Path(plot).name})"]
    lines.append("")
    return "\n".join(lines)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short, distinct labels: the file stems, or the parent folder and stem where stems repeat."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def report_history(path: str | Path | Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Read one history (or several, merged), write ``history.png``, ``summary.json`` and ``summary.md``.

    With one file ``summary.json`` is :func:`summarize_history`'s dict; with several it is
    ``{"histories": {label: summary}, "constant_metrics": {...}}`` and the figure draws one line per history.
    Metrics constant over every history get no panel (the figure's title names them)."""
    from .plots import constant_metrics, history_figure, save

    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise ConfigurationError("no history file given; pass at least one JSON-lines file a monitor wrote.")
    loaded = {label: read_history(p) for label, p in zip(_labels(paths), paths)}  # all read before writing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    if len(paths) == 1:
        records = next(iter(loaded.values()))
        summary = summarize_history(records)
        png = save(history_figure(records), out / "history.png")
        md.write_text(render_history_markdown(summary, str(paths[0]), str(png)))
    else:
        summary = {"histories": {label: summarize_history(r) for label, r in loaded.items()},
                   "constant_metrics": constant_metrics(loaded)}
        png = save(history_figure(loaded), out / "history.png")
        sections = [render_history_markdown(s, f"{label} ({p})") for (label, s), p in zip(summary["histories"].items(), paths)]
        md.write_text(f"# {len(paths)} monitor histories\n\n![history]({png.name})\n\n" + "\n".join(
            "#" + sec for sec in sections))
    js.write_text(json.dumps(summary, indent=2) + "\n")
    return {"plot": png, "json": js, "markdown": md}
