"""Attacks and adversarial-training methods: speed against torchattacks, passes per step (measured by hooks).

Run: ``OMP_NUM_THREADS=1 python benchmarks/attacks.py`` (about a minute on 2 CPU cores). Writes the
section "Attacks" of benchmarks/RESULTS.md.

1. PGD-10 (linf, eps 8/255, alpha 2/255) on the same CNN and batch: ``sharpguard.attacks.pgd`` vs
   ``torchattacks.PGD``, interleaved repeats, median wall time; without random start the two must
   return identical tensors (checked), with random start only the noise differs.
2. AutoAttack: ``sharpguard.attacks.auto_attack(version="standard")`` (APGD-CE -> APGD-T -> FAB-T ->
   Square, 100 steps, 9 targets, 5,000 queries) vs ``torchattacks.AutoAttack`` (its port: 10-step APGD/APGD-T,
   FAB-T, Square) vs the reference implementation (``pyautoattack``, the PyPI packaging of
   fra31/auto-attack: 100 steps + FAB-T) on the same trained CNN and batch: wall time, robust accuracy.
3. FAB-T (linf, l2, l1) and l1-APGD / l1-APGD-T, stage by stage: ``sharpguard.attacks.fab_targeted``,
   ``apgd(norm="l1")`` and ``apgd_targeted(norm="l1")`` vs the reference classes of ``pyautoattack``
   (``FABAttack_PT``, ``APGDAttack``, ``APGDAttack_targeted`` with AutoAttack's standard settings) on
   the same trained CNN and batch: wall time, robust accuracy. ``--only fab-l1`` runs this part alone
   and prints it (RESULTS.md is not written then).
4. For every training method: forwards/backwards per step declared (``method.cost``) and measured
   with forward hooks and gradient hooks on the model output (:func:`sharpguard.adversarial.count_passes`),
   the same for a SAM step that reuses the adversary vs one that regenerates it (run through the
   SAM foreach kernel), and the wall time of one training step relative to plain training.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, timed, write_section
else:  # run as python benchmarks/attacks.py: this folder is sys.path[0]
    from _results import machine, timed, write_section
from sharpguard.adversarial import count_passes, make_method, sam_adversarial_closure  # noqa: E402
from sharpguard.attacks import make_generator, pgd  # noqa: E402
from sharpguard.optim.functional import restore_, sam_perturb_  # noqa: E402


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def bench_pgd(repeats: int = 11) -> tuple[str, list[dict]]:
    import torchattacks

    model = cnn().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    rows = []
    for random_start in (False, True):
        theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=random_start)
        ours = lambda: pgd(model, x, y, steps=10, random_start=random_start,  # noqa: E731
                           generator=make_generator("cpu", 0))
        if not random_start:
            assert torch.equal(ours(), theirs(x, y)), "PGD without random start must match torchattacks exactly"
        ours(), theirs(x, y)  # warm-up
        t_ours, t_theirs = [], []
        for _ in range(repeats):  # interleaved, so a noisy neighbour hits both sides alike
            t_ours += timed(ours, 1)
            t_theirs += timed(lambda: theirs(x, y), 1)
        rows.append({
            "random_start": random_start,
            "ours_ms": 1e3 * statistics.median(t_ours),
            "theirs_ms": 1e3 * statistics.median(t_theirs),
        })
    lines = [
        "| PGD-10 linf, CNN (2 conv + 2 fc, BN), batch 128x3x32x32 | sharpguard (ms) | torchattacks 3.5.1 "
        "(ms) | ratio |",
        "|---|---|---|---|",
    ]
    for r in rows:
        label = "random start" if r["random_start"] else "no random start (outputs identical)"
        lines.append(f"| {label} | {r['ours_ms']:.1f} | {r['theirs_ms']:.1f} | {r['ours_ms'] / r['theirs_ms']:.2f} |")
    return "\n".join(lines), rows


def bench_autoattack() -> str:
    """One run each (AutoAttack is seconds, not milliseconds): digits upsampled to 16x16, a small CNN, eps 0.08."""
    import warnings

    import pyautoattack
    import torchattacks

    from sharpguard.attacks import AutoAttack

    model, x, y = digits_cnn()  # the last 256 images
    eps = 0.08

    def accuracy(adv):
        with torch.no_grad():
            return float((model(adv).argmax(1) == y).float().mean())

    ours = AutoAttack(eps=eps, generator=make_generator("cpu", 0))
    runs = [
        ("sharpguard `auto_attack` (standard)", "APGD-CE 100, APGD-T 9x100, FAB-T 9x100, Square 5000",
         lambda: ours(model, x, y)),
        ("torchattacks 3.5.1 `AutoAttack` (standard)", "APGD-CE 10, APGD-T 9x10, FAB-T 9x10, Square 5000",
         lambda: torchattacks.AutoAttack(model, eps=eps, n_classes=10, seed=0)(x, y)),
        ("reference `pyautoattack` 0.2.0 (standard)", "APGD-CE 100, APGD-T 9x100, FAB-T 9x100, Square 5000",
         lambda: pyautoattack.AutoAttack(model, eps=eps, norm="Linf", seed=0,
                                         device="cpu").run_standard_evaluation(x, y)[0]),
    ]
    lines = [
        f"| AutoAttack linf eps {eps}, CNN on digits 16x16, batch 256 (clean acc {accuracy(x):.1%}) | stages | time "
        "(s) | robust acc |",
        "|---|---|---|---|",
    ]
    for name, stages, run in runs:
        with warnings.catch_warnings(), torch.random.fork_rng():  # the peers reseed the global RNG and log
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            adv = run()
            seconds = time.perf_counter() - start
        lines.append(f"| {name} | {stages} | {seconds:.1f} | {accuracy(adv):.2%} |")
        print(lines[-1], flush=True)
    report = ours.last_report
    per_stage = ", ".join(f"{k} {v:.2f} s" for k, v in report.seconds.items())
    after = ", ".join(f"{k} {v:.2%}" for k, v in report.accuracies.items())
    return "\n".join(lines) + f"\n\nsharpguard per stage: {per_stage}; accuracy after each: {after}. One run each."


def digits_cnn(n: int = 256):
    """The AutoAttack benchmark's model and batch: a small CNN trained on digits upsampled to 16x16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = F.interpolate(torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, size=16,
                      mode="bilinear")
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[-n:], y[-n:]


def bench_fab_l1(steps: int = 100) -> str:
    """FAB-T and l1-APGD against the reference's classes, one run each (seconds, not milliseconds)."""
    import warnings

    import pyautoattack.autopgd_base as reference_apgd
    import pyautoattack.fab_pt as reference_fab

    from sharpguard.attacks import apgd, apgd_targeted, fab_targeted

    model, x, y = digits_cnn()

    def accuracy(adv):
        with torch.no_grad():
            return float((model(adv).argmax(1) == y).float().mean())

    aa_norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}
    runs = []
    for norm, eps in (("linf", 0.08), ("l2", 0.8), ("l1", 4.0)):
        runs.append((f"FAB-T {norm} eps {eps}", f"9 targets x {steps}",
                     lambda norm=norm, eps=eps: fab_targeted(model, x, y, eps=eps, steps=steps, norm=norm),
                     lambda norm=norm, eps=eps: reference_fab.FABAttack_PT(
                         model, norm=aa_norm[norm], n_restarts=1, n_iter=steps, eps=eps, targeted=True,
                         n_target_classes=9, device="cpu", seed=0).perturb(x, y)))
    eps = 4.0
    runs.append((f"l1-APGD-CE eps {eps}", f"{steps} steps, radius schedule 3/2/1 eps",
                 lambda: apgd(model, x, y, eps=eps, steps=steps, norm="l1", generator=make_generator("cpu", 0)),
                 lambda: reference_apgd.APGDAttack(model, n_iter=steps, norm="L1", eps=eps, loss="ce", device="cpu",
                                                   seed=0, use_largereps=True).perturb(x, y)))
    runs.append((f"l1-APGD-T eps {eps}", f"5 targets x {steps}, radius schedule",
                 lambda: apgd_targeted(model, x, y, eps=eps, steps=steps, norm="l1", n_target_classes=5,
                                       generator=make_generator("cpu", 0)),
                 lambda: reference_apgd.APGDAttack_targeted(model, n_iter=steps, norm="L1", eps=eps, device="cpu",
                                                            seed=0, n_target_classes=5,
                                                            use_largereps=True).perturb(x, y)))
    lines = [
        f"| stage, CNN on digits 16x16, batch {len(y)} (clean acc {accuracy(x):.1%}) | settings | sharpguard (s) | "
        "pyautoattack 0.2.0 (s) | robust acc sharpguard | robust acc pyautoattack |",
        "|---|---|---|---|---|---|",
    ]
    for name, settings, ours, theirs in runs:
        results = []
        for run in (ours, theirs):
            with warnings.catch_warnings(), torch.random.fork_rng():  # the reference reseeds the global RNG
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                adv = run()
                results.append((time.perf_counter() - start, accuracy(adv)))
        (t_ours, a_ours), (t_ref, a_ref) = results
        lines.append(f"| {name} | {settings} | {t_ours:.2f} | {t_ref:.2f} | {a_ours:.2%} | {a_ref:.2%} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n\nOne run each, interleaved per stage; FAB-T is deterministic (no restarts) in both."


def sam_step(model, closure, rho=0.05):
    """A SAM step through the foreach kernel (closure at w, perturb, closure at w+e, restore)."""
    params = [p for p in model.parameters() if p.requires_grad]
    closure()
    backup, _ = sam_perturb_(params, [p.grad for p in params], rho)
    for p in params:
        p.grad = None
    closure()
    restore_(params, backup)


PAPERS = {
    "pgd-at": "Madry et al. 2018", "trades": "Zhang et al. 2019", "mart": "Wang et al. 2020",
    "fast-at": "Wong et al. 2020", "awp": "Wu et al. 2020", "defensive-distillation": "Papernot et al. 2016",
    "fgm": "Miyato et al. 2017", "embedding-pgd": "Madry et al. 2018 (embeddings)", "freelb": "Zhu et al. 2020",
    "smart": "Jiang et al. 2020", "r3f": "Aghajanyan et al. 2021", "free-at": "Shafahi et al. 2019",
    "grad-align": "Andriushchenko & Flammarion 2020",
}


def bench_methods(repeats: int = 3) -> str:
    import transformers

    g = torch.Generator().manual_seed(0)
    image = (torch.rand(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    cfg = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, num_labels=2)
    ids = torch.randint(5, 1000, (32, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 32:] = 0
    text = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (32,), generator=g)}
    teacher = cnn().eval()
    specs = [("pgd-at", {"steps": 10}, "image"), ("trades", {"steps": 10}, "image"), ("mart", {"steps": 10}, "image"),
             ("fast-at", {}, "image"), ("free-at", {}, "image"), ("grad-align", {}, "image"),
             ("awp", {"steps": 10}, "image"), ("awp", {"base": "trades", "steps": 10}, "image"),
             ("defensive-distillation", {"teacher": teacher}, "image"),
             ("fgm", {}, "text"), ("embedding-pgd", {"steps": 3}, "text"), ("freelb", {"steps": 3}, "text"),
             ("smart", {"steps": 1}, "text"), ("r3f", {}, "text")]

    def plain_step(model, batch):
        loss = F.cross_entropy(model(batch[0]), batch[1]) if isinstance(batch, tuple) else model(**batch).loss
        loss.backward()

    def build(kind):
        if kind == "image":
            return cnn().train(), image
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(cfg).train(), text

    baseline = {}
    for kind in ("image", "text"):
        model, batch = build(kind)
        plain_step(model, batch)
        baseline[kind] = statistics.median(timed(lambda: plain_step(model, batch), repeats))

    lines = [
        "| method (paper) | settings | declared F/B | measured F/B | SAM + method, reuse: declared / measured | SAM, "
        "regenerate: measured | step time vs plain |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, kw, kind in specs:
        model, batch = build(kind)
        method = make_method(name, **kw)
        with count_passes(model) as counted:
            method(model, batch).backward()
        with count_passes(model) as reused:
            sam_step(model, sam_adversarial_closure(model, method, batch, reuse=True))
        with count_passes(model) as regenerated:
            sam_step(model, sam_adversarial_closure(model, method, batch, reuse=False))
        step = statistics.median(timed(lambda: method(model, batch).backward(), repeats))
        shown = {k: v for k, v in kw.items() if k != "teacher"} | ({"teacher": "CNN"} if "teacher" in kw else {})
        settings = ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults"
        lines.append(
            f"| {name} ({PAPERS[name]}) | {settings} | {method.cost[0]}/{method.cost[1]} | "
            f"{counted.forwards}/{counted.backwards} | {method.sam_cost(True)[0]}/{method.sam_cost(True)[1]} / "
            f"{reused.forwards}/{reused.backwards} | {regenerated.forwards}/{regenerated.backwards} | "
            f"{step / baseline[kind]:.1f}x |"
        )
        print(lines[-1], flush=True)
    notes = (
        "F/B: forward/backward passes of the model over the batch per training step (plain training = 1/1); a "
        "`backward()` through a loss built from two forwards counts two. Teacher forwards (distillation) are "
        "declared but not hooked (another module). Image methods: the CNN above, batch 64. Text methods: BERT, "
        "2 layers, hidden 64, batch 32x48 with padding. Step time: median of "
        f"{repeats}, relative to a plain step on the same model and batch "
        f"({1e3 * baseline['image']:.0f} ms image, {1e3 * baseline['text']:.0f} ms text)."
    )
    return "\n".join(lines) + "\n\n" + notes


def main() -> None:
    if sys.argv[1:] == ["--only", "fab-l1"]:
        bench_fab_l1()
        return
    pgd_table, _ = bench_pgd()
    print(pgd_table, flush=True)
    autoattack_table = bench_autoattack()
    methods_table = bench_methods()
    markdown = "\n\n".join([
        f"Machine: {machine()}. Script: `benchmarks/attacks.py` (one run, both libraries on the same model and "
        f"batch, repeats interleaved). 1-minute load average at the end: {os.getloadavg()[0]:.1f} (a shared "
        "machine: ratios within ~5% are noise).",
        "### PGD-10: sharpguard vs torchattacks\n\n" + pgd_table,
        "### AutoAttack: sharpguard vs torchattacks vs the reference\n\n" + autoattack_table,
        "### FAB-T and l1-APGD: sharpguard vs the reference, stage by stage\n\n" + bench_fab_l1(),
        "### Passes per training step (hook-counted) and SAM + adversarial training\n\n" + methods_table,
    ])
    write_section("Attacks", markdown)
    print("\nwrote section 'Attacks' of", Path(__file__).with_name("RESULTS.md"))


if __name__ == "__main__":
    main()
