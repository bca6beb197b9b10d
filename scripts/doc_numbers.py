"""Produce the numbers the docs quote from runs, so they cannot drift from what the code does.

    python scripts/doc_numbers.py study               # run `sharpguard study` once (~1-5 min), keep its measurements
    python scripts/doc_numbers.py study --from DIR    # or take an existing study folder (its report.json)
    python scripts/doc_numbers.py examples            # time every example (~3 min on a 2-core CPU)
    python scripts/doc_numbers.py scenarios           # run each `sharpguard study --scenario` at its defaults (~5 min)
    python scripts/doc_numbers.py scenarios --from DIR  # or take existing runs (DIR/<name>/scenario.json)
    python scripts/doc_numbers.py render              # rewrite the docs' generated blocks from the kept files
                                                      # (also the simulated-scale table: benchmarks/simulate_raw.json)

``study`` keeps the default run's per-model measurements and settings in benchmarks/study_default_run.json;
``examples`` keeps each example's wall time in benchmarks/example_times.json; ``scenarios`` keeps each
scenario's scenario.json in benchmarks/scenario_runs.json. Each then rewrites the blocks
between ``<!-- doc-numbers:NAME -->`` and ``<!-- /doc-numbers:NAME -->`` in docs/study.md, README.md,
docs/huggingface.md and docs/accelerate.md from those files, through the same report code the study runs
(``build_report``).
tests/package/test_doc_numbers.py checks that every block equals what this script renders from the kept files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY_RUN = ROOT / "benchmarks" / "study_default_run.json"
EXAMPLE_TIMES = ROOT / "benchmarks" / "example_times.json"
SCENARIO_RUNS = ROOT / "benchmarks" / "scenario_runs.json"
SIMULATE_RAW = ROOT / "benchmarks" / "simulate_raw.json"
SIMULATE_VS_CPU = ROOT / "benchmarks" / "simulate_vs_cpu.json"
SCENARIOS = ("robust_overfitting", "large_batch", "rescaling", "local_global")
# (example, arguments, the docs that quote its time)
EXAMPLES = [
    ("plain_sam_digits.py", []),
    ("lightning_digits.py", []),
    ("hf_text_classification.py", []),
    ("accelerate_loop.py", []),
    ("lora_finetune.py", []),
]
BLOCK = re.compile(r"(<!-- doc-numbers:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /doc-numbers:(?P=name) -->)", re.S)


def _p(p) -> str:
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def render_study(kept: dict) -> str:
    """The default run's block for docs/study.md: the answer, the hypotheses and the correlations, all from
    ``build_report`` on the kept measurements."""
    from sharpguard.study.report import SHARPNESS_MEASURES, build_report

    report = build_report(kept["runs"], kept["settings"])
    f, corr, s = report["findings"], report["correlations"], kept["settings"]
    methods = list(dict.fromkeys(r["method"] for r in kept["runs"]))
    lines = [
        f"One default run: {len(methods)} methods, {s['seeds']} seeds, {s['epochs']} epochs, "
        f"{kept['wall_seconds']:.0f} s wall time ({kept['machine']}); {f['multiple_comparisons']['n_tests']} tests, "
        "Holm-corrected. The report's answer:",
        "",
        f"> {f['answer']}",
        "",
        "| hypothesis | means | raw p | Holm p | Hedges' g | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for h in f["hypotheses"]:
        c = h["comparison"]
        g = "n/a" if c["hedges_g"] is None else f"{c['hedges_g']:.2f}"
        lines.append(f"| {h['claim']} | {c['mean_a']:.3g} vs {c['mean_b']:.3g} | {_p(c['p_value'])} | "
                     f"{_p(c['p_adjusted'])} | {g} | {h['verdict']} |")
    lines += ["",
              "| measure vs robust_acc | τ, all models (raw p, Holm p) | τ, without adversarial training (raw "
              "p, Holm p) |",
              "|---|---|---|"]
    for m in SHARPNESS_MEASURES:
        cells = []
        for view in ("all_runs", "no_adversarial_training"):
            c = corr[view][m]
            cells.append("n/a" if c["tau"] is None else f"{c['tau']:.2f} ({_p(c['p_value'])}, {_p(c['p_adjusted'])})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    means = {m: {k: v["mean"] for k, v in d.items()} for m, d in report["summary"].items()}
    sgd = means.get("sgd", {})
    if sgd.get("adv_confidence") is not None:
        lines += ["", f"At the PGD examples that fool them, SGD-trained models are {100 * sgd['adv_confidence']:.0f} % "
                      f"confident; the input-Hessian top eigenvalue there is {sgd['adv_input_curvature']:.3g} against "
                      f"{sgd['input_curvature']:.3g} at clean training inputs. Caveats the report raises: "
                      f"{len(f['caveats'])} (gradient masking, saturation, the built-in robust-loss association)."]
    return "\n".join(lines) + "\n"


def _g(x: float | None, digits: int = 3) -> str:
    """A number as the scenario tables print it (significant digits, a real minus sign)."""
    if x is None:
        return "n/a"
    text = f"{x:.{digits}g}"
    return "−" + text[1:] if text.startswith("-") else text


def _scenario_settings_line(name: str, report: dict) -> str:
    """What the scenario ran, from its own settings."""
    s = report["settings"]
    if name == "robust_overfitting":
        milestones = " and ".join(str(m) for m in s["lr_milestones"])
        return (f"PGD-AT and AWP over {s['epochs']} epochs, learning rate ÷10 at epochs {milestones}; every "
                f"{s['measured_every']} epochs robust accuracy on {s['eval_examples']} training and "
                f"{s['eval_examples']} test examples.")
    if name == "large_batch":
        arms = s["arms"]
        return ("Arms (batch, learning rate, lr/B, optimizer steps per run): " + "; ".join(
            f"{arm} ({a['batch_size']}, {a['lr']:.3g}, {a['lr_over_batch']:.2g}, {a['steps_per_run']:.0f})"
            for arm, a in arms.items()) + ".")
    if name == "rescaling":
        alphas = ", ".join(f"{a:g}" for a in s["alphas"])
        return (f"Rescaling factors α ∈ {{{alphas}}}, for each pair of consecutive linear layers of each seed's "
                f"model ({len(report['data']['rows'])} rescaled models).")
    if name == "local_global":
        return (f"{len(report['data']['models'])} models; robust accuracy on {s['test_examples']} test examples at "
                f"eps ∈ {{{', '.join(f'{e:g}' for e in s['eps_grid'])}}}.")
    return ""


def _robust_overfitting_curves(report: dict) -> str:
    """The curves behind the claims: ranges over seeds after the first decay and at the first and last measure."""
    first_decay = report["settings"]["lr_milestones"][0]

    def span(values: list[float]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:.2g}" if f"{lo:.2g}" == f"{hi:.2g}" else f"{lo:.2g}–{hi:.2g}"

    parts = []
    for method, seeds in report["data"]["curves"].items():
        curves = list(seeds.values())
        after = [p["robust_test_acc"] for c in curves for p in c if p["epoch"] > first_decay]
        parts.append(f"{method}: robust test accuracy {span(after)} after epoch {first_decay}, robust training "
                     f"accuracy {span([c[-1]['robust_train_acc'] for c in curves])} at the end; robust-loss sharpness "
                     f"{span([c[0]['robust_sharpness'] for c in curves])} at the first measure, "
                     f"{span([c[-1]['robust_sharpness'] for c in curves])} at the last")
    return "Curves over seeds (ranges): " + "; ".join(parts) + "."


def render_scenario(name: str, kept: dict) -> str:
    """One scenario's block for docs/study.md: its settings, every claim with its number, interval, p-values and
    verdict, and the scenario's own tables, all from the kept scenario.json."""
    run = kept["scenarios"][name]
    report = run["report"]
    s = report["settings"]
    lines = [
        f"From one run at its defaults, kept in `benchmarks/scenario_runs.json`: {s['seeds']} seeds, {s['epochs']} "
        f"epochs, {report['seconds']:.0f} s ({kept['machine']}, load average {run['load_average']:g}). "
        + _scenario_settings_line(name, report),
        "",
        "| claim (source) | our number | interval | p (Holm) | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in report["claims"]:
        number = f"{c['statistic']} = {_g(c['estimate'])}"
        if c.get("effect_size") is not None and c.get("effect_measure") not in (None, "kendall_tau", "tau_difference"):
            number += f" ({c['effect_measure']} = {_g(c['effect_size'], 2)})"
        interval = f"[{_g(c['low'])}, {_g(c['high'])}] {c['interval']}"
        if c.get("tolerance") is not None:
            test = f"tolerance {c['tolerance']}"
        else:
            test = f"{_g(c['p_value'], 2)} ({_g(c['p_adjusted'], 2)})"
        verdict = f"**{c['verdict']}**" if c["verdict"] == "held" else c["verdict"]
        lines.append(f"| {c['published']} ({c['source']}) | {number} | {interval} | {test} | {verdict} |")
    if name == "robust_overfitting":
        lines += ["", _robust_overfitting_curves(report)]
    own = list(report.get("markdown", []))
    if own:
        lines += [""] + [line.replace("## ", "**", 1) + "**" if line.startswith("## ") else line for line in own]
    return "\n".join(lines) + "\n"


def render_example_times(times: dict) -> dict[str, str]:
    """The blocks that quote the examples' wall times (README.md's list, docs/huggingface.md's and docs/accelerate.md's
    lines)."""
    machine = times["machine"]
    items = ", ".join(f"`examples/{name}` ({t['seconds']:.0f} s at load {t['load_average']:g})"
                      for name, t in times["examples"].items())
    hf = times["examples"].get("hf_text_classification.py")
    acc = times["examples"].get("accelerate_loop.py")
    return {
        "example-times": (f"Measured wall times, one run each ({machine}; the load average beside each time says how "
                          f"busy the machine was, and times grow with it): {items}.\n"),
        "hf-example-time": (f"`examples/hf_text_classification.py` (CPU, {hf['seconds']:.0f} s measured on a "
                            f"{machine}, at load average {hf['load_average']:g}; `--quick` for a smoke test; "
                            "`--variant`,\n") if hf else "",
        "accelerate-example-time": (f"`examples/accelerate_loop.py` (CPU, {acc['seconds']:.0f} s measured on a "
                                    f"{machine}, at load average {acc['load_average']:g}; `--quick` for a smoke test; "
                                    "runs under\n")
        if acc else "",
    }


def blocks() -> dict[str, str]:
    """Every generated block's text, from the kept files."""
    out: dict[str, str] = {}
    if STUDY_RUN.exists():
        out["study-default-run"] = render_study(json.loads(STUDY_RUN.read_text()))
    if EXAMPLE_TIMES.exists():
        out.update(render_example_times(json.loads(EXAMPLE_TIMES.read_text())))
    if SCENARIO_RUNS.exists():
        kept = json.loads(SCENARIO_RUNS.read_text())
        out.update({f"scenario-{name}": render_scenario(name, kept) for name in kept["scenarios"]})
    if SIMULATE_RAW.exists():
        raw = json.loads(SIMULATE_RAW.read_text())
        out["simulated-scale"] = render_simulated(raw)
        out["simulated-cost-model"] = render_simulated_cost_model(raw)
    if SIMULATE_VS_CPU.exists():
        out["simulated-vs-cpu"] = render_simulated_vs_cpu(json.loads(SIMULATE_VS_CPU.read_text()))
    return out


def render_simulated_vs_cpu(sim: dict) -> str:
    """benchmarks/simulate.py --validate's table: scale.py's models simulated against its measurements."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.simulate import validation_table

    return validation_table(sim) + "\n"


def render_simulated_cost_model(raw: dict) -> str:
    """benchmarks/simulate.py's table of ``sharpguard.sharpness.cost`` against the simulated counts."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.simulate import cost_model_table

    return cost_model_table(raw) + "\n"


def render_simulated(raw: dict) -> str:
    """The one-line-per-model table of benchmarks/simulate.py (``--summary``), from its raw counts."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.simulate import summary_table

    return summary_table(raw) + "\n"


DOCS = [ROOT / "docs" / "study.md", ROOT / "README.md", ROOT / "docs" / "huggingface.md",
        ROOT / "docs" / "accelerate.md", ROOT / "docs" / "cost_model.md"]


def rewrite(paths=DOCS) -> list[Path]:
    """Replace each generated block in ``paths`` with its text from :func:`blocks`; return the files changed."""
    texts = blocks()
    changed = []
    for path in paths:
        old = path.read_text()
        new = BLOCK.sub(lambda m: m.group(1) + texts.get(m.group("name"), m.group("body")) + m.group(4), old)
        if new != old:
            path.write_text(new)
            changed.append(path)
    return changed


def _machine() -> str:
    return (f"{os.cpu_count()}-core CPU shared with other jobs, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def study(source: str | None) -> None:
    if source is None:
        out = Path(tempfile.mkdtemp(prefix="sharpguard-study-"))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sharpguard", "study", "--no-progress", "--out", str(out)], check=True)
        seconds = time.perf_counter() - start
    else:
        out, seconds = Path(source), None
    report = json.loads((out / "report.json").read_text())
    if report["settings"].get("quick"):
        raise SystemExit("doc_numbers: that folder holds a --quick run (a smoke test); the docs quote a default run.")
    if seconds is None:  # an existing folder: the report's own training and measuring times are all we have
        seconds = float((out / "wall_seconds.txt").read_text()) if (out / "wall_seconds.txt").exists() else float("nan")
    threads = report["settings"].get("machine", {}).get("threads", "?")
    kept = {"runs": report["runs"], "settings": report["settings"], "wall_seconds": seconds,
            "machine": f"{os.cpu_count()}-core CPU shared with other jobs, {threads} torch thread(s)"}
    STUDY_RUN.write_text(json.dumps(kept, indent=1, allow_nan=True) + "\n")


def scenarios(source: str | None) -> None:
    """Run (or take from ``source``) every scenario at its defaults and keep its scenario.json."""
    kept = {"machine": _machine(), "scenarios": {}}
    for name in SCENARIOS:
        load = os.getloadavg()[0]
        if source is None:
            out = Path(tempfile.mkdtemp(prefix=f"sharpguard-{name}-"))
            subprocess.run([sys.executable, "-m", "sharpguard", "study", "--scenario", name, "--no-progress",
                            "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
            load = max(load, os.getloadavg()[0])
        else:  # the load the run saw, if its folder kept it (load_average.txt); else the load now
            out = Path(source) / name
            if (out / "load_average.txt").exists():
                load = float((out / "load_average.txt").read_text())
        report = json.loads((out / "scenario.json").read_text())
        if report["settings"].get("quick"):
            raise SystemExit(f"doc_numbers: {out} holds a --quick run (a smoke test); the docs quote default runs.")
        kept["scenarios"][name] = {"load_average": round(load, 1), "report": report}
        print(f"{name}: {report['seconds']:.0f} s", flush=True)
    SCENARIO_RUNS.write_text(json.dumps(kept, indent=1, ensure_ascii=False, allow_nan=True) + "\n")


def examples() -> None:
    times = {"machine": _machine(), "examples": {}}
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for name, args in EXAMPLES:
        with tempfile.TemporaryDirectory() as cwd:  # an example's files (runs/, logs) land outside the checkout
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], check=True, cwd=cwd, env=env,
                           stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            # the machine's load (1-minute average) around the run: on a shared machine it explains the time
            load = max(load, os.getloadavg()[0])
            times["examples"][name] = {"seconds": round(seconds, 1), "args": args, "load_average": round(load, 1)}
        print(f"{name}: {times['examples'][name]['seconds']} s", flush=True)
    EXAMPLE_TIMES.write_text(json.dumps(times, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    st = sub.add_parser("study")
    st.add_argument("--from", dest="source", default=None, help="an existing default-run folder (its report.json)")
    sub.add_parser("examples")
    sc = sub.add_parser("scenarios")
    sc.add_argument("--from", dest="source", default=None, help="a folder holding <name>/scenario.json per scenario")
    sub.add_parser("render")
    args = parser.parse_args(argv)
    if args.what == "study":
        study(args.source)
    elif args.what == "examples":
        examples()
    elif args.what == "scenarios":
        scenarios(args.source)
    for path in rewrite():
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
