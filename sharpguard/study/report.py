"""Turn the study's per-run measurements into ``report.json`` and ``report.md``.

Every sentence in the report's findings is computed from the runs: the comparisons (Welch's t-test over
seeds, with Hedges' g beside it), the rank correlations (Kendall's tau, itself an effect size) and the
verdicts. Every p-value the report computes is one test of one family: Holm's correction runs across all of
them (:func:`apply_correction`), and a finding is called supported only when its *adjusted* p-value is below
``ALPHA``. Nothing is hard-coded: if SAM is not flatter than SGD on a given run of the study, the report says
so and lists what the data point to as reasons.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text
from .stats import benjamini_hochberg, bounded_mean_ci, hedges_g, holm, kendall_tau, positive_mean_ci, welch_compare

# (key, column title, format) of every per-run metric, in table order.
METRICS: list[tuple[str, str, str]] = [
    ("clean_acc", "clean acc", ".3f"),
    ("pgd_acc", "PGD-20 acc", ".3f"),
    ("fgsm_acc", "FGSM acc", ".3f"),
    ("pgd_margin_acc", "PGD-20 margin acc", ".3f"),
    ("robust_acc", "worst-case robust acc", ".3f"),
    ("lambda_max", "λ_max", ".3g"),
    ("trace", "tr(H)", ".3g"),
    ("worst_case_sharpness", "worst-case sharpness", ".3g"),
    ("adaptive_sharpness", "adaptive sharpness", ".3g"),
    ("relative_flatness", "relative flatness κ", ".3g"),
    ("robust_sharpness", "robust-loss sharpness", ".3g"),
    ("input_curvature", "input-Hessian λ_max", ".3g"),
    ("adv_confidence", "confidence when fooled", ".3f"),
    ("adv_input_curvature", "input λ_max at PGD examples", ".3g"),
    ("train_time_s", "train time (s)", ".1f"),
]
# Metrics that are fractions by definition: their intervals stay within [0, 1]. Every other metric gets an
# interval on log scale when all its values are positive (stats.positive_mean_ci), so it never crosses zero.
FRACTIONS = frozenset({"clean_acc", "pgd_acc", "fgsm_acc", "pgd_margin_acc", "robust_acc", "adv_confidence"})
# The few columns a reader needs first; the full table comes last in report.md.
KEY_METRICS = ["clean_acc", "robust_acc", "lambda_max", "robust_sharpness", "input_curvature"]
SHARPNESS_MEASURES = ["lambda_max", "trace", "worst_case_sharpness", "adaptive_sharpness", "relative_flatness",
                      "robust_sharpness", "input_curvature"]
# Robust accuracy for the correlations: an example counts only if it survives FGSM, PGD-20 on cross
# entropy and PGD-20 on the margin loss, so gradient masking cannot inflate it.
ROBUST_METRIC = "robust_acc"
ADVERSARIAL_METHODS = frozenset({"pgd-at", "trades", "fast-at"})
ALPHA = 0.05  # family-wise significance level of every verdict (after Holm's correction)
CORRECTIONS = {"holm": holm, "benjamini-hochberg": benjamini_hochberg}


def _values(runs: Sequence[Mapping[str, Any]], method: str, metric: str) -> list[float]:
    return [float(r[metric]) for r in runs if r["method"] == method and r.get(metric) is not None]


def _methods(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in runs:
        seen.setdefault(r["method"], None)
    return list(seen)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _p(p: float | None, adjusted: float | None = None) -> str:
    if p is None:
        return "p undefined"
    text = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    if adjusted is not None:
        text += ", Holm-adjusted " + ("p < 0.001" if adjusted < 0.001 else f"p = {adjusted:.3f}")
    return text


def _significant(entry: Mapping[str, Any]) -> bool:
    """Significant after the correction (the adjusted p-value, never the raw one)."""
    q = entry.get("p_adjusted")
    return q is not None and q < ALPHA


def apply_correction(tests: list[dict], method: str = "holm") -> None:
    """Write ``p_adjusted`` into every test dict (each has ``p_value``, ``None`` when undefined), corrected
    across all of them at once: the family is every test the report makes."""
    adjusted = CORRECTIONS[method]([t.get("p_value") for t in tests])
    for t, q in zip(tests, adjusted):
        t["p_adjusted"] = q


def interval(values: Sequence[float], metric: str, level: float = 0.95):
    """The confidence interval of ``metric``'s mean over seeds that respects what the quantity can be: within
    [0, 1] for a fraction, on log scale (around the geometric mean) for a quantity measured positive on
    every seed, the plain t-interval otherwise."""
    return bounded_mean_ci(values, level) if metric in FRACTIONS else positive_mean_ci(values, level)


def summarize(runs: Sequence[Mapping[str, Any]], level: float = 0.95) -> dict[str, dict[str, dict]]:
    """``{method: {metric: MeanCI as dict}}`` over the seeds of each method (see :func:`interval`)."""
    return {
        m: {key: interval(_values(runs, m, key), key, level).as_dict() for key, _, _ in METRICS}
        for m in _methods(runs)
    }


def correlations(runs: Sequence[Mapping[str, Any]], robust: str = ROBUST_METRIC) -> dict[str, dict[str, dict]]:
    """Kendall's tau between each sharpness measure and ``robust`` accuracy.

    Three views: ``all_runs`` (every model is a point), ``no_adversarial_training`` (without the
    adversarially trained methods, which are robust by construction and would dominate the ranking) and
    ``method_means`` (one point per method: the mean over its seeds).
    """
    standard = [r for r in runs if r["method"] not in ADVERSARIAL_METHODS]
    means = [
        {"method": m, **{k: (sum(v) / len(v) if (v := _values(runs, m, k)) else None) for k, _, _ in METRICS}}
        for m in _methods(runs)
    ]
    views = {"all_runs": list(runs), "no_adversarial_training": standard, "method_means": means}
    out: dict[str, dict[str, dict]] = {}
    for view, points in views.items():
        out[view] = {}
        for measure in SHARPNESS_MEASURES:
            pairs = [(p[measure], p[robust]) for p in points
                     if p.get(measure) is not None and p.get(robust) is not None]
            rc = kendall_tau([a for a, _ in pairs], [b for _, b in pairs])
            out[view][measure] = {"against": robust, **rc.as_dict()}
    return out


def _compare(runs, a: str, b: str, metric: str, level: float) -> dict | None:
    if not _values(runs, a, metric) or not _values(runs, b, metric):
        return None
    xa, xb = _values(runs, a, metric), _values(runs, b, metric)
    return {"a": a, "b": b, "metric": metric, **welch_compare(xa, xb, level).as_dict(), "hedges_g": hedges_g(xa, xb)}


# The study's hypotheses: (method, baseline, metric, expected sign of mean(method) - mean(baseline)).
HYPOTHESES: list[tuple[str, str, str, int]] = [
    ("sam", "sgd", "lambda_max", -1),
    ("asam", "sgd", "adaptive_sharpness", -1),
    ("pgd-at", "sgd", "pgd_acc", +1),
    ("trades", "sgd", "pgd_acc", +1),
    ("fast-at", "sgd", "pgd_acc", +1),
]


def _verdict(cmp: dict, sign: int) -> str:
    diff = cmp["difference"]
    if diff is None:
        return "not measured"
    if diff * sign <= 0:
        return "contradicted"
    if _significant(cmp):
        return "supported"
    return "direction only"


def _why_not(runs, method: str, metric: str, settings: Mapping[str, Any], level: float) -> list[str]:
    """Reasons, read off the data, why a hypothesis failed; each is a checked fact, not a guess."""
    reasons: list[str] = []
    n = len(_values(runs, method, metric))
    reasons.append(f"only {n} seed(s) per method and {settings.get('epochs', '?')} epoch(s) of training")
    if metric in ("lambda_max", "adaptive_sharpness"):
        for other in ("worst_case_sharpness", "adaptive_sharpness", "trace", "lambda_max"):
            if other == metric:
                continue
            c = _compare(runs, method, "sgd", other, level)
            if c and c["difference"] is not None and c["difference"] < 0:
                reasons.append(
                    f"{method}'s {other} is lower than sgd's ({_fmt(c['mean_a'])} vs {_fmt(c['mean_b'])}), so it did "
                    f"flatten by that measure; λ_max and the other measures are not reparametrization-invariant "
                    "(Dinh et al., 2017) and need not move together"
                )
                break
        ca = _compare(runs, method, "sgd", "clean_acc", level)
        if ca and ca["difference"] is not None and ca["difference"] < 0:
            reasons.append(
                f"{method} reached lower clean accuracy than sgd ({_fmt(ca['mean_a'], '.3f')} vs "
                f"{_fmt(ca['mean_b'], '.3f')}): the runs stopped at different points of training, where curvature "
                "differs"
            )
        sgd_lam = _values(runs, "sgd", "lambda_max")
        lr, beta = settings.get("lr"), settings.get("momentum", 0.0)
        if sgd_lam and lr:
            # Stability threshold of heavy-ball SGD on a quadratic: lambda < 2 (1 + beta) / lr (Cohen et al., 2021).
            threshold = 2.0 * (1.0 + beta) / lr
            mean_sgd = sum(sgd_lam) / len(sgd_lam)
            if mean_sgd < 0.5 * threshold:
                reasons.append(
                    f"sgd's λ_max ({_fmt(mean_sgd)}) sits far below the stability threshold 2(1+β)/lr = "
                    f"{_fmt(threshold)}, so nothing pushes the runs toward sharp regions and SAM (rho = "
                    f"{settings.get('rho', '?')}) has little to flatten"
                )
    if metric == "pgd_acc":
        pgd, fgsm = _values(runs, "sgd", "pgd_acc"), _values(runs, "sgd", "fgsm_acc")
        if pgd and fgsm and sum(fgsm) / len(fgsm) < sum(pgd) / len(pgd) - 0.02:
            reasons.append("sgd's FGSM accuracy is below its PGD accuracy: PGD was too weak against the baseline "
                           "(gradient masking or too few steps), which inflates the baseline's figure")
        ca = _compare(runs, method, "sgd", "clean_acc", level)
        if ca and ca["mean_a"] is not None and ca["mean_a"] < 0.5:
            reasons.append(
                f"{method} did not fit the data (clean accuracy {_fmt(ca['mean_a'], '.3f')}): eps = "
                f"{settings.get('eps', '?')} may be too large for this model, or training too short"
            )
    return reasons


def _g(cmp: Mapping[str, Any]) -> str:
    g = cmp.get("hedges_g")
    return "Hedges' g undefined" if g is None else f"Hedges' g = {g:.2f}"


VIEW_TEXT = {
    "all_runs": "across all {n} models",
    "no_adversarial_training": "among the {n} models trained without adversarial training",
    "method_means": "across the {n} method means",
}


# Robust-loss sharpness is measured at PGD examples, as robust accuracy is: part of their association is
# built into the two measurements rather than found.
SHARED_ATTACK = frozenset({"robust_sharpness"})
CIRCULARITY = (
    "robust-loss sharpness and worst-case robust accuracy are both read off PGD examples in the same eps-ball "
    "(the sharpness at the training probe's PGD examples, the accuracy at the test set's): a model PGD cannot "
    "move has a low, flat robust loss and a high robust accuracy alike, so part of this association is built "
    "into the two measurements"
)
QUICK_NOTE = (
    "Smoke test (--quick): a few epochs on a subset of the data with cheap measurements; it shows that every "
    "stage runs, and its numbers support no verdict."
)


def _seed_flags(runs, method: str, test) -> tuple[int, int]:
    """(seeds of ``method`` where ``test(run)`` holds, seeds measured): caveats count seeds, not means."""
    mine = [r for r in runs if r["method"] == method]
    return sum(bool(test(r)) for r in mine), len(mine)


def _masking_flags(runs) -> dict[str, dict[str, Any]]:
    """Methods with a sign of gradient masking on at least one seed: ``{method: {"fgsm": k, "margin": k, "n": n,
    "mean_pgd", "mean_fgsm", "mean_worst"}}``. A multi-step attack must do at least as well as FGSM, and PGD on
    cross entropy should not be beaten by much by PGD on the margin loss (saturated softmax, Carlini & Wagner
    2016)."""
    out: dict[str, dict[str, Any]] = {}
    for m in _methods(runs):
        pgd, fgsm, worst = (_values(runs, m, k) for k in ("pgd_acc", "fgsm_acc", "robust_acc"))
        if not pgd:
            continue

        def has(r, k):
            return r.get(k) is not None and r.get("pgd_acc") is not None

        k_fgsm, n = _seed_flags(runs, m, lambda r: has(r, "fgsm_acc") and r["pgd_acc"] > r["fgsm_acc"] + 0.02)
        k_margin, _ = _seed_flags(runs, m, lambda r: has(r, "robust_acc") and r["pgd_acc"] > r["robust_acc"] + 0.05)
        if k_fgsm or k_margin:
            out[m] = {"fgsm": k_fgsm, "margin": k_margin, "n": n, "mean_pgd": sum(pgd) / len(pgd),
                      "mean_fgsm": sum(fgsm) / len(fgsm) if fgsm else None,
                      "mean_worst": sum(worst) / len(worst) if worst else None}
    return out


def _answer(runs, corr, hyps, settings, masked) -> str:
    """The study's question answered in one sentence, from the verdicts (never from a raw p-value)."""
    if settings.get("quick"):
        accs = _values_all(runs, "clean_acc")
        acc = f"; its models reach clean accuracy {min(accs):.2f}-{max(accs):.2f}" if accs else ""
        return (f"Smoke test (--quick, {settings.get('epochs', '?')} epoch(s) on a subset{acc}): every stage ran, "
                "and these numbers answer no question, so the report states no verdict.")
    pooled = corr.get("all_runs", {})
    n = max((c.get("n") or 0 for c in pooled.values()), default=0)
    sig = [(m, c) for m in SHARPNESS_MEASURES if (c := pooled.get(m)) and c.get("tau") is not None and _significant(c)]
    neg = [(m, c) for m, c in sig if c["tau"] < 0]
    pos = [(m, c) for m, c in sig if c["tau"] > 0]
    parts = []
    if not sig:
        parts.append(f"across the {n} models no sharpness measure is associated with worst-case robust accuracy "
                     "after Holm's correction")
    else:
        if neg:
            parts.append("across the {n} models, lower {names} went with higher worst-case robust accuracy ({taus})"
                         .format(n=n, names=" and ".join(m for m, _ in neg),
                                 taus=", ".join(f"τ = {c['tau']:.2f}, Holm p = {c['p_adjusted']:.3g}"
                                                for _, c in neg)))
        if pos:
            parts.append("higher {names} went with higher robust accuracy ({taus})".format(
                names=" and ".join(m for m, _ in pos),
                taus=", ".join(f"τ = {c['tau']:.2f}, Holm p = {c['p_adjusted']:.3g}" for _, c in pos)))
        rest = [m for m in SHARPNESS_MEASURES if m not in dict(sig) and pooled.get(m, {}).get("tau") is not None]
        if rest:
            parts.append("the other measures (" + ", ".join(rest) + ") show no association that survives correction")
        if any(m in SHARED_ATTACK for m, _ in sig):
            parts.append("the robust-loss association is partly built in, since both numbers come from PGD examples")
    by = {(h["comparison"]["a"], h["comparison"]["metric"]): h for h in hyps}
    sam = by.get(("sam", "lambda_max"))
    if sam is not None:
        parts.append({"supported": "SAM lowered λ_max significantly",
                      "direction only": "SAM's λ_max is lower than SGD's but not significantly",
                      "contradicted": "SAM did not lower λ_max"}.get(sam["verdict"], "SAM's λ_max was not measured"))
    at = [h for h in hyps if h["comparison"]["metric"] == "pgd_acc"]
    if at:
        k = sum(h["verdict"] == "supported" for h in at)
        text = f"adversarial training raised PGD accuracy significantly in {k} of {len(at)} methods"
        flagged = sorted(m for m in masked if m in ADVERSARIAL_METHODS)
        if flagged:
            text += f" ({', '.join(flagged)} with signs of gradient masking, so read their worst-case accuracy)"
        parts.append(text)
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def _values_all(runs, metric: str) -> list[float]:
    return [float(r[metric]) for r in runs if r.get(metric) is not None]


def findings(runs: Sequence[Mapping[str, Any]], corr: Mapping[str, Any], settings: Mapping[str, Any],
             level: float = 0.95) -> dict[str, Any]:
    """What the data support and what they do not, as ``{"answer": str, "hypotheses": [...], "supported": [str],
    "not_supported": [str], "caveats": [str], "multiple_comparisons": {...}}``, every sentence built from the
    numbers.

    Every test (the hypotheses' Welch tests, the price-of-robustness comparisons and every Kendall tau in
    every view of ``corr``) is one family for Holm's correction; ``p_adjusted`` is written beside each
    ``p_value`` (also into ``corr``) and only an adjusted p below ``ALPHA`` counts as supported. A test that
    fails the correction is *not established*, never *absent*: the report says so with its raw p. With
    ``settings["quick"]`` every verdict is ``"smoke test"`` and nothing is called supported or not.
    """
    quick = bool(settings.get("quick"))
    hyp_cmps = [(method, base, metric, sign, _compare(runs, method, base, metric, level))
                for method, base, metric, sign in HYPOTHESES]
    hyp_cmps = [h for h in hyp_cmps if h[4] is not None]
    price = [(m, c) for m in sorted(ADVERSARIAL_METHODS & set(_methods(runs)))
             if (c := _compare(runs, m, "sgd", "clean_acc", level)) is not None]
    tests: list[dict] = [c for *_, c in hyp_cmps] + [c for _, c in price]
    labels = [f"welch: {c['a']} vs {c['b']} on {c['metric']}" for c in tests]
    for view, measures in corr.items():
        for measure, c in measures.items():
            tests.append(c)
            labels.append(f"kendall: {measure} vs {c['against']} ({view})")
    apply_correction(tests, "holm")
    family = {
        "method": "holm", "alpha": ALPHA, "n_tests": sum(t.get("p_value") is not None for t in tests),
        "tests": [{"test": lab, "p_value": t.get("p_value"), "p_adjusted": t.get("p_adjusted"),
                   "effect_size": t.get("hedges_g") if lab.startswith("welch") else t.get("tau"),
                   "effect_measure": "hedges_g" if lab.startswith("welch") else "kendall_tau"}
                  for lab, t in zip(labels, tests)],
    }
    m_tests = family["n_tests"]
    masked = _masking_flags(runs)

    hyps: list[dict] = []
    supported: list[str] = []
    not_supported: list[str] = []
    caveats: list[str] = []
    for method, base, metric, sign, cmp in hyp_cmps:
        verdict = "smoke test" if quick else _verdict(cmp, sign)
        word = "below" if sign < 0 else "above"
        text = (
            f"{method}'s mean {metric} ({_fmt(cmp['mean_a'])}, n={cmp['n_a']}) vs {base}'s ({_fmt(cmp['mean_b'])}, "
            f"n={cmp['n_b']}): difference {_fmt(cmp['difference'])}, {int(level * 100)}% CI "
            f"[{_fmt(cmp['low'])}, {_fmt(cmp['high'])}], {_g(cmp)}, Welch {_p(cmp['p_value'], cmp['p_adjusted'])}."
        )
        entry = {"claim": f"{method} {metric} {word} {base}", "verdict": verdict, "comparison": cmp, "text": text}
        if verdict == "supported":
            supported.append(f"{method}'s {metric} is {word} {base}'s (significant at {ALPHA} after Holm's correction "
                             f"over {m_tests} tests). {text}")
        elif verdict == "direction only":
            not_supported.append(
                f"That {method}'s {metric} is reliably {word} {base}'s: the mean is {word}, but not significantly "
                f"after Holm's correction over {m_tests} tests. {text}"
            )
        elif verdict == "contradicted":
            entry["why"] = _why_not(runs, method, metric, settings, level)
            not_supported.append(
                f"That {method}'s {metric} is {word} {base}'s: in this run it is not. {text} Likely reasons: "
                + "; ".join(entry["why"]) + "."
            )
        hyps.append(entry)

    # Rank correlations between sharpness and robustness, every view. Failing the correction makes an
    # association not established; it does not make it absent, nor "explained" by something else.
    all_runs = corr.get("all_runs", {})
    for measure in SHARPNESS_MEASURES:
        pooled_sig = bool(all_runs.get(measure)) and _significant(all_runs[measure])
        for view, measures in corr.items():
            c = measures.get(measure)
            if quick or not c or c.get("tau") is None:
                continue
            where = VIEW_TEXT.get(view, view + " ({n} points)").format(n=c["n"])
            line = (f"{where[0].upper()}{where[1:]}, Kendall τ({measure}, {c['against']}) = {c['tau']:.2f} "
                    f"({_p(c['p_value'], c['p_adjusted'])})")
            built_in = f" Caveat: {CIRCULARITY}." if measure in SHARED_ATTACK else ""
            raw_small = c.get("p_value") is not None and c["p_value"] < ALPHA
            if _significant(c):
                rel = "sharper models were less robust" if c["tau"] < 0 else "sharper models were more robust"
                supported.append(f"{line}: {rel}.{built_in}")
            elif view == "all_runs":
                not_supported.append(
                    f"A rank association between {measure} and {c['against']}: {line}, not established at {ALPHA} "
                    "after Holm's correction" + (" (the raw p is below it, so the data do not rule it out either)"
                                                  if raw_small else "") + f".{built_in}")
            elif view == "no_adversarial_training" and (pooled_sig or raw_small):
                flagged = sorted(m for m in masked if m not in ADVERSARIAL_METHODS
                                 and any(r["method"] == m for r in runs))
                text = (f"That {measure} predicts robustness beyond adversarial training: {line}, not established "
                        "after Holm's correction")
                if raw_small:
                    text += (f"; the raw p is below {ALPHA}, so an association within this group is not ruled out and "
                             "the pooled one is not explained by the split between adversarially trained and other "
                             "models")
                if flagged:
                    text += (f"; this group includes {', '.join(flagged)}, whose PGD accuracy the report flags for "
                             "gradient masking, so its robust accuracies are the least certain")
                not_supported.append(text + ".")

    # Gradient masking, counted per seed (a mean can hide one masked seed).
    for m, f in masked.items():
        signs = []
        if f["fgsm"]:
            signs.append(f"FGSM, a weaker attack, brings its accuracy lower ({f['mean_fgsm']:.3f}) on {f['fgsm']} of "
                         f"{f['n']} seeds")
        if f["margin"]:
            signs.append(f"PGD on the margin loss and FGSM bring its accuracy down to {f['mean_worst']:.3f} on "
                         f"{f['margin']} of {f['n']} seeds")
        caveats.append(
            f"{m}'s PGD-20 accuracy ({f['mean_pgd']:.3f}) as a robustness figure: " + " and ".join(signs)
            + ": PGD on cross entropy overstates its robustness (a sign of gradient masking); its worst-case "
            "robust accuracy is the figure to trust."
        )
    # Curvature that vanishes because the softmax saturates is not flatness in a useful sense: judged per seed
    # against the largest curvature any run has, so one saturated seed is not averaged away.
    lam_all = [abs(v) for v in _values_all(runs, "lambda_max")]
    top = max(lam_all, default=0.0)
    for m in _methods(runs):
        lam = _values(runs, m, "lambda_max")
        tiny = [v for v in lam if top > 0 and abs(v) < 1e-6 * top]
        if tiny:
            others = [v for v in lam if v not in tiny]
            caveats.append(
                f"{m}'s near-zero curvature as flatness: on {len(tiny)} of {len(lam)} seeds its λ_max is "
                f"{', '.join(_fmt(v) for v in tiny)}" + (f" (the other seed(s): {', '.join(_fmt(v) for v in others)})"
                                                         if others else "")
                + ": the training loss is saturated there (the softmax outputs one-hot probabilities), so the Hessian "
                "vanishes at the minimum while the loss rises steeply a short distance away (see its loss slice); the "
                "same saturation masks input gradients, and its mean λ_max mixes the two regimes."
            )
    # The price of robustness.
    for m, c in price:
        if not quick and c["difference"] is not None and c["difference"] < 0 and _significant(c):
            supported.append(
                f"{m} pays for robustness with clean accuracy: {_fmt(c['mean_a'], '.3f')} vs sgd's "
                f"{_fmt(c['mean_b'], '.3f')} ({_g(c)}, {_p(c['p_value'], c['p_adjusted'])})."
            )
    data = settings.get("dataset", {})
    if not quick:
        not_supported.append(
            "Causation: rank correlations across training methods do not show that flatness causes robustness, since "
            "the methods differ in more than sharpness; and these results cover one "
            f"{settings.get('model', 'model')} on "
            f"{data.get('name', 'one data set') if isinstance(data, Mapping) else data} at eps = "
            f"{settings.get('eps', '?')} only."
        )
    if any(c.get("tau") is not None for view in corr.values() for m, c in view.items() if m in SHARED_ATTACK):
        caveats.append(f"Built-in association: {CIRCULARITY}.")
    if quick:
        caveats.insert(0, QUICK_NOTE)
    answer = _answer(runs, corr, hyps, settings, masked)
    # The caveats are also things the data do not support; not_supported keeps them for readers of older reports.
    return {"answer": answer, "hypotheses": hyps, "supported": supported, "not_supported": not_supported + caveats,
            "caveats": caveats, "multiple_comparisons": family, "smoke_test": quick}


def _finite_or_none(value: Any) -> Any:
    """NaN/inf become ``None`` (JSON ``null``): a measurement that failed is missing, not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(runs: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], level: float = 0.95) -> dict:
    """The whole report as a JSON-ready dict: runs, per-method summary, correlations, findings, settings."""
    runs = [{k: _finite_or_none(v) for k, v in r.items()} for r in runs]
    corr = correlations(runs)
    return {
        "runs": runs,
        "summary": summarize(runs, level),
        "correlations": corr,
        "findings": findings(runs, corr, settings, level),
        "settings": dict(settings),
    }


def _cell(ci: Mapping[str, Any], spec: str) -> str:
    """``center [low, high]``: the mean (the geometric mean on log scale) and its sign-respecting interval."""
    center = ci.get("center", ci["mean"]) if ci.get("scale") == "log" else ci["mean"]
    if center is None:
        return "n/a"
    if ci["low"] is None:
        return _fmt(center, spec)
    mark = "ᵍ" if ci.get("scale") == "log" else ""
    return (f"{_fmt(center, spec)}{mark} [{_fmt(ci['low'], spec)}, "
            f"{_fmt(ci['high'], spec) if ci['high'] is not None else '∞'}]")


def _table(report: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    spec = {k: (title, fmt) for k, title, fmt in METRICS}
    lines = ["| method | n | " + " | ".join(spec[k][0] for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for method, stats in report["summary"].items():
        n = max(ci["n"] for ci in stats.values())
        lines.append(f"| {method} | {n} | " + " | ".join(_cell(stats[k], spec[k][1]) for k in keys) + " |")
    return lines


def render_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """``report.md``: the answer in one sentence, what the data support and not, the caveats, a short table,
    the correlations, then every measurement, the plots and the settings."""
    settings = report["settings"]
    level = int(round(100 * settings.get("confidence_level", 0.95)))
    f = report["findings"]
    quick = bool(f.get("smoke_test", settings.get("quick")))
    lines = ["# sharpguard study" + (" (smoke test: --quick, no verdicts)" if quick else ""), ""]
    if f.get("answer"):
        lines += [f"**{f['answer']}**", ""]
    data = settings.get("dataset", {})
    lines.append(
        f"Question: do sharp minima go with adversarial vulnerability, and do SAM and adversarial training change "
        f"that? Data: {data.get('name')} ({data.get('n_train')} train / {data.get('n_test')} test). "
        f"Model: {settings.get('model')}. Seeds: {settings.get('seeds')}. Epochs: {settings.get('epochs')}. "
        f"Threat model: {settings.get('norm', 'linf')} eps = {settings.get('eps')}."
    )
    if settings.get("eps_rationale"):
        lines += ["", f"Why this eps: {settings['eps_rationale']}"]
    caveats = f.get("caveats", [])
    if quick:
        lines += ["", "## Smoke test", "", QUICK_NOTE]
    else:
        family = f.get("multiple_comparisons")
        if family:
            lines += ["",
                      f"Multiple comparisons: {family['n_tests']} tests (every Welch comparison and every Kendall τ "
                          f"below), Holm's correction at family-wise α = {family['alpha']}; a finding is supported "
                          "only when its adjusted p-value is below α, and one that is not is *not established*, not "
                          "absent. Effect sizes: Hedges' g for comparisons, τ for correlations."]
        lines += ["", "## What the data support", ""]
        lines += [f"- {s}" for s in f["supported"]] or ["- Nothing at the chosen significance level."]
        lines += ["", "## What the data do not support", ""]
        lines += [f"- {s}" for s in f["not_supported"] if s not in caveats]
    extra = [c for c in caveats if c != QUICK_NOTE]
    if extra:
        lines += ["", "## Caveats", ""] + [f"- {c}" for c in extra]
    note = (f"mean [{level}% CI] over seeds; ᵍ: a quantity positive on every seed, shown as its geometric mean with "
            "a t-interval on log scale (it cannot cross zero); accuracies: t-interval within [0, 1]")
    lines += ["", f"## Key numbers ({note})", ""] + _table(report, KEY_METRICS)
    lines += ["", f"## Rank correlation of sharpness with {ROBUST_METRIC} (Kendall τ-b, two-sided p, Holm-adjusted p)",
              ""]
    views = list(report["correlations"])
    lines.append("| measure | " + " | ".join(views) + " |")
    lines.append("|---|" + "---|" * len(views))
    for measure in SHARPNESS_MEASURES:
        cells = []
        for view in views:
            c = report["correlations"][view].get(measure)
            cells.append("n/a" if not c or c["tau"] is None
                         else f"τ = {c['tau']:.2f} ({_p(c['p_value'], c.get('p_adjusted'))}, n = {c['n']})")
        lines.append(f"| {measure} | " + " | ".join(cells) + " |")
    lines += ["", f"## All measurements ({note})", ""] + _table(report, [k for k, _, _ in METRICS])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out_dir: str | Path, plots: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
    atomic_write_text(md_path, render_markdown(report, plots))
    return json_path, md_path
