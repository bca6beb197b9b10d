"""lambda_max to 1e-4 relative error: sharpguard's Lanczos vs PyHessian and hessian-eigenthings.

One run, the same models, batches and parameters for every method (float32, CPU):

* ``mlp``      - 64-32-10 ReLU MLP on 512 sklearn digits, briefly trained;
* ``conv_bn``  - two conv + BatchNorm layers (eval mode) on the same digits, briefly trained;
* ``bert_sdpa``- one-layer BERT from a small config with SDPA attention on synthetic tokens; double
  backward fails in PyTorch's fused CPU attention kernel, so sharpguard falls back to the math kernel by
  itself, while the peers are run inside ``sdpa_kernel(SDPBackend.MATH)`` (without it they crash);
* ``cluster``  - a quadratic ``1/2 sum_i lambda_i w_i^2`` wrapped as an nn.Module, with designed top
  eigenvalues 1.0, 0.97, 0.95, 0.93, 0.90 over a bulk in [0, 0.5]: the clustered class-outlier case
  (lambda_2/lambda_1 = 0.97).

Columns. *stop*: the method's own stopping rule at tol=1e-4 (ours: Ritz residual <= 1e-4 |theta|, which
certifies the error; PyHessian: relative change of the Rayleigh quotient < 1e-4; hessian-eigenthings
power iteration: relative change and residual < 1e-4), with the error it actually reached. *reach*: the
first product after which the method's running estimate is within 1e-4 of the reference (an oracle,
generous to every method): Rayleigh quotient for power iteration, top Ritz value for Lanczos. Seconds
are wall time to that point. The reference lambda_max is our Lanczos at tol=1e-9 (residual-certified).
Every count includes all Hessian-vector products (ours includes the determinism check's extra one).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/curvature.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, write_section
else:  # run as python benchmarks/curvature.py: this folder is sys.path[0]
    from _results import machine, write_section
from sharpguard.sharpness import HVPOperator, hessian_eigenvalues
from sharpguard.sharpness.lanczos import Krylov

TOL = 1e-4
MAX_HVP = 3000


INTRO = (
    "HVPs / seconds to lambda_max within 1e-4 relative error (float32, one fixed batch per model). "
    "*stop* = the method's own stopping rule at tol=1e-4 and the error it reached; *reach* = first product "
    "whose running estimate is within 1e-4 of the reference (oracle). PyHessian = pip `pyhessian` 0.1 "
    "power iteration (`cuda=False`); HE = `hessian-eigenthings` 1.0.0a5 (power iteration with its own stop "
    "rule; its Lanczos with full reorthogonalization, oracle m). BERT: peers run under "
    "`sdpa_kernel(MATH)` (they fail otherwise); ours falls back to it by itself."
)


class _Reached(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# models and probes


def _digits(n=512):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target[:n])


def _train(model, x, y, steps=60):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def mlp_case():
    torch.manual_seed(0)
    x, y = _digits()
    model = _train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x, y)
    return model.eval(), (x, y), F.cross_entropy


def conv_case():
    torch.manual_seed(0)
    x, y = _digits()
    x = x.view(-1, 1, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    model = _train(model, x, y)
    return model.eval(), (x, y), F.cross_entropy


class _BertLogits(nn.Module):
    """Returns logits, so PyHessian's ``criterion(model(x), y)`` protocol applies to a HF model."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids):
        return self.bert(input_ids=input_ids).logits


def bert_case():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=4,
        attn_implementation="sdpa",
    )
    model = _BertLogits(BertForSequenceClassification(cfg)).eval()
    ids = torch.randint(0, 100, (64, 12))
    labels = ids[:, 0] % 4  # learnable from the first token
    return model, (ids, labels), F.cross_entropy


class ClusteredQuadratic(nn.Module):
    """``L(w) = 1/2 sum_i lambda_i w_i^2``: Hessian diag(lambda) with a designed spectrum."""

    def __init__(self, n=4000):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        bulk = 0.5 * torch.rand(n - 5, generator=g)
        self.register_buffer("lam", torch.cat([torch.tensor([1.0, 0.97, 0.95, 0.93, 0.90]), bulk]))
        self.w = nn.Parameter(torch.randn(n, generator=g))

    def forward(self, x):
        return 0.5 * (self.lam * self.w**2).sum() + 0.0 * x.sum()


def cluster_case():
    model = ClusteredQuadratic()
    return model, (torch.zeros(1, 1), torch.zeros(1)), lambda out, _y: out


CASES = {"mlp": mlp_case, "conv_bn": conv_case, "bert_sdpa": bert_case, "cluster": cluster_case}


def _math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ---------------------------------------------------------------------------------------------------
# runs


def run_ours(model, batch, criterion, ref):
    loss_fn = lambda m, b: criterion(m(b[0]), b[1])
    t0 = time.perf_counter()
    r = hessian_eigenvalues(model, batch, loss_fn, tol=TOL, max_iter=MAX_HVP)
    stop = {"hvp": r.n_hvp, "s": time.perf_counter() - t0, "err": abs(r.lambda_max - ref) / ref, "method": r.hvp_method}
    # oracle trajectory: top Ritz value after each step, same start vector as hessian_eigenvalues(seed=0)
    t0 = time.perf_counter()
    reach = None
    with HVPOperator(model, batch, loss_fn, check_determinism=False) as op:
        g = torch.Generator().manual_seed(0)
        kry = Krylov(op.matvec, torch.randn(op.size, generator=g, dtype=op.dtype), MAX_HVP, g)
        while kry.step():
            theta = kry.ritz()[0][-1]
            if abs(theta - ref) / ref < TOL:
                reach = {"hvp": op.n_hvp, "s": time.perf_counter() - t0}
                break
    return stop, reach


def run_pyhessian(model, batch, criterion, ref, math_kernel):
    import pyhessian.hessian  # noqa: F401  (the package re-exports a class of the same name)

    ph = sys.modules["pyhessian.hessian"]

    results = {}
    for mode in ("stop", "reach"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        original = ph.hessian_vector_product
        trace = {"n": 0}
        t0 = time.perf_counter()

        def recording(gradsH, params, v, _orig=original, _trace=trace, _mode=mode, _t0=t0):
            hv = _orig(gradsH, params, v)
            _trace["n"] += 1
            if _mode == "reach":
                rq = float(sum((a * b).sum() for a, b in zip(hv, v)))
                if abs(rq - ref) / ref < TOL:
                    _trace["s"] = time.perf_counter() - _t0
                    raise _Reached
            return hv

        ph.hessian_vector_product = recording
        try:
            with _math_kernel() if math_kernel else contextlib.nullcontext():
                h = ph.hessian(model, criterion, data=batch, cuda=False)
                lam, _ = h.eigenvalues(maxIter=MAX_HVP, tol=TOL if mode == "stop" else 0.0)
            if mode == "stop":
                results["stop"] = {"hvp": trace["n"], "s": time.perf_counter() - t0, "err": abs(lam[0] - ref) / ref}
            else:
                results["reach"] = None
        except _Reached:
            results["reach"] = {"hvp": trace["n"], "s": trace["s"]}
        finally:
            ph.hessian_vector_product = original
            model.zero_grad(set_to_none=True)
    return results


def run_eigenthings(model, batch, criterion, ref, math_kernel):
    import hessian_eigenthings as he

    loss_fn = lambda m, b: criterion(m(b[0]), b[1])
    op = he.HessianOperator(model, [batch], loss_fn)
    count = {"n": 0, "t": []}
    t_start = [0.0]

    class Counting(he.LambdaOperator):
        pass

    def matvec(v):
        out = op.matvec(v)
        count["n"] += 1
        count["t"].append(time.perf_counter() - t_start[0])
        return out

    cop = Counting(matvec, size=op.size, device=op.device, dtype=op.dtype)
    with _math_kernel() if math_kernel else contextlib.nullcontext():
        t_start[0] = time.perf_counter()
        lam, *_ = he.power_iteration_one(cop, max_iter=MAX_HVP, tol=TOL, seed=0)
        power = {"hvp": count["n"], "s": time.perf_counter() - t_start[0], "err": abs(lam - ref) / ref}
        # Lanczos: the top Ritz value of each leading T_m is what lanczos(max_iter=m) returns
        count["n"], count["t"] = 0, []
        steps = min(op.size - 1, 400)
        g = torch.Generator().manual_seed(0)
        t_start[0] = time.perf_counter()
        td = he.lanczos_tridiagonal(cop, torch.randn(op.size, generator=g), steps, reorthogonalize=True)
    a, b = td.alphas.double().numpy(), td.betas.double().numpy()
    reach = None
    for m in range(1, len(a) + 1):
        t = np.diag(a[:m]) + np.diag(b[: m - 1], 1) + np.diag(b[: m - 1], -1)
        if abs(np.linalg.eigvalsh(t)[-1] - ref) / ref < TOL:
            reach = {"hvp": m, "s": count["t"][m - 1]}
            break
    return power, reach


def hvp_cost(model, batch, criterion, reps=20):
    """Seconds of one HVP (our operator) and of one forward+backward on the same batch."""
    loss_fn = lambda m, b: criterion(m(b[0]), b[1])
    with HVPOperator(model, batch, loss_fn, check_determinism=False) as op:
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(1))
        op.matvec(v)
        t0 = time.perf_counter()
        for _ in range(reps):
            op.matvec(v)
        t_hvp = (time.perf_counter() - t0) / reps
        method = op.method
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.autograd.grad(loss_fn(model, batch), params)
    t_fb = (time.perf_counter() - t0) / reps
    return t_hvp, t_fb, method


def warm_start_rows():
    model, (x, y), criterion = mlp_case()
    loss_fn = lambda m, b: criterion(m(b[0]), b[1])
    before = hessian_eigenvalues(model, (x, y), loss_fn, return_eigenvectors=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    cold = hessian_eigenvalues(model, (x, y), loss_fn)
    warm = hessian_eigenvalues(model, (x, y), loss_fn, init=before.eigenvectors[0])
    return [("cold (random)", cold), ("warm (previous eigenvector)", warm)]


def main() -> None:
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.set_num_threads(1)
    rows, costs = [], []
    for name, build in CASES.items():
        model, batch, criterion = build()
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        math_kernel = name == "bert_sdpa"
        loss_fn = lambda m, b, c=criterion: c(m(b[0]), b[1])
        exact = hessian_eigenvalues(model, batch, loss_fn, k=2, tol=1e-9, max_iter=MAX_HVP)
        ref = exact.lambda_max
        ours_stop, ours_reach = run_ours(model, batch, criterion, ref)
        ph = run_pyhessian(model, batch, criterion, ref, math_kernel)
        he_power, he_lanczos = run_eigenthings(model, batch, criterion, ref, math_kernel)
        t_hvp, t_fb, method = hvp_cost(model, batch, criterion)
        rows.append((name, n, ref, exact.eigenvalues[1] / ref, ours_stop, ours_reach, ph, he_power, he_lanczos))
        costs.append((name, method, t_hvp, t_fb))
        print(f"{name}: done", flush=True)

    warm = warm_start_rows()

    def fmt(r, err=False):
        if r is None:
            return "not reached"
        out = f"{r['hvp']} / {r['s']:.3f}s"
        return out + (f" (err {r['err']:.0e})" if err else "")

    lines = [
        f"Machine: {machine()}.",
        "",
        INTRO,
        "",
        (
            "| model | params | lambda_1 | l2/l1 | ours stop | ours reach | PyHessian stop | PyHessian reach "
            "| HE power stop | HE Lanczos reach | PyHessian/ours (reach) | PyHessian reach / ours stop |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, ref, gap, o_stop, o_reach, ph, hp, hl in rows:
        if ph["reach"] is None:
            like, vs_stop = "never (converges to a negative eigenvalue)", "n/a"
        else:
            like = f"{ph['reach']['hvp'] / o_reach['hvp']:.1f}x"
            vs_stop = f"{ph['reach']['hvp'] / o_stop['hvp']:.1f}x"
        lines.append(
            f"| {name} | {n} | {ref:.4g} | {gap:.3f} | {fmt(o_stop, True)} | {fmt(o_reach)} | "
            f"{fmt(ph['stop'], True)} | {fmt(ph['reach'])} | {fmt(hp, True)} | {fmt(hl)} | {like} | {vs_stop} |"
        )
    lines += [
        "",
        (
            "Warm start (what the monitor does): lambda_max of the MLP after 5 more SGD steps (lr 0.05), "
            "started cold and from the previous call's top eigenvector (tol 1e-4, determinism check included):"
        ),
        "",
        "| start | HVPs | seconds |",
        "|---|---|---|",
    ]
    for label, r in warm:
        lines.append(f"| {label} | {r.n_hvp} | {r.seconds:.3f} |")
    lines += [
        "",
        "Cost of one HVP against one forward+backward on the same batch (our operator, mean of 20):",
        "",
        "| model | HVP method | HVP (ms) | forward+backward (ms) | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, method, t_hvp, t_fb in costs:
        lines.append(f"| {name} | {method} | {1e3 * t_hvp:.2f} | {1e3 * t_fb:.2f} | {t_hvp / t_fb:.1f}x |")
    text = "\n".join(lines)
    print(text)
    write_section("Curvature", text)


if __name__ == "__main__":
    main()
