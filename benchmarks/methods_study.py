"""Every sharpness-aware method sharpguard ships, trained on the study's data and measured by the study's code.

What is trained: the study's MLP (``sharpguard.study.models.make_mlp``, 64 -> 64 -> 64 -> 10, ReLU) on its
default data set (``sharpguard.study.data.load_digits``: scikit-learn's 8x8 digits, 1,437 train / 360 test,
pixels in [0, 1]) with the study's training settings (``StudyConfig`` defaults: SGD lr 0.05, momentum 0.9,
batch 64, 30 epochs), by

- plain SGD (momentum), the baseline;
- every SAM variant of ``sharpguard.optim.VARIANTS`` (read at run time: a variant registered after this file
  was written is included), each at its own defaults through ``make_sam`` around the same SGD. A variant that
  needs more than a name gets it from :data:`OVERRIDES` (stated in the output); one that cannot be built or
  trained is a row that says why, never a silent omission;
- ESAM with its sharpness-sensitive data selection (``SharpnessDataSelection``, a loss reducer, defaults);
- the MESA loss term (``sharpguard.optim.MESA``, defaults) added to cross entropy under plain SGD;
- the SAF loss term, if the module ``sharpguard.optim.saf`` exists when the script runs (it needs example
  indices: the batches come from :class:`IndexedTensors`, a dataset wrapper that returns them).

Same learning rate, batch size and number of epochs for all: equal epochs, not equal compute, so the table
also gives the forward and backward passes per step (counted with hooks on the model while it trains).
Every (method, seed) starts from the same initial weights and sees the same batch order as the other methods
with that seed (``torch.manual_seed(seed)`` before the model is built, a seeded sampler for the batches);
variants with a noise seed of their own (``seed`` knob) get the run's seed so that seeds are replicates.

What is measured: ``sharpguard.study.measure.measure_model``, the study's own measurement of a trained model,
unchanged: λ_max of the training loss's Hessian on the study's fixed probe (the first 512 training examples,
Lanczos), adaptive sharpness (worst-case loss increase within an ASAM-style ball of relative radius 0.5, 10
ascent steps), clean test accuracy and robust test accuracy (per example the worst of FGSM, PGD-20 on cross
entropy and PGD-20 on the Carlini-Wagner margin at the study's L∞ eps = 0.1); the other metrics it returns
are kept in the raw dump.

Statistics (``sharpguard.study.stats``): mean and t-based 95% CI per method; each method against SGD and
against SAM per metric with a *paired* t-test over seeds (seed s of both methods shares the initial weights
and the batch order, so the per-seed differences are the natural unit), the 95% CI of the mean difference,
Hedges' g (``stats.hedges_g``: pooled-SD standardized difference with the small-sample correction), and
Holm's correction (``stats.holm``) across every comparison of the table at once.

Run: ``OMP_NUM_THREADS=1 python benchmarks/methods_study.py`` (one intra-op thread; about 10 minutes on a
shared 2-core CPU with the default seeds); it rewrites the "Methods on the study data" section of
benchmarks/RESULTS.md and benchmarks/methods_study_raw.json. ``--quick``: a 1-minute smoke run on a subset
of the data that writes neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, write_section
else:  # run as python benchmarks/methods_study.py: this folder is sys.path[0]
    from _results import machine, write_section
from sharpguard.optim import MESA, VARIANTS, make_sam
from sharpguard.study.config import StudyConfig
from sharpguard.study.data import StudyData, load_digits
from sharpguard.study.measure import measure_model, probe_batches
from sharpguard.study.models import make_mlp
from sharpguard.study.stats import hedges_g, holm, mean_ci

RAW = Path(__file__).with_name("methods_study_raw.json")
SECTION = "Methods on the study data"
ALPHA = 0.05  # family-wise level: a difference is called significant only if its Holm-adjusted p is below it
BASELINES = ("sgd", "sam")

# (key of measure_model's dict, column title, format) of the metrics compared
METRICS: list[tuple[str, str, str]] = [
    ("lambda_max", "λ_max", ".3g"),
    ("adaptive_sharpness", "adaptive sharpness", ".3g"),
    ("clean_acc", "clean acc", ".3f"),
    ("robust_acc", "robust acc", ".3f"),
]


# --------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Context:
    """What a method may need to be built: the model, the training-set size, the run's seed and settings."""

    model: nn.Module
    n_train: int
    seed: int
    config: StudyConfig


@dataclass
class Built:
    """A built method: the optimizer to step, an optional extra loss term, and what it was built with.

    ``loss_term(logits, x, idx, epoch)`` is added to the mean cross entropy (MESA, SAF); ``closure_step`` says whether
    the optimizer takes ``step(closure)`` (the SAM family) or the plain ``backward(); step()`` pattern.
    ``reduction`` replaces the mean over the batch (ESAM's data selection); ``forward_counters``: extra modules
    whose forwards count as passes (MESA's teacher).
    """

    optimizer: torch.optim.Optimizer
    closure_step: bool
    settings: str
    loss_term: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    reduction: Callable[[torch.Tensor], torch.Tensor] | None = None  # per-example losses -> loss (default: mean)
    forward_counters: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class Override:
    """What a registered SAM variant needs beyond its name: extra knobs (computed from the run's context),
    the base SGD's momentum, and why."""

    knobs: Callable[[Context], dict[str, Any]] = lambda ctx: {}
    momentum: float | None = None  # None: the study's momentum
    why: str = ""


#: Variants that need more than ``make_sam(SGD(...), name, model=model)``. Everything else runs at its defaults.
OVERRIDES: dict[str, Override] = {
    # bSAM (Möllenhoff & Khan, ICLR 2023) is a whole Adam-like optimizer over a Gaussian posterior whose variance
    # is 1 / (N s): it needs the training-set size N (no default), and it writes its own update into .grad, so
    # the base must be SGD with momentum 0 (whose lr is bSAM's step size alpha).
    "bsam": Override(knobs=lambda ctx: {"num_data": ctx.n_train}, momentum=0.0,
                     why="num_data = training-set size; base SGD with momentum 0 (bSAM computes its own update "
                         "with its own beta1 = 0.9 average; the lr is its step size)"),
}


@dataclass(frozen=True)
class Method:
    """One row of the table: a name and a builder (which may raise: the row then says why)."""

    name: str
    build: Callable[[Context], Built]
    family: str  # "baseline", "SAM variant", "SAM variant + loss reducer" or "loss term"


def _sgd(ctx: Context, momentum: float | None = None) -> torch.optim.SGD:
    c = ctx.config
    return torch.optim.SGD(ctx.model.parameters(), lr=c.lr, momentum=c.momentum if momentum is None else momentum)


def build_sgd(ctx: Context) -> Built:
    return Built(_sgd(ctx), closure_step=False, settings=f"SGD lr={ctx.config.lr} momentum={ctx.config.momentum}")


def variant_builder(name: str, overrides: Mapping[str, Override]) -> Callable[[Context], Built]:
    """``make_sam(SGD, name, model=...)`` at the variant's defaults, plus its override (if any) and the run's
    seed for a variant with a noise seed of its own."""

    def build(ctx: Context) -> Built:
        ov = overrides.get(name, Override())
        knobs = dict(ov.knobs(ctx))
        declared = VARIANTS[name].knob_defaults()
        if "seed" in declared and "seed" not in knobs:
            knobs["seed"] = ctx.seed  # the variant's noise differs across the replicates, as the data order does
        opt = make_sam(_sgd(ctx, ov.momentum), name, model=ctx.model, **knobs)
        shown = {**VARIANTS[name].knob_defaults(), **knobs}
        text = ", ".join(f"{k}={v}" for k, v in shown.items() if k != "seed")
        if ov.momentum is not None:
            text += f"; base momentum {ov.momentum}"
        return Built(opt, closure_step=True, settings=text)

    return build


def build_mesa(ctx: Context) -> Built:
    opt = _sgd(ctx)
    term = MESA(ctx.model, opt)  # before the counting hooks: the teacher is a deep copy of the model
    settings = f"weight={term.weight}, temperature={term.temperature}, decay={term.decay}, start_step={term.start_step}"
    return Built(opt, closure_step=False, settings=settings,
                 loss_term=lambda logits, x, idx, epoch: term(logits, x), forward_counters=[term.teacher])


def build_esam_sds(ctx: Context) -> Built:
    """ESAM as the paper runs it: its stochastic weight perturbation (the registry's ``esam``) plus its
    sharpness-sensitive data selection, a loss reducer (``sharpguard.optim.data_selection``) at its defaults."""
    sds_module = importlib.import_module("sharpguard.optim.data_selection")
    sds = sds_module.SharpnessDataSelection()
    inner = variant_builder("esam", OVERRIDES)(ctx)
    return Built(inner.optimizer, closure_step=True, settings=f"{inner.settings}; SDS gamma={sds.gamma}",
                 reduction=sds)


def build_saf(ctx: Context) -> Built:
    """The SAF loss term of ``sharpguard.optim.saf`` at its defaults: the outputs of each training example are
    stored per epoch, so it needs the training-set size and, per batch, the example indices and the epoch."""
    saf = importlib.import_module("sharpguard.optim.saf")
    term = saf.SAF(ctx.n_train)
    knobs = {k: getattr(term, k) for k in ("weight", "temperature", "epochs_ago", "start_epoch", "end_epoch")
             if hasattr(term, k)}
    return Built(_sgd(ctx), closure_step=False, settings=", ".join(f"{k}={v}" for k, v in knobs.items()),
                 loss_term=lambda logits, x, idx, epoch: term(logits, idx, epoch))


def registry_methods(overrides: Mapping[str, Override] = OVERRIDES) -> list[Method]:
    """SGD, every registered SAM variant (SAM first), ESAM with its data selection, MESA, and SAF if its module
    exists."""
    names = ["sam", *[n for n in VARIANTS if n != "sam"]] if "sam" in VARIANTS else list(VARIANTS)
    methods = [Method("sgd", build_sgd, "baseline")]
    methods += [Method(n, variant_builder(n, overrides), "SAM variant") for n in names]
    if "esam" in VARIANTS and importlib.util.find_spec("sharpguard.optim.data_selection") is not None:
        methods.append(Method("esam+sds", build_esam_sds, "SAM variant + loss reducer"))
    methods.append(Method("mesa", build_mesa, "loss term"))
    if importlib.util.find_spec("sharpguard.optim.saf") is not None:
        methods.append(Method("saf", build_saf, "loss term"))
    return methods


# --------------------------------------------------------------------------------------------------- training
class IndexedTensors(torch.utils.data.Dataset):
    """``(x[i], y[i], i)`` for a list of indices ``i`` at once (a batch sampler feeds it whole batches), so a
    loss term that stores per-example state (SAF) sees which examples are in the batch."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.int64)
        return self.x[i], self.y[i], i


def batches(data: StudyData, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled batches whose order depends on ``seed`` only (the same for every method)."""
    dataset = IndexedTensors(data.x_train, data.y_train)
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
        batch_size=batch_size, drop_last=False)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None)


class PassCounter:
    """Counts forwards of the model (and of ``extra`` modules, e.g. MESA's teacher) and backwards through the
    model (a gradient hook on its first parameter: it fires once per backward that reaches the weights)."""

    def __init__(self, model: nn.Module, extra: Sequence[nn.Module] = ()) -> None:
        self.forwards = 0
        self.backwards = 0
        self.handles = [m.register_forward_hook(self._forward) for m in (model, *extra)]
        self.handles.append(next(model.parameters()).register_hook(self._backward))

    def _forward(self, *_: Any) -> None:
        self.forwards += 1

    def _backward(self, grad: torch.Tensor) -> None:
        self.backwards += 1

    def remove(self) -> None:
        """Detach the hooks (the measurement's Hessian-vector products must not be counted, or slowed)."""
        for h in self.handles:
            h.remove()


class BuildError(Exception):
    """The method could not be built (bad knobs, a missing argument, a module that is not there)."""


@dataclass
class Trained:
    model: nn.Module
    seconds: float
    steps: int
    forwards_per_step: float
    backwards_per_step: float
    last_epoch_objective: float | None  # mean of the loss the step returned over the last epoch (with any term)
    train_loss: float | None  # cross entropy of the final model on the whole training set (no term, no noise)
    settings: str


def train(method: Method, data: StudyData, config: StudyConfig, seed: int) -> Trained:
    """Train the study's MLP with ``method`` for ``config.epochs`` epochs in a plain PyTorch loop."""
    torch.manual_seed(seed)  # the initial weights depend on the seed only (as the study's seed_everything)
    model = make_mlp(data.input_shape, data.n_classes, config.hidden)
    try:
        built = method.build(Context(model, len(data.y_train), seed, config))
    except Exception as exc:
        raise BuildError(f"{type(exc).__name__}: {exc}") from exc
    counter = PassCounter(model, built.forward_counters)
    opt, term = built.optimizer, built.loss_term
    loader = batches(data, config.batch_size, seed)  # its generator moves on from epoch to epoch
    steps, last_epoch = 0, []
    start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            last_epoch = []
            for x, y, idx in loader:

                def closure(x: torch.Tensor = x, y: torch.Tensor = y, idx: torch.Tensor = idx,
                            epoch: int = epoch) -> torch.Tensor:
                    opt.zero_grad()
                    logits = model(x)
                    if built.reduction is None:
                        loss = Fn.cross_entropy(logits, y)
                    else:
                        loss = built.reduction(Fn.cross_entropy(logits, y, reduction="none"))
                    if term is not None:
                        loss = loss + term(logits, x, idx, epoch)
                    loss.backward()
                    return loss

                if built.closure_step:
                    loss = opt.step(closure)
                else:
                    loss = closure()
                    opt.step()
                last_epoch.append(float(loss.detach()))
                steps += 1
    finally:
        counter.remove()
    seconds = time.perf_counter() - start
    model.eval()
    final = sum(last_epoch) / len(last_epoch) if last_epoch else None
    with torch.no_grad():  # how far training got, the same quantity for every method (what the step returns is not)
        train_loss = float(Fn.cross_entropy(model(data.x_train), data.y_train))
    return Trained(model, seconds, steps, counter.forwards / max(steps, 1), counter.backwards / max(steps, 1),
                   final if final is not None and math.isfinite(final) else None,
                   train_loss if math.isfinite(train_loss) else None, built.settings)


# --------------------------------------------------------------------------------------------------- statistics
def paired_compare(a: Sequence[float | None], b: Sequence[float | None], level: float = 0.95) -> dict[str, Any]:
    """``a - b`` over the seeds where both are finite: mean difference, its t-based CI (``stats.mean_ci`` of the
    differences), the paired t-test's two-sided p, and Hedges' g of the two samples (``stats.hedges_g``).

    Zero spread of the differences (accuracies that tie on every seed up to a constant shift of a few test
    examples) leaves the t statistic undefined: p is then ``None`` (not tested), where the study's Welch test
    would give 0 and call a one-example shift on two seeds infinitely significant."""
    from scipy import stats as sps

    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    diffs = [x - y for x, y in pairs]
    ci = mean_ci(diffs, level)
    p: float | None = None
    if len(diffs) >= 2 and ci.std is not None and ci.std > 0.0:
        p = float(sps.ttest_rel([x for x, _ in pairs], [y for _, y in pairs]).pvalue)
    return {"n_pairs": len(diffs), "difference": ci.mean, "low": ci.low, "high": ci.high, "p_value": p,
            "hedges_g": hedges_g([x for x, _ in pairs], [y for _, y in pairs]) if pairs else None}


def analyse(rows: list[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """Per-metric summaries into every row that ran, and every comparison (vs SGD, vs SAM) with the Holm-adjusted
    p-value across all of them; returns the list of comparisons (the test family)."""
    by_name = {r["name"]: r for r in rows if r["status"] == "ran"}
    for r in by_name.values():
        r["summary"] = {k: mean_ci([s[k] for s in r["seeds"] if s.get(k) is not None], level).as_dict()
                        for k, _, _ in METRICS}
    family: list[dict[str, Any]] = []
    for r in by_name.values():
        r["vs"] = {}
        for base in BASELINES:
            # sgd vs sam is the same test as sam vs sgd: it is made once, in the sam row
            if base not in by_name or r["name"] in BASELINES[: BASELINES.index(base) + 1]:
                continue
            r["vs"][base] = {}
            for key, _, _ in METRICS:
                a = _per_seed(r, key)
                b = _per_seed(by_name[base], key)
                cmp = {"method": r["name"], "baseline": base, "metric": key, **paired_compare(a, b, level)}
                r["vs"][base][key] = cmp
                family.append(cmp)
    for cmp, q in zip(family, holm([c["p_value"] for c in family])):
        cmp["p_holm"] = q
    return family


def _per_seed(row: Mapping[str, Any], key: str) -> list[float | None]:
    """The metric by seed index (aligned across methods: the same seeds in the same order)."""
    by_seed = {s["seed"]: s.get(key) for s in row["seeds"]}
    return [by_seed.get(seed) for seed in row["seed_list"]]


# --------------------------------------------------------------------------------------------------- the study
def run(methods: Sequence[Method], data: StudyData, config: StudyConfig, seeds: Sequence[int],
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train and measure every method on every seed; returns the rows (one per method, with its per-seed
    metrics, or ``status`` "not run" / "failed" and the reason) and the comparisons."""
    probe = probe_batches(data.x_train, data.y_train, config.probe_size)
    test = [(data.x_test, data.y_test)]
    rows: list[dict[str, Any]] = []
    for method in methods:
        row: dict[str, Any] = {"name": method.name, "family": method.family, "status": "ran", "reason": None,
                               "seeds": [], "seed_list": list(seeds)}
        for seed in seeds:
            # a method that cannot be built or stepped is a row saying why, not an omission
            try:
                trained = train(method, data, config, seed)
            except BuildError as exc:
                row.update(status="not run", reason=f"cannot be built: {exc}")
                break
            except Exception as exc:  # noqa: BLE001 - any failure of a method's step is reported in its row
                row.update(status="failed", reason=f"training seed {seed} raised {type(exc).__name__}: {exc}")
                break
            metrics = measure_model(trained.model, test, probe, config, seed=seed)
            row["settings"] = trained.settings
            row["seeds"].append({"seed": seed, **metrics, "train_time_s": trained.seconds, "steps": trained.steps,
                                 "forwards_per_step": trained.forwards_per_step,
                                 "backwards_per_step": trained.backwards_per_step,
                                 "last_epoch_objective": trained.last_epoch_objective,
                                 "train_loss": trained.train_loss})
            if progress:
                progress(f"{method.name} seed {seed}: {trained.seconds:.1f}s train, λ_max "
                         f"{_f(metrics['lambda_max'])}, robust {_f(metrics['robust_acc'])}")
        if row["status"] != "ran":
            row["seeds"] = []  # a method that failed part-way is not compared on the seeds it finished
        else:
            row["forwards_per_step"] = row["seeds"][0]["forwards_per_step"]
            row["backwards_per_step"] = row["seeds"][0]["backwards_per_step"]
        rows.append(row)
    family = analyse(rows)
    return {"rows": rows, "comparisons": family}


# --------------------------------------------------------------------------------------------------- report
def _f(value: float | None, spec: str = ".3g") -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return format(float(value), spec)


def _p(q: float | None) -> str:
    if q is None:
        return "n/a"
    return "<0.001" if q < 0.001 else f"{q:.3f}"


def _significant(cmp: Mapping[str, Any] | None) -> bool:
    return cmp is not None and cmp.get("p_holm") is not None and cmp["p_holm"] < ALPHA


def tables(result: Mapping[str, Any]) -> str:
    """The markdown: per-method means, then the comparisons with SGD and with SAM."""
    rows = result["rows"]
    lines = ["| method | passes / step (fwd, bwd) | n | " + " | ".join(f"{t} (mean ± 95% CI)" for _, t, _ in METRICS)
             + " | train CE | train s / seed |", "|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for r in rows:
        if r["status"] != "ran":
            lines.append(f"| {r['name']} | {r['status']}: {_cell(r['reason'])} | 0 | "
                         + " | ".join("—" for _ in METRICS) + " | — | — |")
            continue
        cells = []
        for key, _, spec in METRICS:
            s = r["summary"][key]
            cells.append(_f(s["mean"], spec) + ("" if s["half_width"] is None else f" ± {_f(s['half_width'], spec)}"))
        n = min(r["summary"][k]["n"] for k, _, _ in METRICS)
        secs = sum(s["train_time_s"] for s in r["seeds"]) / len(r["seeds"])
        ce = mean_ci([s["train_loss"] for s in r["seeds"] if s["train_loss"] is not None]).mean
        lines.append(f"| {r['name']} | {r['forwards_per_step']:.2f}, {r['backwards_per_step']:.2f} | {n} | "
                     + " | ".join(cells) + f" | {_f(ce, '.3f')} | {secs:.1f} |")
    out = ["\n".join(lines)]
    for base in BASELINES:
        title = f"**Against {base.upper()}**: difference (method − {base}) of the means over paired seeds, " \
                "[95% CI], Hedges' g, Holm-adjusted p (bold: p < 0.05 after the correction)."
        t = ["| method | " + " | ".join(t for _, t, _ in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for r in rows:
            cmps = r.get("vs", {}).get(base)
            if not cmps:
                continue
            cells = []
            for key, _, spec in METRICS:
                c = cmps[key]
                g = "n/a" if c["hedges_g"] is None else f"{c['hedges_g']:+.2f}"
                text = (f"{_signed(c['difference'], spec)} [{_signed(c['low'], spec)}, {_signed(c['high'], spec)}], "
                        f"g {g}, p {_p(c['p_holm'])}")
                cells.append(f"**{text}**" if _significant(c) else text)
            t.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        out.append(title + "\n\n" + "\n".join(t))
    return "\n\n".join(out)


def _signed(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, "+" + spec)


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def findings(result: Mapping[str, Any], config: StudyConfig) -> list[str]:
    """Plain sentences read off the comparisons; nothing here is decided before the numbers exist."""
    rows = result["rows"]
    family = result["comparisons"]
    ran = [r for r in rows if r["status"] == "ran"]
    out: list[str] = []
    sig = [c for c in family if _significant(c)]
    n_defined = sum(c["p_value"] is not None for c in family)
    out.append(f"{len(family)} comparisons ({n_defined} with a defined test) form one Holm family; "
               f"{len(sig)} differ at family-wise α = {ALPHA}" + ("." if sig else ": nothing here is significant."))

    def names(cs: list[dict[str, Any]]) -> str:
        return ", ".join(f"{c['method']} ({_signed(c['difference'], '.3g')}, p {_p(c['p_holm'])})" for c in cs)

    for key, title, _ in METRICS:
        parts, silent = [], []
        for base in BASELINES:
            cs = [c for c in family if c["metric"] == key and c["baseline"] == base]
            if not cs:
                continue
            lower = [c for c in cs if _significant(c) and c["difference"] < 0]
            higher = [c for c in cs if _significant(c) and c["difference"] > 0]
            if not lower and not higher:
                silent.append(base.upper())
            if lower:
                parts.append(f"lower than {base.upper()}: {names(lower)}")
            if higher:
                parts.append(f"higher than {base.upper()}: {names(higher)}")
        if silent:
            parts.append(f"no method differs from {' or '.join(silent)} after the correction")
        out.append(f"{title}: " + "; ".join(parts) + ".")
    sam_robust = [c for c in family if c["metric"] == "robust_acc" and c["baseline"] == "sam"]
    if sam_robust:
        better = [c for c in sam_robust if _significant(c) and c["difference"] > 0]
        out.append("No method beats SAM on robust accuracy after the correction." if not better else
                   f"Beats SAM on robust accuracy after the correction: {names(better)}.")
    sgd = next((r for r in ran if r["name"] == "sgd"), None)
    if sgd is not None and sgd["summary"]["lambda_max"]["mean"] is not None:
        # heavy-ball SGD on a quadratic is stable for lambda < 2 (1 + beta) / lr (Cohen et al., 2021)
        threshold = 2.0 * (1.0 + config.momentum) / config.lr
        out.append(f"For scale: SGD's final λ_max ({_f(sgd['summary']['lambda_max']['mean'])}) is "
                   f"{sgd['summary']['lambda_max']['mean'] / threshold:.1%} of the stability threshold 2(1+β)/lr = "
                   f"{threshold:.3g} of heavy-ball SGD (Cohen et al., 2021): these runs end far below the edge "
                   "of stability.")
    ce = {r["name"]: m for r in ran
          if (m := mean_ci([s["train_loss"] for s in r["seeds"] if s["train_loss"] is not None]).mean) is not None}
    if sgd is not None and sgd["name"] in ce and len(ce) > 1:
        # equal epochs at one lr is not equal convergence: a method far from fitting the training set is compared
        # at a different point of training, where curvature and robustness differ for that reason alone
        worst = sorted((n for n in ce if n != "sgd"), key=lambda n: -ce[n])[:3]
        out.append(f"How far training got (cross entropy of the final model on the training set): SGD {ce['sgd']:.3g}; "
                   "highest: " + ", ".join(f"{n} {ce[n]:.3g} ({ce[n] / ce['sgd']:.1f}x SGD's)" for n in worst) + ".")
    bsam = next((r for r in ran if r["name"] == "bsam"), None)
    if bsam is not None and "bsam" in ce and ce.get("sgd"):
        # why the shared lr is not the same step for bSAM: its own docstring's update, read against heavy-ball SGD
        out.append("bSAM's lr is the α of its update θ ← θ − α g_m / s, with g_m an exponential *average* of "
                   f"the gradients (β1 = {_settings_value(bsam.get('settings', ''), 'beta1')}) and s its posterior "
                   f"precision (starting at s_init = {_settings_value(bsam.get('settings', ''), 's_init')}); "
                   f"heavy-ball SGD's velocity is a *sum*, about 1/(1 − β) = {1.0 / (1.0 - config.momentum):.0f}x "
                   "larger at a steady gradient. At the shared lr its steps are therefore smaller; after the same "
                   f"epochs its training cross entropy is {ce['bsam']:.3g}, {ce['bsam'] / ce['sgd']:.1f}x SGD's"
                   + (": its row compares a less trained model, not bSAM at a tuned step size."
                      if ce["bsam"] > ce["sgd"] else ": it fit the training set at least as well nonetheless."))
    mesa = next((r for r in ran if r["name"] == "mesa"), None)
    if mesa is not None and mesa["seeds"]:
        decay = _settings_value(mesa.get("settings", ""), "decay")
        steps = mesa["seeds"][0]["steps"]
        if decay is not None:
            out.append(f"MESA at its default EMA decay {decay} keeps {decay ** steps:.0%} of the initial weights in "
                       f"its teacher after the {steps} steps of these runs: its trajectory loss pulls mostly toward "
                       "the initialization here, not toward a trained average.")
    skipped = [r for r in rows if r["status"] != "ran"]
    if skipped:
        out.append("Did not run: " + "; ".join(f"{r['name']} ({r['status']}: {r['reason']})" for r in skipped) + ".")
    return out


def _settings_value(settings: str, key: str) -> float | None:
    for part in settings.replace(";", ",").split(","):
        k, _, v = part.strip().partition("=")
        if k == key:
            try:
                return float(v)
            except ValueError:
                return None
    return None


def markdown(result: Mapping[str, Any], config: StudyConfig, data: StudyData, seeds: Sequence[int],
             seconds: float, registered: Sequence[str]) -> str:
    rows = result["rows"]
    settings = "; ".join(f"{r['name']}: {r['settings']}" for r in rows
                         if r["status"] == "ran" and r["family"] != "baseline" and r.get("settings"))
    overridden = [f"{n}: {OVERRIDES[n].why}" for n in registered if n in OVERRIDES]
    d = data.describe()
    head = (
        f"Machine: {machine()}. Written by `python benchmarks/methods_study.py` in {seconds / 60:.1f} min. "
        f"Data: the study's default `{d['name']}` ({d['n_train']} train / {d['n_test']} test, 8x8 in [0, 1]); model: "
        f"the study's MLP ({config.hidden} hidden, ReLU); every method trained for {config.epochs} epochs, batch "
        f"{config.batch_size}, SGD lr {config.lr} (momentum {config.momentum} unless stated), {len(seeds)} "
        f"seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), the same initial weights and batch "
        "order for every method at a seed; equal epochs, not equal compute (passes per step counted during training). "
        f"SAM variants registered at run time: {', '.join(registered)} (each at its own defaults through `make_sam`; "
        "variants with a noise seed get the run's seed"
        + (f"; overrides: {'; '.join(overridden)}" if overridden else "") + "). "
        f"Measured by the study's `measure_model`: λ_max and adaptive sharpness (relative radius "
        f"{config.adaptive_sharpness_rho}, {config.sharpness_steps} steps) of the training loss on the study's fixed "
        f"probe (first {config.probe_size} training examples); clean and robust test accuracy (robust: per example the "
        f"worst of FGSM, PGD-{config.eval_pgd_steps} on cross entropy and PGD-{config.eval_pgd_steps} on the margin, "
        f"L∞ eps = {config.eps}). Comparisons: paired t-test over seeds, Hedges' g, Holm across all comparisons "
        "below. Raw per-seed numbers (every metric `measure_model` returns): `benchmarks/methods_study_raw.json`."
    )
    parts = [head, "", tables(result), "", "Settings of each method: " + settings + ".", "",
             "**What the numbers say.** " + " ".join(findings(result, config))]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: subset of the data, 2 seeds, 10 epochs, cheap measurements (writes nothing)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 12; 2 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: the study's 30; 10 with --quick)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated subset of the methods (default: all; a subset writes nothing)")
    parser.add_argument("--no-write", action="store_true", help="print only (RESULTS.md and the raw dump untouched)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the 9k-parameter MLP gains nothing from more; the machine is shared

    config = StudyConfig()
    if args.quick:
        config = config.with_quick()
    config = dataclasses.replace(config, epochs=args.epochs or (10 if args.quick else config.epochs))
    n_seeds = args.seeds or (2 if args.quick else 12)
    data = load_digits()
    if config.subset is not None:
        data = data.subset(*config.subset)
    methods = registry_methods()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        methods = [m for m in methods if m.name in wanted]
    seeds = list(range(n_seeds))
    start = time.perf_counter()
    result = run(methods, data, config, seeds, progress=lambda s: print(s, flush=True))
    seconds = time.perf_counter() - start
    text = markdown(result, config, data, seeds, seconds, list(VARIANTS))
    print(text)
    if not (args.quick or args.methods or args.no_write):
        raw = {"settings": {**config.as_settings(), "seeds": seeds, "data": data.describe()},
               "registered_variants": list(VARIANTS), "seconds": seconds, **result}
        RAW.write_text(json.dumps(raw, indent=1, default=str) + "\n")
        write_section(SECTION, text)
    return result


if __name__ == "__main__":
    main()
