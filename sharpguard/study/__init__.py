"""``sharpguard study``: do sharp minima go with adversarial vulnerability, and do SAM and adversarial
training change that? Trains ten methods over several seeds through sharpguard's Lightning integration,
measures robustness and sharpness, and writes a report with confidence intervals and rank correlations.

- :func:`run_study` / :class:`StudyConfig`: the whole experiment (:mod:`.runner`, :mod:`.config`);
- :mod:`.stats`: means with t intervals, Welch comparisons with Hedges' g, Kendall's tau, Holm and
  Benjamini-Hochberg corrections;
- :mod:`.report`: ``report.json`` / ``report.md`` with findings computed from the runs (Holm-corrected);
- :mod:`.scenarios`: ``--scenario NAME``, published laws reproduced small (:func:`run_scenario`);
- :mod:`.plots`: the figures; :mod:`.history`: ``sharpguard report HISTORY.jsonl``;
- :mod:`.data`: digits and the ``package.module:function`` entry point for your own data.

Importing this package does not import Lightning; :func:`run_study` does, when it trains.
"""

from .config import METHODS, StudyConfig
from .data import StudyData, load_dataset, load_digits
from .history import read_history, report_history, summarize_history
from .report import build_report, write_report
from .runner import StudyResult, run_study
from .scenarios import SCENARIOS, ScenarioResult, ScenarioSettings, run_scenario
from .stats import benjamini_hochberg, hedges_g, holm, kendall_tau, mean_ci, welch_compare

__all__ = [
    "METHODS",
    "SCENARIOS",
    "ScenarioResult",
    "ScenarioSettings",
    "StudyConfig",
    "StudyData",
    "StudyResult",
    "benjamini_hochberg",
    "build_report",
    "hedges_g",
    "holm",
    "kendall_tau",
    "load_dataset",
    "load_digits",
    "mean_ci",
    "read_history",
    "report_history",
    "run_scenario",
    "run_study",
    "summarize_history",
    "welch_compare",
    "write_report",
]
