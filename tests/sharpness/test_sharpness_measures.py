"""SAM-style sharpness, Keskar sharpness and loss slices: closed forms, properties, side effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.sharpness import (
    HVPOperator,
    average_sharpness,
    directional_curvature,
    eos_ratio,
    first_order_sharpness,
    hessian_eigenvalues,
    hessian_trace,
    keskar_sharpness,
    loss_slice_1d,
    loss_slice_2d,
    plot_loss_slice,
    spectral_density,
    worst_case_sharpness,
)


class LinearLoss(nn.Module):
    """``L(w) = mean_i a_i . w``: every worst case has a closed form (the dual norm of ``a``)."""

    def __init__(self, n: int = 7):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 2.0, n, dtype=torch.float64))

    def forward(self, a):
        return a @ self.w


def linear_loss(model, batch):
    return model(batch[0]).mean()


class Quadratic(nn.Module):
    """``L(w) = 1/2 (w - c)^T A (w - c)`` with a fixed symmetric positive definite ``A``."""

    def __init__(self, n: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=torch.float64)) @ q.T)
        self.register_buffer("c", torch.randn(n, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, _):
        d = self.w - self.c
        return 0.5 * d @ self.a @ d


def quad_loss(model, batch):
    return model(batch[0])


def _linear_batches(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(12, n, generator=g, dtype=torch.float64)
    return [(a[:5], torch.zeros(5)), (a[5:], torch.zeros(7))], a


# ----------------------------------------------------------------------------------------------
# closed forms


def test_worst_case_on_a_linear_loss_is_rho_times_the_dual_norm():
    model = LinearLoss()
    batches, a = _linear_batches()
    grad = a.mean(0)  # batch-size weighted mean of the per-example gradients
    w = model.w.detach()
    for norm, dual in (("l2", 2), ("linf", 1)):
        plain = worst_case_sharpness(model, batches, linear_loss, rho=0.1, steps=3, norm=norm)
        assert plain.value == pytest.approx(0.1 * float(torch.linalg.vector_norm(grad, ord=dual)), rel=1e-10)
        first = first_order_sharpness(model, batches, linear_loss, rho=0.1, norm=norm)
        assert first.value == pytest.approx(plain.value, rel=1e-10)
        adaptive = worst_case_sharpness(model, batches, linear_loss, rho=0.1, adaptive=True, norm=norm, eta=0.01)
        expect = 0.1 * float(torch.linalg.vector_norm((w.abs() + 0.01) * grad, ord=dual))
        assert adaptive.value == pytest.approx(expect, rel=1e-10)
        assert adaptive.settings["adaptive"] and "adaptive" in adaptive.definition


def test_m_sharpness_averages_per_batch_maxima():
    model = LinearLoss()
    batches, _ = _linear_batches()
    per_batch = worst_case_sharpness(model, batches, linear_loss, rho=0.1, per_batch=True)
    expect = sum(len(b[0]) * 0.1 * float(torch.linalg.vector_norm(b[0].mean(0))) for b in batches) / 12
    assert per_batch.value == pytest.approx(expect, rel=1e-10)
    whole = worst_case_sharpness(model, batches, linear_loss, rho=0.1)
    assert per_batch.value >= whole.value  # the mean of maxima bounds the maximum of the mean
    assert per_batch.settings["per_batch"] and "m-sharpness" in per_batch.definition


def test_worst_case_on_a_quadratic_beats_first_step_and_respects_the_ball():
    model = Quadratic()
    batch = (torch.zeros(1), torch.zeros(1))
    rho = 0.5
    one = worst_case_sharpness(model, batch, quad_loss, rho=rho, steps=1)
    many = worst_case_sharpness(model, batch, quad_loss, rho=rho, steps=20)
    # exact maximum over the sphere: a trust-region problem, solved densely by a fine grid on the multiplier
    a, c = model.a, model.c
    g = a @ (-c)
    evals, evecs = torch.linalg.eigh(a)
    gt = evecs.T @ g
    mus = torch.linspace(float(evals[-1]) + 1e-6, float(evals[-1]) + 100, 200001, dtype=torch.float64)
    norms = torch.sqrt(((gt[None, :] / (mus[:, None] - evals[None, :])) ** 2).sum(1))
    mu = mus[torch.argmin((norms - rho).abs())]
    delta = evecs @ (gt / (mu - evals))
    exact = float(g @ delta + 0.5 * delta @ a @ delta)
    assert one.value <= many.value <= exact + 1e-9
    assert many.value == pytest.approx(exact, rel=1e-3)


def test_average_sharpness_matches_half_sigma_squared_trace():
    model = Quadratic()
    batch = (torch.zeros(1), torch.zeros(1))
    with torch.no_grad():
        model.w.copy_(model.c)  # at the minimum the linear term vanishes: E = sigma^2/2 tr(A) exactly
    r = average_sharpness(model, batch, quad_loss, sigma=0.1, n_samples=200, seed=0)
    exact = 0.5 * 0.01 * float(model.a.trace())
    assert abs(r.value - exact) <= 3 * r.stderr
    assert r.settings["n_samples"] == 200 and r.stderr > 0
    adaptive = average_sharpness(model, batch, quad_loss, sigma=0.1, n_samples=200, adaptive=True, eta=0.1)
    t = model.c.abs() + 0.1
    exact_a = 0.5 * 0.01 * float((t[:, None] * model.a * t[None, :]).trace())
    assert abs(adaptive.value - exact_a) <= 3 * adaptive.stderr


@pytest.mark.parametrize("solver", ["lbfgsb", "projected"])
def test_keskar_on_a_linear_loss_reaches_the_box_corner(solver):
    model = LinearLoss()
    batches, a = _linear_batches()
    grad, w = a.mean(0), model.w.detach()
    base = float(w @ grad)
    best = base + float((grad.abs() * 1e-2 * (w.abs() + 1)).sum())
    r = keskar_sharpness(model, batches, linear_loss, epsilon=1e-2, solver=solver)
    assert r.value == pytest.approx(100 * (best - base) / (1 + base), rel=1e-8)
    assert r.settings["solver"] == solver


# ----------------------------------------------------------------------------------------------
# loss slices


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return model, (torch.randn(24, 5), torch.randint(0, 3, (24,)))


def test_filter_normalized_direction_and_slice_values():
    model, batch = _mlp()
    s = loss_slice_1d(model, batch, n_points=5, span=0.5, seed=3)
    (d,) = s.directions
    chunks = torch.split(d, [p.numel() for p in model.parameters()])
    for p, chunk in zip(model.parameters(), chunks):
        chunk = chunk.view(p.shape)
        if p.dim() == 1:
            assert torch.count_nonzero(chunk) == 0  # biases and BatchNorm affine parameters stay put
        else:
            torch.testing.assert_close(chunk.norm(dim=1), p.detach().norm(dim=1), rtol=1e-5, atol=1e-7)
    model.eval()
    with torch.no_grad():
        expect = F.cross_entropy(model(batch[0]), batch[1]).item()
    model.train()
    assert s.losses[2] == pytest.approx(expect, rel=1e-6) and s.loss_at_center == pytest.approx(expect, rel=1e-6)
    # a given direction is used as is: along the loss's own linear direction the slice is exact
    lin = LinearLoss()
    batches, a = _linear_batches()
    line = loss_slice_1d(lin, batches, linear_loss, direction=torch.ones(7, dtype=torch.float64), n_points=3)
    expect = [float((lin.w.detach() + t) @ a.mean(0)) for t in (-1.0, 0.0, 1.0)]
    np.testing.assert_allclose(line.losses, expect, rtol=1e-12)


def test_slice_2d_grid_and_plots():
    import matplotlib
    matplotlib.use("Agg")
    model, batch = _mlp()
    s2 = loss_slice_2d(model, batch, n_points=4, span=0.2)
    assert s2.losses.shape == (4, 4) and s2.ndim == 2 and np.isfinite(s2.losses).all()
    assert not torch.allclose(s2.directions[0], s2.directions[1])
    ax = plot_loss_slice(s2)
    assert ax.get_xlabel() and ax.get_ylabel()
    ax1 = plot_loss_slice(loss_slice_1d(model, batch, n_points=3))
    assert ax1.get_xlabel() and ax1.get_ylabel() == "loss"
    with pytest.raises(ConfigurationError, match="n_points"):
        loss_slice_1d(model, batch, n_points=1)
    with pytest.raises(ConfigurationError, match="2 directions"):
        loss_slice_2d(model, batch, directions=[torch.zeros(1)])


def test_bad_settings_raise_before_touching_the_model():
    model, batch = _mlp()
    for call in (
        lambda: worst_case_sharpness(model, batch, rho=-1.0),
        lambda: worst_case_sharpness(model, batch, norm="l1"),
        lambda: worst_case_sharpness(model, batch, steps=0),
        lambda: average_sharpness(model, batch, sigma=0.0),
        lambda: average_sharpness(model, batch, n_samples=1),
        lambda: first_order_sharpness(model, batch, rho=float("nan")),
        lambda: keskar_sharpness(model, batch, epsilon=-1e-3),
        lambda: keskar_sharpness(model, batch, solver="adam"),
        lambda: worst_case_sharpness(model, []),
    ):
        with pytest.raises(ConfigurationError):
            call()


# ----------------------------------------------------------------------------------------------
# side effects: every measurement leaves the model exactly as found


def _conv_bn():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(48, 3)
    )
    return model, [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]


def _bert():
    from tests.helpers.tiny_text import sdpa_bert

    model = sdpa_bert(2)
    return model, {"input_ids": torch.randint(0, 20, (4, 6)), "labels": torch.randint(0, 3, (4,))}


MEASUREMENTS = {
    "eigenvalues": lambda m, b: hessian_eigenvalues(m, b, k=2, which="both", max_iter=20),
    "trace": lambda m, b: hessian_trace(m, b, n_hvp=6),
    "density": lambda m, b: spectral_density(m, b, n_iter=5, n_v=2),
    "worst_case": lambda m, b: worst_case_sharpness(m, b, steps=2, adaptive=True, per_batch=True),
    "average": lambda m, b: average_sharpness(m, b, n_samples=3, adaptive=True),
    "first_order": lambda m, b: first_order_sharpness(m, b),
    "keskar": lambda m, b: keskar_sharpness(m, b, max_iter=2),
    "slice_1d": lambda m, b: loss_slice_1d(m, b, n_points=3),
    "slice_2d": lambda m, b: loss_slice_2d(m, b, n_points=2),
    "eos_sgd": lambda m, b: eos_ratio(m, b, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), max_iter=10),
    "curvature": lambda m, b: directional_curvature(m, b),
    "finite_difference": lambda m, b: hessian_eigenvalues(m, b, hvp="finite_difference", max_iter=5),
}


@pytest.mark.parametrize("model_fn", [_mlp, _conv_bn, _bert], ids=["mlp_bn", "conv_bn_dropout", "bert_sdpa"])
@pytest.mark.parametrize("name", list(MEASUREMENTS))
def test_measurement_is_side_effect_free(model_fn, name):
    model, batches = model_fn()
    model.train()
    first = next(m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)))
    first.eval()  # a module frozen in eval inside a training model must stay so
    params = list(model.parameters())
    params[-1].requires_grad_(False)  # a frozen head
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    before = {
        "params": [p.detach().clone() for p in params],
        "grads": [p.grad for p in params],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in params],
        "flags": [p.requires_grad for p in params],
        "buffers": [b.clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }
    with torch.no_grad():  # measuring must work from inside a no_grad validation loop too
        MEASUREMENTS[name](model, batches)
    assert all(torch.equal(a, p) for a, p in zip(before["params"], params))
    assert all(g is p.grad for g, p in zip(before["grads"], params))
    assert all(v is None or torch.equal(v, p.grad) for v, p in zip(before["grad_values"], params))
    assert before["flags"] == [p.requires_grad for p in params]
    assert all(torch.equal(a, b) for a, b in zip(before["buffers"], model.buffers()))
    assert before["modes"] == [m.training for m in model.modules()]
    assert torch.equal(before["rng"], torch.get_rng_state())


def test_model_is_restored_when_the_loss_fails_midway():
    model, batch = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def flaky(m, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("loss exploded")
        return F.cross_entropy(m(b[0]), b[1])

    with pytest.raises(RuntimeError, match="exploded"):
        worst_case_sharpness(model, batch, flaky, steps=3)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="exploded"):
        calls["n"] = 0
        hessian_eigenvalues(model, batch, flaky, hvp="finite_difference")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert math.isfinite(first_order_sharpness(model, batch).value)


def test_operator_outside_with_and_reentry():
    model, batch = _mlp()
    op = HVPOperator(model, batch)
    with op, pytest.raises(ConfigurationError, match="already"):
        op.__enter__()
