"""Extra wall time of sharpguard's monitors in a Lightning run, against the same run without them.

    python benchmarks/monitor_overhead.py [--epochs 300] [--repeats 2]

One process, same data, same model, same seed; the configurations run interleaved ``--repeats`` times
and the median wall time of ``trainer.fit`` is reported. The target (DESIGN.md promise 4) is at most 5%
extra time for the default monitor, whose adaptive schedule keeps its own time within a 5% budget. The
table also gives what the monitors report themselves (``monitor/overhead_pct``) and how many checks
they ran. Writes the section "Monitor overhead" of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import machine, write_section  # noqa: E402
from lightning_digits import DigitsCNN, digits_loaders  # noqa: E402

from sharpguard.integrations.lightning import NAMESPACE, RobustnessMonitor, SharpnessMonitor  # noqa: E402

pl = __import__(NAMESPACE, fromlist=["Trainer"])


def configs() -> dict[str, callable]:
    return {
        "no monitor": lambda: [],
        "SharpnessMonitor() (defaults: lambda_max + eos_ratio, budget 5%)": lambda: [SharpnessMonitor()],
        "SharpnessMonitor + RobustnessMonitor (budget 2.5% each)": lambda: [
            SharpnessMonitor(budget=0.025), RobustnessMonitor(budget=0.025, eps=0.1, steps=5)],
    }


def run(callbacks, epochs: int) -> tuple[float, list]:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = DigitsCNN()
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    return seconds, callbacks


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    cfgs = configs()
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    reported: dict[str, list[str]] = {name: [] for name in cfgs}
    run(cfgs["no monitor"](), 1)  # warm-up: imports, allocator, first-call overheads
    for _ in range(args.repeats):
        for name, build in cfgs.items():
            seconds, callbacks = run(build(), args.epochs)
            times[name].append(seconds)
            reported[name] = [
                f"{type(cb.monitor).__name__}: {cb.monitor.schedule.overhead_pct:.1f}% in {cb.monitor.schedule.n_checks} checks"
                for cb in callbacks
            ]
    base = statistics.median(times["no monitor"])
    steps = args.epochs * len(digits_loaders()[0])
    lines = [
        f"Machine: {machine()}.",
        f"Run: examples/lightning_digits.py's CNN (BatchNorm, SGD momentum, cosine LR) on 1,400 digits, batch 64, "
        f"{args.epochs} epochs = {steps} optimizer steps, 32-bit, 1 thread; median of {args.repeats} interleaved runs.",
        "",
        "| configuration | fit time (s) | extra time | monitors report |",
        "|---|---:|---:|---|",
    ]
    for name in cfgs:
        t = statistics.median(times[name])
        extra = "-" if name == "no monitor" else f"{100 * (t - base) / base:+.1f}%"
        lines.append(f"| {name} | {t:.2f} | {extra} | {'; '.join(reported[name]) or '-'} |")
    default = next(name for name in cfgs if name.startswith("SharpnessMonitor()"))
    default_extra = 100 * (statistics.median(times[default]) - base) / base
    verdict = "met" if default_extra <= 5.0 else "missed"
    lines += [
        "",
        f"Target: at most 5% extra wall time with the default monitor: **{verdict}** in this run "
        f"({default_extra:+.1f}%). The adaptive schedule counts the monitor's whole hook time (checks, probe "
        "capture, loss bookkeeping, logging) against the budget and spaces the checks so that the cumulative "
        "share stays within it; the first check waits until the budget covers its estimated cost (one check on a "
        "256-example probe costs about as much as 200 training steps of this small CNN). The last column is that "
        "accounting. Where the wall-clock extra exceeds it, the difference is time spent outside the monitor's "
        "hooks (training steps running slower after a check), which the schedule does not see; it weighs most on "
        "a model like this one whose steps take about 2 ms.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section("Monitor overhead", markdown)
    return markdown


if __name__ == "__main__":
    main()
