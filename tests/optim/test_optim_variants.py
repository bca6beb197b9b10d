"""Each variant's defining update against a float64 hand computation (least squares, gradient by
hand), LookSAM's closure count, and the kernel helpers the variants rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sharpguard.errors import ConfigurationError
from sharpguard.optim import ASAM, GSAM, FriendlySAM, LookSAM, MomentumSAM, make_sam
from sharpguard.optim import functional as F

from tests.helpers.optim_lsq import B0, W0, lsq_grad, lsq_loss, lsq_model, norm, weights


def dot(a, b):
    return sum(float((s * t).sum()) for s, t in zip(a, b))


def add(a, b, s=1.0):
    return [x + s * y for x, y in zip(a, b)]


def scale(a, s):
    return [s * x for x in a]


def run(opt, model, steps):
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = lsq_loss(model)
        loss.backward()
        return loss

    per_step, out = [], []
    for _ in range(steps):
        n = len(calls)
        opt.step(closure)
        per_step.append(len(calls) - n)
        out.append(weights(model))
    return out, per_step


def close(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-13)


LR = 0.1


def test_asam_update():
    rho, eta = 0.5, 0.01
    model = lsq_model()
    (got,), _ = run(ASAM(model.parameters(), torch.optim.SGD, rho=rho, eta=eta, lr=LR), model, 1)
    w = [W0, B0]
    g = lsq_grad(w)
    t = [np.abs(x) + eta for x in w]
    e = scale([a * a * b for a, b in zip(t, g)], rho / norm([a * b for a, b in zip(t, g)]))
    close(got, add(w, lsq_grad(add(w, e)), -LR))


def test_gsam_update():
    rho, alpha = 0.2, 0.3
    model = lsq_model()
    history, _ = run(GSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, lr=LR), model, 2)
    w = [W0, B0]
    for got in history:
        g = lsq_grad(w)
        gp = lsq_grad(add(w, scale(g, rho / norm(g))))
        vertical = add(g, gp, -dot(g, gp) / dot(gp, gp))  # component of g orthogonal to g_p
        assert abs(dot(vertical, gp)) < 1e-10
        w = add(w, add(gp, vertical, -alpha), -LR)
        close(got, w)


def test_looksam_update_and_closure_count():
    rho, k, alpha = 0.2, 3, 0.7
    model = lsq_model()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=rho, k=k, alpha=alpha, lr=LR)
    history, per_step = run(opt, model, 7)
    assert per_step == [2, 1, 1, 2, 1, 1, 2]  # reuse steps run the closure once
    assert opt.cost == (pytest.approx(1 + 1 / k), pytest.approx(1 + 1 / k))
    w, gv = [W0, B0], None
    for t, got in enumerate(history):
        g = lsq_grad(w)
        if t % k == 0:
            gs = lsq_grad(add(w, scale(g, rho / norm(g))))
            gv = add(gs, g, -dot(g, gs) / dot(g, g))
            step = gs
        else:
            step = add(g, gv, alpha * norm(g) / norm(gv))
        w = add(w, step, -LR)
        close(got, w)


def test_momentum_sam_update_one_pass_along_the_momentum():
    rho, mu = 0.3, 0.9
    model = lsq_model()
    opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=LR, momentum=mu)
    history, per_step = run(opt, model, 3)
    assert per_step == [1, 1, 1] and opt.cost == (1.0, 1.0)
    w, v = [W0, B0], None
    for got in history:
        at = w if v is None else add(w, v, -rho / norm(v))  # w - rho v / ||v||
        g = lsq_grad(at)
        v = g if v is None else add(scale(v, mu), g)
        w = add(w, v, -LR)
        close(got, w)


def test_momentum_sam_with_adam_uses_exp_avg_and_refuses_sgd_without_momentum():
    model = lsq_model()
    opt = MomentumSAM(model.parameters(), torch.optim.Adam, lr=1e-2)
    run(opt, model, 2)
    with pytest.raises(ConfigurationError, match="momentum=0"):
        MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigurationError, match="momentum_key"):
        MomentumSAM(model.parameters(), torch.optim.Adagrad, lr=0.1)
    # the two-step form must call prepare() before the forward once momentum exists
    lsq_loss(model).backward()
    with pytest.raises(ConfigurationError, match="prepare"):
        opt.first_step()


def test_friendly_sam_update():
    rho, sigma, lmbda = 0.2, 1.0, 0.6
    model = lsq_model()
    opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=rho, sigma=sigma, lmbda=lmbda, lr=LR)
    history, _ = run(opt, model, 3)
    w, m = [W0, B0], None
    for got in history:
        g = lsq_grad(w)
        if m is None:
            d, m = g, g
        else:
            d = add(g, m, -sigma)
            m = add(scale(m, lmbda), g, 1 - lmbda)
        w = add(w, lsq_grad(add(w, scale(d, rho / norm(d)))), -LR)
        close(got, w)


def test_looksam_keeps_gv_after_an_overflowing_full_step():
    model = lsq_model()
    opt = LookSAM(model.parameters(), torch.optim.SGD, k=1, lr=LR)
    run(opt, model, 1)
    gv = [t.clone() for t in opt._state_list("gv", list(model.parameters()))]
    lsq_loss(model).backward()
    model.weight.grad[0, 0] = float("nan")
    opt.first_step(zero_grad=True)
    lsq_loss(model).backward()
    opt.unperturb()
    for a, b in zip(opt._state_list("gv", list(model.parameters())), gv):
        assert torch.equal(a, b)


def test_bad_variant_knobs():
    params = list(lsq_model().parameters())
    with pytest.raises(ConfigurationError, match="k must"):
        LookSAM(params, torch.optim.SGD, k=0, lr=0.1)
    with pytest.raises(ConfigurationError, match="alpha"):
        GSAM(params, torch.optim.SGD, alpha=2.0, lr=0.1)
    with pytest.raises(ConfigurationError, match="lmbda"):
        FriendlySAM(params, torch.optim.SGD, lmbda=1.5, lr=0.1)
    with pytest.raises(ConfigurationError, match="eta"):
        ASAM(params, torch.optim.SGD, eta=-1.0, lr=0.1)


@pytest.mark.parametrize("variant", ["sam", "asam", "gsam", "looksam", "momentum_sam", "friendly_sam", "msam", "F-SAM"])
def test_make_sam_builds_every_variant(variant):
    model = lsq_model()
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), variant, rho=0.1)
    run(opt, model, 2)
    assert opt.rho == 0.1


# --------------------------------------------------------------------------------------------------
# kernel helpers
# --------------------------------------------------------------------------------------------------
def test_global_norm_and_dot_against_float64():
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g, dtype=torch.float64),
         torch.randn(2, generator=g).half()]
    b = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g, dtype=torch.float64),
         torch.randn(2, generator=g).half()]
    flat = lambda ts: torch.cat([t.double().reshape(-1) for t in ts])  # noqa: E731
    torch.testing.assert_close(F.global_norm(a).double(), flat(a).norm(), rtol=1e-6, atol=0)
    # dot works in the tensors' own precision (a + b is formed per dtype): compare on fp32/fp64
    torch.testing.assert_close(F.dot(a[:2], b[:2]).double(), flat(a[:2]) @ flat(b[:2]), rtol=0, atol=1e-5)
    big = [torch.full((100,), 1000.0, dtype=torch.float16)]  # sum of squares overflows fp16
    assert torch.isfinite(F.global_norm(big))


def test_select_is_exact_and_never_lets_nan_in():
    dst = [torch.randn(4), torch.randn(2, 2)]
    src = [torch.randn(4), torch.tensor([[float("nan"), float("inf")], [1.0, 2.0]])]
    kept = [t.clone() for t in dst]
    F.select_(dst, src, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(dst, kept))
    src[1] = torch.randn(2, 2)
    F.select_(dst, src, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(dst, src))
