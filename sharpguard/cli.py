"""The ``sharpguard`` command.

``sharpguard study``   train every method over several seeds on digits (or your data), measure robustness and
                       sharpness, write report.json, report.md and plots.
``sharpguard report``  summarize and plot the JSON-lines history a monitor wrote during your own run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import SharpGuardError


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .study.config import ENSEMBLE, METHODS
    from .study.scenarios import DEFAULT_EPOCHS, SCENARIOS

    parser = argparse.ArgumentParser(
        prog="sharpguard",
        description="Sharpness-aware training, adversarial training and sharpness/robustness monitoring.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{study,report}")

    study = sub.add_parser(
        "study",
        help="compare training methods on sharpness and adversarial robustness",
        description=(
            "Train each method over several seeds through sharpguard's Lightning integration (monitors attached), "
            "measure clean/FGSM/PGD-20 accuracy, lambda_max, Hessian trace, worst-case and adaptive sharpness, "
            "relative flatness, robust-loss sharpness and input-space curvature, and write report.json, report.md "
            "(Holm-corrected findings) and PNG plots. Methods: " + ", ".join(list(METHODS) + [ENSEMBLE])
            + ". With --scenario NAME, "
            "reproduce one published law instead and write scenario.json and scenario.md."
        ),
    )
    study.add_argument("--out", default=None,
                       help="output folder (default: ./sharpguard-study, or ./sharpguard-<scenario> with --scenario)")
    study.add_argument("--scenario", default=None, choices=sorted(SCENARIOS),
                       help="reproduce one published law instead of the method comparison: "
                            + "; ".join(f"{k}: {v}" for k, v in SCENARIOS.items()))
    study.add_argument("--methods", type=_methods, default=None,
                       help="comma-separated methods (default: all ten plus the sgd ensemble)")
    study.add_argument("--seeds", type=int, default=None,
                       help="seeds per method (default 3, 5 for --scenario large_batch; 2 with --quick)")
    study.add_argument("--epochs", type=int, default=None,
                       help="training epochs (default 30, 2 with --quick; with --scenario: "
                            + ", ".join(f"{k} {full} ({quick} with --quick)"
                                        for k, (full, quick) in DEFAULT_EPOCHS.items())
                            + ")")
    study.add_argument("--dataset", default="digits",
                       help="'digits' (scikit-learn's bundled 8x8 digits) or 'package.module:function' returning "
                            "(x_train, y_train, x_test, y_test) with inputs in [0, 1]")
    study.add_argument("--eps", type=float, default=None, help="linf attack radius in [0, 1] pixel units (default 0.1)")
    study.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default 1: the study's small models run fastest single-threaded)")
    study.add_argument("--no-ensemble", action="store_true", help="skip the ensemble of the sgd models")
    study.add_argument("--quick", action="store_true", help="a tiny run (subset of the data, cheap measurements)")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = sub.add_parser(
        "report",
        help="plot and summarize a monitor history (JSON lines)",
        description="Read the JSON-lines histories SharpnessMonitor/RobustnessMonitor wrote and write "
                    "history.png (constant metrics left out), summary.md and summary.json.",
    )
    report.add_argument("history", nargs="+",
                        help="one or more history files (JSON lines: step, metric, value, settings); several are "
                             "merged into one figure, one line per file")
    report.add_argument("--out", default=None, help="output folder (default: beside the history file)")
    return parser


def _check_out_dir(out) -> None:
    """An ``--out`` that is, or lies under, an existing file: say so before anything runs (not a
    FileExistsError or NotADirectoryError later)."""
    from .study.history import check_out_dir

    check_out_dir(out)


def _scenario(args: argparse.Namespace) -> int:
    from .errors import ConfigurationError
    from .study.scenarios import ScenarioSettings, run_scenario

    ignored = [flag for flag, value in (("--methods", args.methods), ("--no-ensemble", args.no_ensemble)) if value]
    if ignored:
        raise ConfigurationError(f"{' and '.join(ignored)} do not apply to --scenario; drop them.")
    settings = ScenarioSettings(seeds=args.seeds,
                                epochs=args.epochs, quick=args.quick, threads=args.threads, dataset=args.dataset,
                                **({"eps": args.eps} if args.eps is not None else {}))
    out = args.out if args.out is not None else f"sharpguard-{args.scenario.replace('_', '-')}"
    _check_out_dir(out)
    start = time.perf_counter()
    result = run_scenario(args.scenario, out, settings, progress=not args.no_progress)
    print(f"sharpguard study --scenario {args.scenario}: wrote {', '.join(str(p) for p in result.files)} "
          f"in {time.perf_counter() - start:.0f} s")
    for line in result.summary:
        print(f"  {line}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from .study.config import METHODS, StudyConfig
    from .study.runner import run_study

    if args.scenario is not None:
        return _scenario(args)
    if args.out is None:
        args.out = "sharpguard-study"

    kwargs = {"dataset": args.dataset, "ensemble": not args.no_ensemble, "threads": args.threads}
    kwargs["methods"] = args.methods if args.methods is not None else list(METHODS)
    kwargs["seeds"] = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    elif args.quick:
        kwargs["epochs"] = 2
    if args.eps is not None:
        kwargs["eps"] = args.eps
    config = StudyConfig(**kwargs)
    _check_out_dir(args.out)
    if args.quick:
        config = config.with_quick()
    start = time.perf_counter()
    result = run_study(config, args.out, progress=not args.no_progress)
    print(f"sharpguard study: wrote {', '.join(str(p) for p in result.files)} in {time.perf_counter() - start:.0f} s")
    for line in result.headline:
        print(f"  {line}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import os
    import warnings
    from pathlib import Path

    from .errors import ConfigurationError
    from .monitor.history import HistoryWarning
    from .study.history import report_history

    first = Path(args.history[0]).resolve()
    default = first.parent / (first.stem + "-report" if len(args.history) == 1 else "merged-report")
    out = args.out if args.out is not None else default
    try:
        _check_out_dir(out)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HistoryWarning)
            files = report_history(args.history, out)
    except OSError as exc:  # a folder that cannot be read or written: one line, not a traceback
        where = f" {os.fspath(exc.filename)!r}" if exc.filename is not None else ""
        raise ConfigurationError(f"cannot read or write{where} ({exc.strerror or type(exc).__name__}); "
                                 "check the history files and the --out folder.") from None
    for w in caught:
        if not issubclass(w.category, HistoryWarning):
            continue
        print(f"sharpguard report: note: {w.message}", file=sys.stderr)
    print("sharpguard report: wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sharpguard`` console script and of ``python -m sharpguard``."""
    args = build_parser().parse_args(argv)
    try:
        return _study(args) if args.command == "study" else _report(args)
    except SharpGuardError as exc:
        print(f"sharpguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
