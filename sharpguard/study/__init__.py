"""``sharpguard study``: do sharp minima go with adversarial vulnerability, and do SAM and adversarial
training change that? Trains ten methods over several seeds through sharpguard's Lightning integration,
measures robustness and sharpness, and writes a report with confidence intervals and rank correlations.

- :func:`run_study` / :class:`StudyConfig`: the whole experiment (:mod:`.runner`, :mod:`.config`);
- :mod:`.stats`: means with t intervals, Welch comparisons, Kendall's tau;
- :mod:`.report`: ``report.json`` / ``report.md`` with findings computed from the runs;
- :mod:`.plots`: the figures; :mod:`.history`: ``sharpguard report HISTORY.jsonl``;
- :mod:`.data`: digits and the ``package.module:function`` entry point for your own data.

Importing this package does not import Lightning; :func:`run_study` does, when it trains.
"""

from .config import METHODS, StudyConfig
from .data import StudyData, load_dataset, load_digits
from .history import read_history, report_history, summarize_history
from .report import build_report, write_report
from .runner import StudyResult, run_study
from .stats import kendall_tau, mean_ci, welch_compare

__all__ = [
    "METHODS",
    "StudyConfig",
    "StudyData",
    "StudyResult",
    "build_report",
    "kendall_tau",
    "load_dataset",
    "load_digits",
    "mean_ci",
    "read_history",
    "report_history",
    "run_study",
    "summarize_history",
    "welch_compare",
    "write_report",
]
