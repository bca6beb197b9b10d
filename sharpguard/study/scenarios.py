"""``sharpguard study --scenario NAME``: published laws about sharpness and robustness, reproduced small.

Each scenario trains the study's MLP on digits through :mod:`.train` (Lightning, ``StudyModule``), measures
what the paper measured, and writes ``scenario.json`` and ``scenario.md``: for every claim the published
statement and its source, our estimate with its interval, and a verdict.

* ``robust_overfitting`` - Stutz et al. (ICCV 2021), Rice et al. (ICML 2020), Wu et al. (NeurIPS 2020): over long
  PGD-AT the robust generalization gap grows with the sharpness of the robust loss; the early-stopped
  checkpoint is flatter than the last; AWP shrinks both.
* ``large_batch`` - Keskar et al. (ICLR 2017): large batches converge to sharper minima and generalize worse. The
  learning rate is the confounder (Andriushchenko et al., ICML 2023): the same ``lr`` with a larger batch is a
  smaller ``lr / B``, so a third arm scales ``lr`` linearly with the batch.
* ``rescaling`` - Dinh et al. (ICML 2017): a function-preserving rescaling of two ReLU layers moves lambda_max,
  the trace and plain worst-case sharpness; adaptive sharpness (Kwon et al. 2021) and relative flatness
  (Petzka et al. 2021) do not move.
* ``local_global`` - Walter et al. (ICLR 2026): relative flatness predicts robustness in a small input
  neighbourhood, less so as eps grows; adversarial examples sit in flat regions where the model is confidently
  wrong.

Verdicts. A statistical claim is *held* when the effect has the published sign and its Holm-adjusted p-value
(over the scenario's statistical claims) is below 0.05, *did not hold* when it is significant with the opposite
sign, *inconclusive* otherwise. An exact law (rescaling) is held or not by a stated tolerance.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write_text
from ..errors import ConfigurationError
from .config import StudyConfig
from .data import StudyData, load_dataset
from .measure import probe_batches
from .stats import hedges_g, holm, kendall_tau, mean_ci, welch_compare

ALPHA = 0.05
SCENARIOS: dict[str, str] = {
    "robust_overfitting": "long PGD-AT: robust generalization gap vs robust-loss sharpness over epochs; early "
                          "stopping; AWP (Stutz et al. ICCV 2021; Rice et al. ICML 2020; Wu et al. NeurIPS 2020)",
    "large_batch": "small vs large batch, learning rate as the confounder (Keskar et al. ICLR 2017; Andriushchenko et "
                   "al. ICML 2023)",
    "rescaling": "function-preserving rescaling of ReLU layers: lambda_max moves, adaptive and relative measures do "
                 "not (Dinh et al. ICML 2017)",
    "local_global": "relative flatness vs robust accuracy as eps grows; where adversarial examples sit (Walter et al. "
                    "ICLR 2026)",
}


# Seeds by default: the large-batch effects are about two standard deviations, which three seeds cannot
# separate after Holm's correction (measured: Holm p = 0.23 with 3 seeds, 0.02 with 5); the runs are short.
DEFAULT_SEEDS = {"robust_overfitting": 3, "large_batch": 5, "rescaling": 3, "local_global": 3}
# Epochs by default and with --quick (the --help text is built from this table).
DEFAULT_EPOCHS = {"robust_overfitting": (60, 4), "large_batch": (30, 3), "rescaling": (20, 2), "local_global": (20, 2)}


def _epochs(s: ScenarioSettings, name: str) -> int:
    full, quick = DEFAULT_EPOCHS[name]
    return s.epochs or (quick if s.quick else full)


@dataclass
class ScenarioSettings:
    """Knobs of a scenario run; the defaults take about a minute or two on 2 CPU cores, ``quick`` seconds."""

    seeds: int | None = None  # per-scenario default (DEFAULT_SEEDS) when None
    epochs: int | None = None  # per-scenario default when None
    eps: float = 0.1
    quick: bool = False
    threads: int = 1
    dataset: str = "digits"

    def __post_init__(self) -> None:
        if self.seeds is not None and self.seeds < 2:
            raise ConfigurationError(f"a scenario needs at least 2 seeds for its intervals, got {self.seeds}.")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigurationError(f"epochs must be at least 1, got {self.epochs}.")
        if not 0.0 < self.eps <= 1.0:
            raise ConfigurationError(f"eps must lie in (0, 1] (pixel units), got {self.eps}.")
        if self.threads < 1:
            raise ConfigurationError(f"threads must be at least 1, got {self.threads}.")


@dataclass
class Claim:
    """One published claim and what we measured for it."""

    name: str
    source: str
    published: str
    statistic: str
    estimate: float | None
    low: float | None = None
    high: float | None = None
    interval: str = ""
    n: int | None = None
    p_value: float | None = None
    p_adjusted: float | None = None
    effect_size: float | None = None
    effect_measure: str | None = None
    expected_sign: int = 0  # +1/-1: the published direction of ``estimate``; 0: an exact law with a tolerance
    tolerance: str | None = None
    verdict: str = "inconclusive"
    note: str = ""


@dataclass
class ScenarioResult:
    """A scenario's report (as written to ``scenario.json``) and its files."""

    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


# -- claims and verdicts ----------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating,)):
        return _clean(float(x))
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def difference_claim(name: str, source: str, published: str, a: Sequence[float], b: Sequence[float], what: str,
                     sign: int, note: str = "") -> Claim:
    """``mean(a) - mean(b)`` with its Welch 95% interval, p-value and Hedges' g; ``sign`` the published direction."""
    c = welch_compare(a, b)
    return Claim(name, source, published, f"mean difference {what}", c.difference, c.low, c.high,
                 "95% Welch CI", c.n_a + c.n_b, c.p_value, effect_size=hedges_g(a, b), effect_measure="hedges_g",
                 expected_sign=sign, note=note)


def paired_claim(name: str, source: str, published: str, diffs: Sequence[float], what: str, sign: int,
                 note: str = "") -> Claim:
    """Mean of paired differences with its t interval and one-sample t-test p-value (zero mean under H0)."""
    from scipy import stats

    d = np.asarray([v for v in diffs if v is not None and math.isfinite(v)], dtype=np.float64)
    ci = mean_ci(d)
    p = None
    if d.size >= 2 and d.std(ddof=1) > 0:
        p = float(stats.ttest_1samp(d, 0.0).pvalue)
    elif d.size >= 2 and ci.mean not in (None, 0.0):
        p = 0.0  # every difference equal and nonzero
    dz = float(d.mean() / d.std(ddof=1)) if d.size >= 2 and d.std(ddof=1) > 0 else None
    return Claim(name, source, published, f"mean paired difference {what}", ci.mean, ci.low, ci.high,
                 "95% t interval", int(d.size), p, effect_size=dz, effect_measure="cohens_dz", expected_sign=sign,
                 note=note)


def tau_claim(name: str, source: str, published: str, x: Sequence[float], y: Sequence[float], what: str, sign: int,
              note: str = "", n_boot: int = 1000) -> Claim:
    """Kendall's tau-b of ``(x, y)`` with a bootstrap 95% interval (``n_boot`` resamples of the pairs, fixed seed)."""
    r = kendall_tau(x, y)
    low = high = None
    if r.tau is not None:
        from scipy import stats

        xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        rng = np.random.default_rng(0)
        boot = []
        for _ in range(n_boot):
            idx = rng.integers(0, len(xs), len(xs))
            t = stats.kendalltau(xs[idx], ys[idx]).statistic
            if math.isfinite(t):
                boot.append(t)
        if boot:
            low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return Claim(name, source, published, f"Kendall tau {what}", r.tau, low, high, "95% bootstrap interval", r.n,
                 r.p_value, effect_size=r.tau, effect_measure="kendall_tau", expected_sign=sign, note=note)


def tau_difference_claim(name: str, source: str, published: str, x: Sequence[float], y_a: Sequence[float],
                         y_b: Sequence[float], what: str, sign: int, note: str = "", n_boot: int = 2000) -> Claim:
    """``tau(x, y_b) - tau(x, y_a)`` over the same units, with a paired bootstrap 95% interval and the bootstrap
    two-sided p-value ``2 min(P*(d <= 0), P*(d >= 0))`` (Efron & Tibshirani 1993, sec. 16.4), ``n_boot`` resamples."""
    from scipy import stats

    xs, ya, yb = (np.asarray(v, dtype=float) for v in (x, y_a, y_b))
    ta, tb = kendall_tau(xs, ya).tau, kendall_tau(xs, yb).tau
    est = None if ta is None or tb is None else tb - ta
    rng = np.random.default_rng(0)
    boot = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(xs), len(xs))
        d = stats.kendalltau(xs[idx], yb[idx]).statistic - stats.kendalltau(xs[idx], ya[idx]).statistic
        if math.isfinite(d):
            boot.append(d)
    low = high = p = None
    if boot and est is not None:
        b = np.asarray(boot)
        low, high = (float(v) for v in np.percentile(b, [2.5, 97.5]))
        p = float(min(1.0, 2.0 * min((b <= 0).mean(), (b >= 0).mean())))
    return Claim(name, source, published, what, est, low, high, "95% paired bootstrap interval", int(xs.size), p,
                 effect_size=est, effect_measure="tau_difference", expected_sign=sign, note=note)


def law_claim(name: str, source: str, published: str, value: float, low: float, high: float, what: str,
              held: bool, tolerance: str, note: str = "") -> Claim:
    """An exact law checked against a tolerance: ``value`` is the worst case over seeds, ``[low, high]`` the range."""
    return Claim(name, source, published, what, value, low, high, "range over seeds and scales", None, None,
                 expected_sign=0, tolerance=tolerance, verdict="held" if held else "did not hold", note=note)


SMOKE_TEST = "smoke test"  # the verdict of a --quick run's statistical claims: its models are too weak to judge


def decide(claims: list[Claim], quick: bool = False) -> dict[str, Any]:
    """Holm's correction over the statistical claims, then each claim's verdict. With ``quick`` (a smoke test on
    models trained for seconds) every statistical claim's verdict is :data:`SMOKE_TEST`; an exact law keeps its
    tolerance check, which does not depend on how well the model trained."""
    stat = [c for c in claims if c.expected_sign != 0]
    adjusted = holm([c.p_value for c in stat])
    for c, q in zip(stat, adjusted):
        c.p_adjusted = q
        if quick:
            c.verdict = SMOKE_TEST
            continue
        if c.estimate is None:
            c.verdict = "inconclusive"
        elif q is not None and q < ALPHA:
            c.verdict = "held" if c.estimate * c.expected_sign > 0 else "did not hold"
        else:
            c.verdict = "inconclusive"
    return {"method": "holm", "alpha": ALPHA, "n_tests": sum(c.p_value is not None for c in stat), "smoke_test": quick}


# -- shared helpers ---------------------------------------------------------------------------------------


def _study_config(s: ScenarioSettings, epochs: int, **overrides: Any) -> StudyConfig:
    config = StudyConfig(methods=["sgd"], seeds=s.seeds, epochs=epochs, eps=s.eps, threads=s.threads, ensemble=False)
    config = replace(config, **overrides)
    return config.with_quick() if s.quick else config


def _data(s: ScenarioSettings, config: StudyConfig) -> StudyData:
    data = load_dataset(s.dataset)
    return data.subset(*config.subset) if config.subset is not None else data


def _pgd(config: StudyConfig, seed: int, steps: int | None = None, eps: float | None = None):
    from ..attacks import pgd

    steps = steps or config.eval_pgd_steps
    eps = config.eps if eps is None else eps
    return functools.partial(pgd, eps=eps, alpha=2.5 * eps / steps, steps=steps,
                             generator=torch.Generator().manual_seed(10_000 + seed))


def _robust_acc(model: nn.Module, batches: list, config: StudyConfig, seed: int, steps: int | None = None,
                eps: float | None = None) -> float:
    from ..attacks import robust_accuracy

    return robust_accuracy(model, batches, _pgd(config, seed, steps, eps))


def _mean(xs: Sequence[float]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


# -- robust overfitting -----------------------------------------------------------------------------------


def robust_overfitting(s: ScenarioSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    from .. import sharpness as S
    from ..adversarial import make_method
    from .train import EpochEnd, train_model

    epochs = _epochs(s, "robust_overfitting")
    config = _study_config(s, epochs)
    data = _data(s, config)
    n = 64 if s.quick else 256
    train_eval = [(data.x_train[:n], data.y_train[:n])]
    test_eval = [(data.x_test[:n], data.y_test[:n])]
    attack = {"eps": config.eps, "alpha": config.train_attack_alpha, "steps": config.train_attack_steps}
    curves: dict[str, dict[int, list[dict]]] = {}
    every = 1 if s.quick else max(1, epochs // 10)
    # Rice et al. (2020) see robust overfitting right after the first decay of a piecewise schedule (x0.1 at
    # 50% and 75% of training); a constant learning rate hides it.
    milestones = [epochs // 2, (3 * epochs) // 4] if epochs >= 4 else []
    for arm in ("pgd-at", "awp"):
        curves[arm] = {}
        for seed in range(s.seeds):
            progress(f"robust_overfitting: {arm} seed {seed}")
            rows: list[dict] = []

            def measure(model: nn.Module, epoch: int, rows: list = rows, seed: int = seed) -> None:
                tr = _robust_acc(model, train_eval, config, seed, steps=10)
                te = _robust_acc(model, test_eval, config, seed, steps=10)
                sharp = S.robust_sharpness(model, train_eval, eps=config.eps, attack_steps=config.train_attack_steps,
                                           rho=config.sharpness_rho, steps=config.sharpness_steps, seed=seed)
                rows.append({"epoch": epoch, "robust_train_acc": tr, "robust_test_acc": te, "robust_gap": tr - te,
                             "robust_sharpness": sharp.value, "robust_train_loss": sharp.loss})

            method = (make_method("pgd-at", seed=seed, **attack) if arm == "pgd-at"
                      else make_method("awp", base="pgd-at", gamma=1e-2, seed=seed, **attack))
            train_model(data, config, seed, adversarial_method=method, callbacks=[EpochEnd(measure, every)],
                        lr_milestones=milestones)
            curves[arm][seed] = rows
    src = "Stutz et al., ICCV 2021 (sec. 4-5); Rice et al., ICML 2020"
    claims = []
    # 1. over epochs, the robust gap rises with robust-loss sharpness (pooled over seeds, PGD-AT arm)
    pts = [(r["robust_sharpness"], r["robust_gap"]) for rows in curves["pgd-at"].values() for r in rows]
    claims.append(tau_claim(
        "gap_tracks_robust_sharpness", src,
        "during robust overfitting the robust generalization gap grows together with the sharpness of the robust loss",
        [a for a, _ in pts], [b for _, b in pts], "(robust-loss sharpness, robust gap) over epochs and seeds, PGD-AT",
        +1,
        note="robust-loss sharpness is measured on the training probe; pooled over epochs, the early epochs (robust "
             "loss still high and falling) weigh as much as the late ones", n_boot=200 if s.quick else 1000))
    # 2. the robust gap grows over training: last minus first measured epoch
    claims.append(paired_claim(
        "gap_grows", "Rice et al., ICML 2020 (robust overfitting)",
        "the robust train/test gap widens with long adversarial training",
        [rows[-1]["robust_gap"] - rows[0]["robust_gap"] for rows in curves["pgd-at"].values()],
        "robust gap, last - first epoch (PGD-AT)", +1))
    # 3. early stopping (best robust test accuracy) picks a flatter robust loss than the last epoch
    best_vs_last = []
    for rows in curves["pgd-at"].values():
        best = max(rows, key=lambda r: (r["robust_test_acc"], -r["epoch"]))
        best_vs_last.append(rows[-1]["robust_sharpness"] - best["robust_sharpness"])
    claims.append(paired_claim(
        "early_stopping_flatter", src, "the early-stopped checkpoint has a flatter robust loss than the final one",
        best_vs_last, "robust-loss sharpness, last - early-stopped (PGD-AT)", +1,
        note="early stopping picks the measured epoch with the best robust test accuracy"))
    # 4-5. AWP shrinks the final robust gap and the robust-loss sharpness
    last = {arm: [rows[-1] for rows in curves[arm].values()] for arm in curves}
    src_awp = "Wu et al., NeurIPS 2020 (AWP, sec. 3-4)"
    claims.append(difference_claim(
        "awp_smaller_gap", src_awp, "AWP narrows the robust generalization gap",
        [r["robust_gap"] for r in last["awp"]], [r["robust_gap"] for r in last["pgd-at"]],
        "final robust gap, AWP - PGD-AT", -1))
    claims.append(difference_claim(
        "awp_flatter", src_awp, "AWP flattens the (robust) weight loss landscape",
        [r["robust_sharpness"] for r in last["awp"]], [r["robust_sharpness"] for r in last["pgd-at"]],
        "final robust-loss sharpness, AWP - PGD-AT", -1))
    claims.append(difference_claim(
        "awp_more_robust", src_awp, "AWP improves robust test accuracy",
        [r["robust_test_acc"] for r in last["awp"]], [r["robust_test_acc"] for r in last["pgd-at"]],
        "final robust test accuracy, AWP - PGD-AT", +1))
    return {"claims": claims, "data": {"curves": {a: {str(k): v for k, v in c.items()} for a, c in curves.items()}},
            "settings": {"epochs": epochs, "measured_every": every, "eval_examples": n, "lr_milestones": milestones,
                         **_cfg(config)}}


def _cfg(config: StudyConfig) -> dict[str, Any]:
    keys = ("batch_size", "lr", "momentum", "hidden", "eps", "train_attack_steps", "sharpness_rho", "sharpness_steps",
            "adaptive_sharpness_rho", "probe_size", "quick", "subset")
    d = asdict(config)
    return {k: d[k] for k in keys}


# -- large batch ------------------------------------------------------------------------------------------


def _sharpness_row(model: nn.Module, probe: list, config: StudyConfig, seed: int) -> dict[str, float]:
    from .. import sharpness as S

    return {
        "lambda_max": S.hessian_eigenvalues(model, probe, tol=1e-3, max_iter=40, seed=seed).lambda_max,
        "worst_case_sharpness": S.worst_case_sharpness(model, probe, rho=config.sharpness_rho,
                                                       steps=config.sharpness_steps).value,
        "adaptive_sharpness": S.worst_case_sharpness(model, probe, rho=config.adaptive_sharpness_rho,
                                                     steps=config.sharpness_steps, adaptive=True).value,
        "relative_flatness": S.relative_flatness(model, probe).value,
    }


def large_batch(s: ScenarioSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    from ..attacks import robust_accuracy
    from .train import train_model

    epochs = _epochs(s, "large_batch")
    base = _study_config(s, epochs)
    data = _data(s, base)
    n_train = len(data.y_train)
    small, large = 32, max(64, n_train // 10)  # Keskar et al.: small batch vs ~10% of the data
    arms = {
        "small": replace(base, batch_size=small),
        "large": replace(base, batch_size=large),
        # the linear scaling rule (Goyal et al. 2017) keeps lr / B fixed: separates batch size from lr / B
        "large_scaled_lr": replace(base, batch_size=large, lr=min(base.lr * large / small, 0.5)),
    }
    probe = probe_batches(data.x_train, data.y_train, base.probe_size)
    test = [(data.x_test, data.y_test)]
    train_set = [(data.x_train, data.y_train)]
    runs = []
    for arm, cfg in arms.items():
        for seed in range(s.seeds):
            progress(f"large_batch: {arm} seed {seed}")
            trained = train_model(data, cfg, seed)
            m = trained.model
            train_acc = robust_accuracy(m, train_set, None)
            test_acc = robust_accuracy(m, test, None)
            runs.append({"arm": arm, "seed": seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
                         "lr_over_batch": cfg.lr / cfg.batch_size, "steps": trained.steps, "train_acc": train_acc,
                         "test_acc": test_acc, "generalization_gap": train_acc - test_acc,
                         "pgd_acc": _robust_acc(m, test, cfg, seed), **_sharpness_row(m, probe, cfg, seed)})

    def vals(arm: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["arm"] == arm]

    src = "Keskar et al., ICLR 2017 (sec. 2.1-2.2)"
    claims = [
        difference_claim("large_batch_sharper", src, "large-batch training converges to sharper minimizers (λ_max)",
                         vals("large", "lambda_max"), vals("small", "lambda_max"), "λ_max, large - small batch", +1),
        difference_claim("large_batch_sharper_sam", src, "large-batch minimizers are sharper in the ρ-ball sense",
                         vals("large", "worst_case_sharpness"), vals("small", "worst_case_sharpness"),
                         "worst-case sharpness, large - small batch", +1),
        difference_claim("large_batch_generalizes_worse", src, "large-batch training generalizes worse",
                         vals("large", "test_acc"), vals("small", "test_acc"), "test accuracy, large - small batch",
                         -1),
        difference_claim(
            "confounder_lr_over_batch", "Andriushchenko et al., ICML 2023 (sec. 4); Goyal et al. 2017",
            "with lr / B held fixed (linear scaling), the large batch is no sharper than the small one",
            vals("large_scaled_lr", "lambda_max"), vals("large", "lambda_max"),
            "λ_max, large batch with scaled lr - large batch with the same lr", -1,
            note="held means the sharpness gap is (at least partly) the lr / B ratio, not the batch size"),
    ]
    confounder = {arm: {"batch_size": cfg.batch_size, "lr": cfg.lr, "lr_over_batch": cfg.lr / cfg.batch_size,
                        "steps_per_run": _mean(vals(arm, "steps"))} for arm, cfg in arms.items()}
    table = ["## The confounder: learning rate over batch size", "",
             "| arm | batch | lr | lr / B | steps | λ_max | worst-case sharpness | adaptive sharpness | κ | train "
             "acc | test acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, c in confounder.items():
        table.append(f"| {arm} | {c['batch_size']} | {c['lr']:.3g} | {c['lr_over_batch']:.2g} | "
                     f"{c['steps_per_run']:.0f} | "
                     + " | ".join(_fmt(_mean(vals(arm, k)), ".3g" if "acc" not in k else ".3f") for k in
                                  ("lambda_max", "worst_case_sharpness", "adaptive_sharpness", "relative_flatness",
                                   "train_acc", "test_acc")) + " |")
    return {"claims": claims, "data": {"runs": runs, "confounder": confounder}, "markdown": table,
            "settings": {"epochs": epochs, "arms": confounder, **_cfg(base)}}


# -- rescaling --------------------------------------------------------------------------------------------


def rescale(model: nn.Sequential, first: int, second: int, alpha: float) -> nn.Sequential:
    """Dinh et al. (2017, sec. 4): multiply linear layer ``first`` (weight and bias) by ``alpha`` and linear
    layer ``second`` (weight) by ``1 / alpha``; with only ReLUs between them the function is unchanged."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[first].weight.mul_(alpha)
        out[first].bias.mul_(alpha)
        out[second].weight.div_(alpha)
    return out


def rescaling(s: ScenarioSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    from .train import train_model

    epochs = _epochs(s, "rescaling")
    config = _study_config(s, epochs)
    data = _data(s, config)
    probe = probe_batches(data.x_train, data.y_train, config.probe_size)
    alphas = [0.2, 5.0] if s.quick else [0.1, 0.5, 2.0, 10.0]
    linear = None
    rows = []
    for seed in range(s.seeds):
        progress(f"rescaling: seed {seed}")
        model = train_model(data, config, seed).model
        linear = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
        ref = _rescaling_row(model, probe, config, seed)
        x = data.x_test
        with torch.no_grad():
            logits = model(x)
        for pair in zip(linear[:-1], linear[1:]):
            for a in alphas:
                scaled = rescale(model, pair[0], pair[1], a)
                with torch.no_grad():
                    diff = float((scaled(x) - logits).abs().max() / logits.abs().max())
                row = _rescaling_row(scaled, probe, config, seed)
                rows.append({"seed": seed, "layers": list(pair), "alpha": a, "max_rel_logit_change": diff,
                             **{f"ratio_{k}": row[k] / ref[k] if ref[k] else None for k in row},
                             **{k: row[k] for k in row}, **{f"ref_{k}": ref[k] for k in ref}})

    def spread(key: str) -> tuple[float, float, float]:
        """(worst |log ratio| as a factor, min ratio, max ratio) over seeds, layer pairs and alphas."""
        r = [row[f"ratio_{key}"] for row in rows if row[f"ratio_{key}"] is not None and row[f"ratio_{key}"] > 0]
        return max(max(v, 1 / v) for v in r), min(r), max(r)

    src = "Dinh et al., ICML 2017 (sec. 4-5)"
    claims = []
    logit_change = max(r["max_rel_logit_change"] for r in rows)
    claims.append(law_claim("function_preserved", src, "the rescaled network computes the same function",
                            logit_change, 0.0, logit_change, "max relative change of the logits", logit_change < 1e-5,
                            "< 1e-5 (float32 rounding)"))
    for key, label in (("lambda_max", "λ_max"), ("worst_case_sharpness", "worst-case sharpness (l2 ρ-ball)"),
                       ("robust_sharpness", "robust-loss sharpness (l2 ρ-ball)")):
        factor, lo, hi = spread(key)
        claims.append(law_claim(f"{key}_moves", src, f"{label} can be made arbitrarily larger or smaller",
                                factor, lo, hi, f"largest factor by which {label} changed (ratio range)",
                                factor > 1.5, "> 1.5x for some alpha"))
    for key, label, source in (
        ("adaptive_sharpness", "adaptive sharpness", "Kwon et al., ICML 2021 (ASAM, Thm. 2)"),
        ("relative_flatness", "relative flatness κ", "Petzka et al., NeurIPS 2021 (Thm. 5)"),
        ("input_curvature", "input-Hessian λ_max",
         "a function of the input only (CURE, Moosavi-Dezfooli et al. 2019)"),
    ):
        factor, lo, hi = spread(key)
        tol = {"adaptive_sharpness": 0.05, "relative_flatness": 1e-4, "input_curvature": 1e-3}[key]
        claims.append(law_claim(f"{key}_invariant", source, f"{label} is invariant to this reparametrization",
                                factor - 1.0, lo - 1.0, hi - 1.0,
                                f"largest relative change of {label} (range of ratio - 1)",
                                factor - 1.0 <= tol, f"<= {tol:g}",
                                note={"adaptive_sharpness": "the ascent of adaptive sharpness is iterative (a few "
                                                            "steps from a fixed start), hence the looser tolerance",
                                      "input_curvature": "Lanczos stops at a 1e-3 residual; the same function gives "
                                                         "the same products up to float32 rounding"}.get(key, "")))
    return {"claims": claims, "data": {"rows": rows, "linear_layers": linear},
            "settings": {"epochs": epochs, "alphas": alphas, **_cfg(config)}}


def _rescaling_row(model: nn.Module, probe: list, config: StudyConfig, seed: int) -> dict[str, float]:
    """The weight-space measures plus two that depend on the function only (input curvature) or also on the
    weights (the robust loss's sharpness in a plain l2 ball)."""
    from .. import sharpness as S

    return {
        **_sharpness_row(model, probe, config, seed),
        "input_curvature": S.input_hessian_eigenvalue(model, probe, n_examples=config.curvature_examples,
                                                      seed=seed).mean,
        "robust_sharpness": S.robust_sharpness(model, probe, eps=config.eps, attack_steps=config.train_attack_steps,
                                               rho=config.sharpness_rho, steps=config.sharpness_steps, seed=seed).value,
    }


# -- local vs global ----------------------------------------------------------------------------------------


def local_global(s: ScenarioSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    from .. import sharpness as S
    from ..adversarial import make_method
    from .train import train_model

    epochs = _epochs(s, "local_global")
    config = _study_config(s, epochs)
    data = _data(s, config)
    probe = probe_batches(data.x_train, data.y_train, config.probe_size)
    n_test = 64 if s.quick else 360
    test = [(data.x_test[:n_test], data.y_test[:n_test])]
    eps_grid = [0.02, 0.1, 0.3] if s.quick else [0.02, 0.05, 0.1, 0.2, 0.3]
    # Models that differ in flatness and robustness: plain SGD, SGD with weight decay, and PGD adversarial training
    arms: dict[str, Callable[[int], Any]] = {
        "sgd": lambda seed: {},
        "weight-decay": lambda seed: {"weight_decay": config.weight_decay},
        "pgd-at": lambda seed: {"adversarial_method": make_method(
            "pgd-at", eps=config.eps, alpha=config.train_attack_alpha, steps=config.train_attack_steps, seed=seed)},
    }
    models = []
    for arm, kwargs in arms.items():
        for seed in range(s.seeds):
            progress(f"local_global: {arm} seed {seed}")
            m = train_model(data, config, seed, **kwargs(seed)).model
            row = {"arm": arm, "seed": seed, "relative_flatness": S.relative_flatness(m, probe).value}
            for eps in eps_grid:
                row[f"robust_acc@{eps}"] = _robust_acc(m, test, config, seed, eps=eps)
                geo = S.adversarial_geometry(m, test, eps=eps, attack_steps=config.eval_pgd_steps, seed=seed,
                                             n_curvature=8 if s.quick else 32)
                row[f"fooled@{eps}"] = geo.fooled
                row[f"confidence_fooled@{eps}"] = geo.adv_confidence_fooled
                row[f"input_curvature_adv@{eps}"] = geo.adv_curvature
                row[f"input_curvature_clean@{eps}"] = geo.clean_curvature
                row[f"kappa_ratio@{eps}"] = _kappa_at_adversarial(m, test, config, seed, eps)
            models.append(row)
    src = "Walter et al., ICLR 2026 (arXiv 2510.14231, sec. 4-6)"
    kappa = [r["relative_flatness"] for r in models]
    small, big = eps_grid[0], eps_grid[-1]
    claims = [
        tau_claim("flat_is_locally_robust", src,
                  "relative flatness bounds the loss change in a small input neighbourhood: flatter models are more "
                  f"robust at small eps (here eps = {small})",
                  kappa, [r[f"robust_acc@{small}"] for r in models],
                  f"(κ, robust accuracy at eps = {small}) across models",
                  -1, n_boot=200 if s.quick else 1000),
        tau_difference_claim(
            "flat_is_not_globally_robust", src,
            f"the bound is local: as eps grows (here {small} -> {big}) relative flatness predicts robustness less, "
            "so τ(κ, robust accuracy) moves up toward 0",
            kappa, [r[f"robust_acc@{small}"] for r in models], [r[f"robust_acc@{big}"] for r in models],
            f"τ(κ, robust acc at eps = {big}) - τ(κ, robust acc at eps = {small}) across models", +1,
            n_boot=200 if s.quick else 2000),
    ]
    ratios = [r[f"kappa_ratio@{s.eps}"] for r in models if r[f"kappa_ratio@{s.eps}"] is not None]
    claims.append(paired_claim(
        "adversarial_examples_flat", src,
        f"adversarial examples sit in flat regions: relative flatness at the fooling PGD examples (eps = {s.eps}) is "
        "below that at their clean originals", [math.log(v) for v in ratios if v > 0],
        "log(κ at fooling adversarial examples / κ at their clean inputs), one per model", -1))
    conf = [r[f"confidence_fooled@{s.eps}"] for r in models if r[f"confidence_fooled@{s.eps}"] is not None]
    claims.append(paired_claim(
        "confidently_wrong", src,
        "the model is confidently wrong there: mean top-class probability at fooling examples (eps = "
        f"{s.eps}) above 1/2",
        [c - 0.5 for c in conf], "confidence at fooling adversarial examples - 0.5, one per model", +1))
    taus = {}
    for eps in eps_grid:
        t = kendall_tau(kappa, [r[f"robust_acc@{eps}"] for r in models])
        taus[str(eps)] = {"tau": t.tau, "p_value": t.p_value, "n": t.n}
    table = ["## Relative flatness against robust accuracy, eps by eps", "",
             "| eps | " + " | ".join(f"{arm} robust acc" for arm in arms) + " | τ(κ, robust acc) | p |",
             "|---|" + "---|" * (len(arms) + 2)]
    for eps in eps_grid:
        accs = [_fmt(_mean([r[f"robust_acc@{eps}"] for r in models if r["arm"] == arm]), ".3f") for arm in arms]
        t = taus[str(eps)]
        table.append(f"| {eps} | " + " | ".join(accs) + f" | {_fmt(t['tau'], '.2f')} | {_fmt(t['p_value'], '.2g')} |")
    table += ["", "Mean κ (training probe): " + ", ".join(
        f"{arm} {_fmt(_mean([r['relative_flatness'] for r in models if r['arm'] == arm]))}" for arm in arms) + "."]
    return {"claims": claims, "data": {"models": models, "tau_by_eps": taus}, "markdown": table,
            "settings": {"epochs": epochs, "eps_grid": eps_grid, "test_examples": n_test, **_cfg(config)}}


def _kappa_at_adversarial(model: nn.Module, test: list, config: StudyConfig, seed: int, eps: float) -> float | None:
    """κ (the closed form, true labels) at the PGD examples that fool the model, over κ at their clean inputs."""
    from .. import sharpness as S
    from .._batches import logits_of

    x, y = test[0]
    x_adv = _pgd(config, seed, eps=eps)(model, x, y)
    with torch.no_grad():
        fooled = logits_of(model(x_adv)).argmax(-1) != y
    if int(fooled.sum()) < 2:
        return None
    adv = S.relative_flatness(model, [(x_adv[fooled], y[fooled])]).value
    clean = S.relative_flatness(model, [(x[fooled], y[fooled])]).value
    return adv / clean if clean > 0 else None


# -- running and writing ------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[ScenarioSettings, Callable[[str], None]], dict[str, Any]]] = {
    "robust_overfitting": robust_overfitting,
    "large_batch": large_batch,
    "rescaling": rescaling,
    "local_global": local_global,
}


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def render_markdown(report: Mapping[str, Any]) -> str:
    """``scenario.md``: what was run, then one table row per claim."""
    lines = [f"# sharpguard study --scenario {report['scenario']}", "", report["description"], ""]
    st = report["settings"]
    lines.append(f"Seeds: {st.get('seeds')}. Epochs: {st.get('epochs')}. eps = {st.get('eps')} (l∞). "
                 f"Quick: {st.get('quick')}. Wall time: {report['seconds']:.0f} s.")
    fam = report["multiple_comparisons"]
    if fam.get("smoke_test"):
        lines[0] += " (smoke test: --quick, no verdicts)"
        lines += ["", "**Smoke test (--quick): a few epochs on a subset of the data with cheap measurements. It shows "
                      "that every stage runs; its numbers support no statistical verdict, so those claims read "
                      "'smoke test' (an exact law keeps its tolerance check).**"]
    rule = ("Verdicts: every claim here is an exact law, checked against the tolerance shown."
            if fam["n_tests"] == 0 else
            "Verdicts: statistical claims are *held* when the effect has the published sign and the Holm-adjusted "
            f"p-value over this scenario's {fam['n_tests']} tests is below {fam['alpha']}, *did not hold* when it is "
            "significant the other way, *inconclusive* otherwise; exact laws are checked against the tolerance shown.")
    lines += ["", rule,
              "", "| claim | published (source) | our number | interval | p (Holm) | effect size | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in report["claims"]:
        interval = f"[{_fmt(c['low'])}, {_fmt(c['high'])}] ({c['interval']})" if c["low"] is not None else "n/a"
        p = "—" if c["p_value"] is None else f"{_fmt(c['p_value'])} ({_fmt(c['p_adjusted'])})"
        if c["tolerance"]:
            p = f"tolerance {c['tolerance']}"
        eff = "—" if c["effect_size"] is None else f"{c['effect_measure']} = {_fmt(c['effect_size'])}"
        lines.append(f"| {c['name']} | {c['published']} ({c['source']}) | {c['statistic']}: **{_fmt(c['estimate'])}** "
                     f"(n = {c['n'] if c['n'] is not None else '—'}) | {interval} | {p} | {eff} | "
                     f"**{c['verdict']}** |")
    notes = [c for c in report["claims"] if c.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {c['name']}: {c['note']}" for c in notes]
    if report.get("markdown"):
        lines += [""] + list(report["markdown"])
    lines += ["", "## Settings", "", "```json", json.dumps(report["settings"], indent=2, default=str), "```", ""]
    return "\n".join(lines)


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """One console line per claim, verdict first (a smoke test says so first)."""
    out = []
    if report["multiple_comparisons"].get("smoke_test"):
        out.append("smoke test (--quick): no verdicts; run without --quick to judge the claims")
    for c in report["claims"]:
        interval = f" [{_fmt(c['low'])}, {_fmt(c['high'])}]" if c["low"] is not None else ""
        p = f", Holm p = {_fmt(c['p_adjusted'])}" if c["p_adjusted"] is not None else ""
        out.append(f"{c['verdict']:>13}: {c['name']} - {c['statistic']} = {_fmt(c['estimate'])}{interval}{p}")
    return out


def run_scenario(name: str, out_dir: str | Path, settings: ScenarioSettings | None = None,
                 progress: bool = True) -> ScenarioResult:
    """Run scenario ``name`` and write ``scenario.json`` and ``scenario.md`` into ``out_dir``."""
    if name not in RUNNERS:
        raise ConfigurationError(f"unknown scenario {name!r}; choose one of {', '.join(RUNNERS)}.")
    settings = settings or ScenarioSettings()
    if settings.seeds is None:
        settings = replace(settings, seeds=2 if settings.quick else DEFAULT_SEEDS[name])
    load_dataset(settings.dataset)  # bad data fails here, before anything is written
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"--out {str(out)!r} is not a folder; pass a new or existing folder.")
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    say = (lambda msg: print(f"  {msg}", flush=True)) if progress else (lambda msg: None)
    try:
        from .train import _quiet_lightning

        _quiet_lightning()
        result = RUNNERS[name](settings, say)
    finally:
        torch.set_num_threads(previous)
    claims: list[Claim] = result["claims"]
    family = decide(claims, quick=settings.quick)
    report = _clean({
        "scenario": name,
        "description": SCENARIOS[name],
        "claims": [asdict(c) for c in claims],
        "multiple_comparisons": family,
        "data": result["data"],
        "markdown": result.get("markdown", []),
        "settings": {**asdict(settings), **result["settings"]},
        "seconds": time.perf_counter() - start,
    })
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "scenario.json", out / "scenario.md"
    atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    atomic_write_text(md_path, render_markdown(report))
    return ScenarioResult(report=report, files=[json_path, md_path], summary=summary_lines(report))
