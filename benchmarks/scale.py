"""What SAM and a lambda_max check cost as models grow, side by side with their peers (issue 13).

Models: GPT-2 decoders built from ``transformers.GPT2Config`` (vocab 8000, 8 x 128 tokens, eager
attention; ~1.4M, 5.2M, 10.2M and 29.4M parameters, the last left out with ``--without-29m``) and a ResNet-style CNN (3
stages of two basic blocks, 32 x 3 x 32 x 32 images). ``--quick``: the 1.4M decoder and a narrower CNN on smaller
batches (about a minute).

Columns, per model:

* *SAM step / 2 plain*: one ``sharpguard.optim.SAM`` step against two plain steps of its base optimizer
  (AdamW), interleaved in one process; the peer is ``pytorch_optimizer.SAM`` (``first_step``/``second_step``).
* *SAM extra mem / param bytes*: peak RSS of a SAM step minus that of a plain step, over 4 bytes x P.
* *HVP / fwd+bwd*: one Hessian-vector product on a probe of two batches (half the batch each, so no
  cached graph) against one forward+backward of the same examples; the peer is PyHessian's
  ``dataloader_hv_product`` on the same two batches. The same product by forward-over-reverse
  (``torch.func.jvp`` of ``torch.func.grad``, :func:`hvp_forward_over_reverse`) is timed beside it, and
  both products' extra peak memory is measured in fresh processes (*one HVP's extra peak*).
* *check*: ``hessian_eigenvalues(model, batch, k=1)`` with its defaults (tol 1e-4, the bounded Lanczos
  basis of 5 vectors, ``micro_batches="auto"``: the slices it chooses so that a check stays within a
  training step's memory, the GPT-2 targets kept batch-first so the batch splits by sequences) but
  ``max_iter=20`` (the basis is full after 5 products, so the memory peak is that of the default
  ``max_iter=100``; the time grows with the products), seconds and extra peak memory over the training
  step's extra peak; *check, whole batch*: the same with ``micro_batches=1`` (the default before: the whole
  batch's graph, cached); the defaults with ``hvp="finite_difference"`` (two gradient passes per product,
  no double-backward graph), and PyHessian's ``eigenvalues(top_n=1, maxIter=20)`` (tol 1e-3) on the same
  batch.

Peak memory: every memory number comes from a fresh subprocess (the training, SAM and peer SAM steps: the
median of three) that builds the model and batch, resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), reads the RSS (the baseline), runs the one measured
thing and reads the peak RSS (``VmHWM``): the *extra peak RSS* of that thing, allocator effects included (glibc's
default malloc). The training step is forward + backward + ``AdamW.step()`` (its state is allocated on that first step).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py`` (full: about 10 minutes on 2 cores),
``--quick`` for the small sizes; writes the "Scale" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, write_section
else:  # run as python benchmarks/scale.py: this folder is sys.path[0]
    from _results import machine, write_section
from sharpguard.sharpness import auto_micro_batches

GPT2_SIZES = {"gpt2-1.4M": (128, 2), "gpt2-5.2M": (256, 4), "gpt2-10.2M": (384, 4), "gpt2-29M": (512, 8)}
CNN_WIDTHS = {"cnn": (64, 128, 256), "cnn-small": (32, 64, 128)}
# Products per check: the bounded basis is full after 5, so the memory peak is that of the defaults
# (max_iter=100); 20 keeps a full run near 10 minutes on 2 shared cores. Time scales with the products.
MAX_ITER = 20


# ---------------------------------------------------------------------------------------------------
# models and batches


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.skip(x))


def resnet(widths: tuple[int, int, int]) -> nn.Module:
    """A ResNet-style CNN: a stem, three stages of two basic blocks (stride 2 between stages), a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers += [_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


class _LMLogits(nn.Module):
    """GPT-2 returning flat logits, so ``criterion(model(x), y)`` (PyHessian's protocol) is its LM loss."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=ids).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def lm_targets(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, 1:].reshape(-1)


def build(name: str, quick: bool) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The model (eval-free: its mode is left to the measurement) and one batch ``(inputs, targets)``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        width, depth = GPT2_SIZES[name]
        config = GPT2Config(
            vocab_size=8000, n_positions=128, n_embd=width, n_layer=depth, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
        )
        model = _LMLogits(GPT2LMHeadModel(config))
        rows, cols = (4, 64) if quick else (8, 128)
        ids = torch.randint(0, 8000, (rows, cols), generator=g)
        return model, (ids, lm_targets(ids))
    model = resnet(CNN_WIDTHS[name])
    n = 16 if quick else 32
    return model, (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def halves(batch: tuple[torch.Tensor, torch.Tensor], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch as two probe batches (by examples; an LM's targets follow its rows)."""
    x = batch[0]
    h = x.shape[0] // 2
    if name.startswith("gpt2"):
        return [(x[:h], lm_targets(x[:h])), (x[h:], lm_targets(x[h:]))]
    return [(x[:h], batch[1][:h]), (x[h:], batch[1][h:])]


def hvp_forward_over_reverse(model: nn.Module, probe: list,
                             tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same product as forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` (the route
    issue 13 proposed because it keeps no double-backward graph), summed over the probe batches like the
    operator's: measured here against double backward rather than adopted (see docs/cost_model.md)."""
    from torch.func import functional_call, grad, jvp

    params = {n: p.detach() for n, p in model.named_parameters()}
    total: dict[str, torch.Tensor] | None = None
    for x, y in probe:
        def batch_loss(p: dict[str, torch.Tensor], x=x, y=y) -> torch.Tensor:
            return (F.cross_entropy(functional_call(model, p, (x,)), y)
                    * (x.shape[0] / sum(b[0].shape[0] for b in probe)))

        _, hv = jvp(grad(batch_loss), (params,), (tangents,))
        total = hv if total is None else {k: total[k].add_(hv[k]) for k in hv}
    assert total is not None
    return total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# one measurement per fresh process (peak RSS)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> float:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)
    and return the current RSS in MiB. Without the reset, ``ru_maxrss`` keeps the high-water mark of
    ``import torch`` itself, and a small model's step never rises above it."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def live_peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes that CPU tensors allocated while ``fn`` runs hold at once, less those they have freed:
    the CPU allocator's own running count, which it reports to ``torch.profiler`` with ``profile_memory=True``.
    Unlike the peak RSS it counts live tensor storages only (no lazy initialisation, no pages glibc keeps after
    a free), the quantity the simulation counts, measured on real kernels."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append(event)
    if not events:
        return 0
    events.sort(key=lambda e: e.start_time_ns)
    # the count is the process's since profiling first began (blocks freed while no profiler ran are never
    # taken off it), so the peak is measured from the count just before this run's first allocation
    first = events[0].extra_fields
    return max(e.extra_fields.total_allocated for e in events) - (first.total_allocated - first.alloc_size)


def _pyhessian(model, batch=None, dataloader=None):
    import pyhessian.hessian  # noqa: F401  (the package re-exports a class of the same name)

    ph = sys.modules["pyhessian.hessian"]
    with contextlib.redirect_stdout(io.StringIO()):
        return ph.hessian(model, nn.CrossEntropyLoss(), data=batch, dataloader=dataloader, cuda=False)


def worker(name: str, what: str, quick: bool) -> dict:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, batch = build(name, quick)
    model.train()
    base = _reset_peak()
    out: dict = {}
    start = time.perf_counter()
    if what == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_of(model, batch).backward()
        opt.step()
    elif what in ("sam", "peer_sam"):
        if what == "sam":
            from sharpguard.optim import SAM

            opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)
        else:
            from pytorch_optimizer import SAM as PeerSAM

            opt = PeerSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)

        def closure():
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            return loss

        if what == "sam":
            opt.step(closure)
        else:
            closure()
            opt.first_step(zero_grad=True)
            closure()
            opt.second_step(zero_grad=True)
    elif what in ("hvp", "hvp_fwd_over_rev"):
        # one product on the probe of two half batches (as the time column), eval mode like the measures
        model.eval()
        probe = halves(batch, name)
        g = torch.Generator().manual_seed(0)
        if what == "hvp":
            from sharpguard.sharpness import HVPOperator

            v = torch.randn(n_params(model), generator=g)
            with HVPOperator(model, probe, loss_of, check_determinism=False) as op:
                op.matvec(v)
        else:
            tangents = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
            hvp_forward_over_reverse(model, probe, tangents)
    elif what in ("check", "check_whole", "check_fd"):
        from sharpguard.sharpness import hessian_eigenvalues

        # the function's defaults (micro_batches="auto": the slices its choice takes, its forward part of
        # the check); targets kept batch-first so the batch splits by examples, the same loss.
        # check_whole: the whole batch at once (micro_batches=1, the old default, graph cached)
        x, y = batch
        y2 = x[:, 1:] if name.startswith("gpt2") else y
        loss = lambda m, b: F.cross_entropy(m(b[0]), b[1].reshape(-1))  # noqa: E731
        kw = {"check_whole": {"micro_batches": 1}, "check_fd": {"hvp": "finite_difference"}}.get(what, {})
        r = hessian_eigenvalues(model, (x, y2), loss, k=1, max_iter=MAX_ITER, **kw)
        out.update(
            lam=r.lambda_max, n_hvp=r.n_hvp, residual=r.residuals[0], converged=r.converged,
            basis=r.basis_vectors, restarts=r.n_restarts, method=r.hvp_method,
            micro_batches=r.settings["micro_batches"],
        )
    elif what == "pyhessian":
        model.eval()
        h = _pyhessian(model, batch=batch)
        lam, _ = h.eigenvalues(top_n=1, maxIter=MAX_ITER)
        out.update(lam=float(lam[0]))
    else:
        raise SystemExit(f"unknown measurement {what!r}")
    out.update(seconds=time.perf_counter() - start, extra_mib=_peak_mib() - base)
    return out


def measure(name: str, what: str, quick: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", name, what] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{name}/{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# time ratios, interleaved in one process


def _interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Min over ``rounds`` of each function's time, the functions taking turns in every round (so a
    load change on a shared machine hits all of them alike); one warm-up call each first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


def time_ratios(name: str, quick: bool, rounds: int) -> dict:
    from pytorch_optimizer import SAM as PeerSAM

    from sharpguard.optim import SAM
    from sharpguard.sharpness import HVPOperator

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    model, batch = build(name, quick)
    model.train()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ours = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)
    peer = PeerSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            return loss

        return closure

    def plain2():
        for _ in range(2):
            closure_for(plain)()
            plain.step()

    def peer_step():
        c = closure_for(peer)
        c()
        peer.first_step(zero_grad=True)
        c()
        peer.second_step(zero_grad=True)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss_of(model, batch).backward()

    out: dict = _interleaved(
        {"plain2": plain2, "sam": lambda: ours.step(closure_for(ours)), "peer_sam": peer_step}, rounds
    )
    model.zero_grad(set_to_none=True)
    # products on the eval-mode model (as the measures run it), against a forward+backward in eval mode
    model.eval()
    probe = halves(batch, name)
    v = torch.randn(n_params(model), generator=torch.Generator().manual_seed(0))
    vs = [torch.randn_like(p) for p in model.parameters()]
    h = _pyhessian(model, dataloader=probe)
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        op = stack.enter_context(HVPOperator(model, probe, loss_of, check_determinism=False))
        fd = stack.enter_context(HVPOperator(model, probe, loss_of, hvp="finite_difference", check_determinism=False))
        op.matvec(v)
        tangents = dict(zip((n for n, _ in model.named_parameters()), op.unflatten(v)))
        out.update(
            _interleaved(
                {
                    "fwd_bwd": fwd_bwd,
                    "hvp": lambda: op.matvec(v),
                    "hvp_fwd_over_rev": lambda: hvp_forward_over_reverse(model, probe, tangents),
                    "hvp_fd": lambda: fd.matvec(v),
                    "hvp_pyhessian": lambda: h.dataloader_hv_product(vs),
                },
                rounds,
            )
        )
        out["hvp_method"] = op.method
    model.zero_grad(set_to_none=True)
    out["params"] = n_params(model)
    return out


# ---------------------------------------------------------------------------------------------------


def render_row(name: str, mem: dict, t: dict) -> str:
    """One row of the table from one model's measurements (``scale_raw.json`` holds them all)."""
    pbytes = 4 * t["params"] / 2**20
    whole = mem.get("check_whole", mem.get("check_mb"))  # rows measured before the defaults changed: check_mb
    tr = dict(mem["train"])
    tr["extra_mib"] = max(tr["extra_mib"], 1.0)
    return (
        f"| {name} | {t['params'] / 1e6:.2f}M | {t['sam'] / t['plain2']:.2f} / {t['peer_sam'] / t['plain2']:.2f} "
        f"| {(mem['sam']['extra_mib'] - tr['extra_mib']) / pbytes:.2f} / "
        f"{(mem['peer_sam']['extra_mib'] - tr['extra_mib']) / pbytes:.2f} "
        f"| {t['hvp'] / t['fwd_bwd']:.2f} / {t['hvp_fwd_over_rev'] / t['fwd_bwd']:.2f} / "
        f"{t['hvp_fd'] / t['fwd_bwd']:.2f} / {t['hvp_pyhessian'] / t['fwd_bwd']:.2f} "
        f"| {mem['hvp']['extra_mib'] / tr['extra_mib']:.2f}x / "
        f"{mem['hvp_fwd_over_rev']['extra_mib'] / tr['extra_mib']:.2f}x | {tr['extra_mib']:.0f} MiB, "
        f"{tr['seconds']:.2f} s | {mem['check'].get('micro_batches', '?')}: {mem['check']['seconds']:.1f} s, "
        f"{mem['check']['n_hvp']} HVP, {mem['check']['extra_mib'] / tr['extra_mib']:.2f}x "
        f"| {whole['seconds']:.1f} s, {whole['extra_mib'] / tr['extra_mib']:.2f}x "
        f"| {mem['check_fd']['seconds']:.1f} s, {mem['check_fd']['n_hvp']} HVP, "
        f"{mem['check_fd']['extra_mib'] / tr['extra_mib']:.2f}x | {mem['pyhessian']['seconds']:.1f} s, "
        f"{mem['pyhessian']['extra_mib'] / tr['extra_mib']:.2f}x | {mem['check']['lam']:.5g} / {whole['lam']:.5g} / "
        f"{mem['check_fd']['lam']:.5g} / {mem['pyhessian']['lam']:.5g} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and batches (about a minute)")
    ap.add_argument("--without-29m", action="store_true", help="leave out the 29M-parameter decoder (about 8 minutes)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    ap.add_argument("--rerun", nargs=2, action="append", metavar=("MODEL", "WHAT"),
                    help="re-measure one memory measurement (e.g. gpt2-1.4M check) into scale_raw.json and rewrite "
                         "the table from it, saying so under the table; repeatable")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.quick)))
        return
    torch.set_num_threads(1)
    if args.quick:
        names = ["gpt2-1.4M", "cnn-small"]
    else:
        names = ["gpt2-1.4M", "gpt2-5.2M", "cnn", "gpt2-10.2M"] + ([] if args.without_29m else ["gpt2-29M"])
    rows = []
    raw = {}
    raw_file = Path(__file__).with_name("scale_raw.json")
    reruns = args.rerun or []
    if reruns:  # the rest of the table stays as last measured
        raw = json.loads(raw_file.read_text())
        for name, what in reruns:
            raw[name]["mem"][what] = measure(name, what, args.quick)
        rows = [render_row(name, r["mem"], r["time"]) for name, r in raw.items()]
        names = []
    for name in names:
        t0 = time.perf_counter()
        mem = {w: measure(name, w, args.quick) for w in ("check", "check_whole", "check_fd", "pyhessian", "hvp",
                                                         "hvp_fwd_over_rev")}
        # a step's peak RSS moves by tens of MiB between fresh processes (where glibc's heap ends up): the
        # median of three processes for the three step measurements, whose differences make the SAM column
        for w in ("train", "sam", "peer_sam"):
            runs = sorted((measure(name, w, args.quick) for _ in range(3)), key=lambda r: r["extra_mib"])
            mem[w] = runs[1]
        t = time_ratios(name, args.quick, rounds=2 if not args.quick else 3)
        raw[name] = {"mem": mem, "time": t}
        rows.append(render_row(name, mem, t))
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not args.no_write:
            raw_file.write_text(json.dumps(raw, indent=1, default=str))
    lines = [
        f"Machine: {machine()}. `benchmarks/scale.py{' --quick' if args.quick else ''}`; one intra-op thread.",
        ("Memory: extra peak RSS (`VmHWM` after resetting it through `/proc/self/clear_refs`) of the one measured "
        "thing in a fresh subprocess, over the RSS after building the model and batch; glibc malloc. Time: min over "
        "rounds, interleaved in one process. `a / b` = sharpguard / peer (pytorch_optimizer SAM; PyHessian). "
        "HVP columns: double backward (sharpguard `auto`) / forward-over-reverse (`torch.func.jvp` of "
        "`torch.func.grad`) / sharpguard finite differences / PyHessian, on a probe of two half batches, eval mode; "
        "*one HVP's extra peak*: the same product in a fresh process over the training step's extra peak. Check: "
        "`hessian_eigenvalues(k=1)` defaults (tol 1e-4, basis of 5 vectors, `micro_batches=\"auto\"`: `slices: time, "
        "products, peak`) with max_iter=20 (the basis is full after 5 products, so the peak is the defaults'), its "
        "extra peak over the training step's (forward, backward, AdamW step); *whole batch* the same with "
        "`micro_batches=1` (the default before: one cached graph of the whole batch); *fd* the defaults with "
        "`hvp=\"finite_difference\"`; PyHessian `eigenvalues(top_n=1, maxIter=20)` (tol 1e-3). The monitor's "
         "RSS-over-300-steps column is measured by benchmarks/monitor_overhead.py."),
        "",
        ("| model | params | SAM step / 2 plain (ours / peer) | SAM extra mem / param bytes (ours / peer) "
         "| HVP / fwd+bwd (autograd / fwd-over-rev / fd / PyHessian) | one HVP's extra peak / train step's (autograd / "
         "fwd-over-rev) | train step extra peak, time | check (defaults) | check, whole batch | check fd | PyHessian "
         "check | lambda_max (ours / whole batch / fd / PyHessian) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    table = "\n".join(lines)
    print(table)
    if reruns:
        table += ("\n\nRe-measured after the rest of the table (fresh processes, same script): "
                  + ", ".join(f"{n} `{w}`" for n, w in reruns) + ".")
    if not args.no_write:
        raw_file.write_text(json.dumps(raw, indent=1, default=str))
        write_section("Scale" + (" (quick)" if args.quick else ""), table)


if __name__ == "__main__":
    main()
