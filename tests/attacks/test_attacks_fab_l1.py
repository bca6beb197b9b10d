"""FAB-T and l1-APGD: float64 hand computations of their defining updates, agreement with the reference
AutoAttack (pyautoattack) on the same model and batch, pass counts against the documented cost, and
FAB-T in the standard cascade."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyautoattack.autopgd_base
import pyautoattack.fab_pt
from sharpguard.adversarial import count_passes
from sharpguard.attacks import AutoAttack, ThreatModel, apgd, apgd_targeted, fab_targeted, geometry, make_generator, pgd
from sharpguard.errors import ConfigurationError


@pytest.fixture(scope="module")
def digits():
    """An MLP on scikit-learn's digits as (N, 1, 8, 8) images in [0, 1]; 192 examples to attack. ~1 s."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[:192], y[:192]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def linear_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(5, 4).double()


# ----------------------------------------------------------------------------- FAB: the defining update
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_fab_step_on_a_linear_model_is_the_overshot_projection_onto_the_target_boundary(norm):
    """For a linear model the linearised boundary is exact: from x0, one FAB step lands at
    x0 + eta * d with d the smallest-norm move onto {z_t = z_y} (box inactive), computed by hand."""
    model = linear_model()
    x0 = torch.full((1, 5), 0.5, dtype=torch.float64) + 0.01 * torch.arange(5, dtype=torch.float64)
    with torch.no_grad():
        z = model(x0)[0]
        y = int(z.argmax())
        t = int(z.argsort()[-2])  # the first target: the second-largest clean logit
        model.bias[t] += 0.8 * float(z[y] - z[t])  # bring the boundary close, so the box stays inactive
        z = model(x0)[0]
    assert int(z.argmax()) == y and int(z.argsort()[-2]) == t
    W, eta = model.weight.detach(), 1.05
    w = W[t] - W[y]
    f = float(z[t] - z[y])  # < 0: x0 is classified as y
    if norm == "l2":
        d = -f * w / float(w @ w)
    elif norm == "linf":
        d = -f * w.sign() / float(w.abs().sum())
    else:
        i = int(w.abs().argmax())
        d = torch.zeros(5, dtype=torch.float64)
        d[i] = -f / float(w[i])
    expected = x0[0] + eta * d
    assert ((expected >= 0) & (expected <= 1)).all()  # the box is not active: the hand formula holds
    size = float(geometry.per_example_norm(eta * d[None], norm))
    adv = fab_targeted(model, x0, torch.tensor([y]), eps=size * 1.01, steps=1, norm=norm, n_target_classes=1)
    assert torch.allclose(adv[0], expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert int(model(adv).argmax()) == t  # the overshoot crosses into the target class
    # a radius below the point found: nothing within eps, the input comes back unchanged
    same = fab_targeted(model, x0, torch.tensor([y]), eps=size * 0.99, steps=1, norm=norm, n_target_classes=1)
    assert torch.equal(same, x0)


@pytest.mark.parametrize("norm, eps", [("linf", 0.08), ("l2", 0.6), ("l1", 2.5)])
def test_fab_targeted_equals_the_reference_autoattack_fab_t(digits, norm, eps):
    model, x, y = digits
    ours = fab_targeted(model, x, y, eps=eps, steps=15, norm=norm)
    with torch.random.fork_rng():
        ref = pyautoattack.fab_pt.FABAttack_PT(
            model, norm={"linf": "Linf", "l2": "L2", "l1": "L1"}[norm], n_restarts=1, n_iter=15, eps=eps,
            targeted=True, n_target_classes=9, device="cpu", seed=0,
        ).perturb(x, y)
    clean, a, b = accuracy(model, x, y), accuracy(model, ours, y), accuracy(model, ref, y)
    assert a < clean - 0.05  # it attacks
    assert abs(a - b) <= 1 / len(y)  # the same points broken, up to one borderline point
    assert (ours - ref).abs().max() < 1e-4  # and the same adversarial examples (float32 rounding apart)
    size = geometry.per_example_norm(ours - x, norm).flatten()
    assert (size <= eps).all() and ours.min() >= 0 and ours.max() <= 1


def test_fab_cost_counted_with_hooks(digits):
    model, x, y = digits
    x, y = x[:16], y[:16]
    steps, targets = 4, 3
    with count_passes(model) as counted:
        adv = fab_targeted(model, x, y, eps=1e-6, steps=steps, n_target_classes=targets)  # nothing breaks
    assert torch.equal(adv, x)
    runs = targets  # one restart per target
    assert counted.as_tuple() == (1 + runs * (2 * steps + 1), runs * steps)


# ----------------------------------------------------------------------------- l1-APGD
def l1_box_projection_by_bisection(v: np.ndarray, x0: np.ndarray, eps: float) -> np.ndarray:
    """argmin ||d - v||_2 s.t. ||d||_1 <= eps, 0 <= x0 + d <= 1, by bisection on the soft threshold."""
    cap = np.where(v >= 0, 1 - x0, x0)

    def at(theta):
        return np.sign(v) * np.minimum(np.maximum(np.abs(v) - theta, 0), cap)

    if np.abs(at(0.0)).sum() <= eps:
        return at(0.0)
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.abs(at(mid)).sum() > eps else (lo, mid)
    return at(hi)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 40), eps=st.floats(0.01, 5.0), scale=st.floats(0.01, 5.0), seed=st.integers(0, 10_000))
def test_l1_box_projection_is_the_euclidean_projection(d, eps, scale, seed):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(size=(4, d))
    x0[0, : d // 2] = 0.0  # some coordinates on the box's faces
    v = rng.standard_normal((4, d)) * scale
    out = geometry.project_l1_box(torch.tensor(v), eps, torch.tensor(-x0), torch.tensor(1 - x0)).numpy()
    for i in range(4):
        assert np.allclose(out[i], l1_box_projection_by_bisection(v[i], x0[i], eps), atol=1e-9)
        assert np.abs(out[i]).sum() <= eps * (1 + 1e-12) + 1e-12
        assert (x0[i] + out[i] >= -1e-12).all() and (x0[i] + out[i] <= 1 + 1e-12).all()


def test_l1_apgd_step_matches_a_float64_hand_computation():
    """Start (Gaussian projected on the l1 ball and box), one sparse step along the sign of the top 20 %
    gradient coordinates with l1 length eps, projection: Croce & Hein 2021, Alg. 2 / eq. 6."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x0 = torch.rand(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    eps = 0.8
    adv = apgd(model, x0, y, eps=eps, steps=1, norm="l1", eps_schedule=False, generator=make_generator("cpu", 7))

    def project(v):
        return torch.tensor(np.stack([l1_box_projection_by_bisection(v[i].numpy(), x0[i].numpy(),
                                                                     eps) for i in range(2)]))

    noise = torch.randn(x0.shape, generator=make_generator("cpu", 7), dtype=torch.float64)
    u0 = x0 + project(noise)

    def loss_grad(u):
        u = u.clone().requires_grad_(True)
        loss = F.cross_entropy(model(u), y, reduction="none")
        return loss.detach(), torch.autograd.grad(loss.sum(), u)[0]

    l0, g = loss_grad(u0)
    k = int((1 - 0.2) * 10)  # the threshold is the k-th smallest |g|: the top 20 % of coordinates move
    direction = torch.zeros_like(g)
    for i in range(2):
        thr = g[i].abs().sort().values[k]
        direction[i] = torch.where(g[i].abs() >= thr, g[i].sign(), torch.zeros_like(g[i]))
    step = u0 + eps * direction / direction.abs().sum(1, keepdim=True)
    u1 = x0 + project(step - x0)
    l1, _ = loss_grad(u1)
    with torch.no_grad():
        wrong0, wrong1 = model(u0).argmax(1) != y, model(u1).argmax(1) != y
    for i in range(2):
        expected = u0[i] if wrong0[i] else u1[i] if wrong1[i] else (u1[i] if l1[i] > l0[i] else u0[i])
        assert torch.allclose(adv[i], expected, atol=1e-9)


@pytest.mark.parametrize("eps, schedule", [(1.5, False), (1.5, True), (3.0, True)])
def test_l1_apgd_agrees_with_the_reference_autoattack(digits, eps, schedule):
    model, x, y = digits
    ours = [accuracy(model, apgd(model, x, y, eps=eps, steps=30, norm="l1", eps_schedule=schedule,
                                 generator=make_generator("cpu", s)), y) for s in range(2)]
    refs = []
    for s in range(2):
        with torch.random.fork_rng():
            ref = pyautoattack.autopgd_base.APGDAttack(model, n_iter=30, norm="L1", eps=eps, loss="ce", device="cpu",
                                                       seed=s, use_largereps=schedule)
            refs.append(accuracy(model, ref.perturb(x, y), y))
    clean = accuracy(model, x, y)
    assert sum(ours) / 2 < clean - 0.1
    assert abs(sum(ours) / 2 - sum(refs) / 2) <= 0.03
    adv = apgd(model, x, y, eps=eps, steps=30, norm="l1", generator=make_generator("cpu", 0))
    assert (geometry.per_example_norm(adv - x, "l1").flatten() <= eps * (1 + 1e-5)).all()
    assert adv.min() >= 0 and adv.max() <= 1


def test_l1_apgd_targeted_agrees_with_the_reference_autoattack(digits):
    model, x, y = digits
    eps = 1.5
    ours = accuracy(model, apgd_targeted(model, x, y, eps=eps, steps=20, norm="l1", n_target_classes=5,
                                         generator=make_generator("cpu", 0)), y)
    with torch.random.fork_rng():
        ref = pyautoattack.autopgd_base.APGDAttack_targeted(model, n_iter=20, norm="L1", eps=eps, device="cpu", seed=0,
                                                            n_target_classes=5, use_largereps=True)
        theirs = accuracy(model, ref.perturb(x, y), y)
    assert ours < accuracy(model, x, y) - 0.1
    assert abs(ours - theirs) <= 0.03


@pytest.mark.parametrize("schedule, extra", [(False, 1), (True, 3)])
def test_l1_apgd_cost_counted_with_hooks(digits, schedule, extra):
    model, x, y = digits
    with count_passes(model) as counted:
        apgd(model, x[:8], y[:8], eps=1.0, steps=10, norm="l1", eps_schedule=schedule, restarts=2)
    passes = 2 * (10 + extra)
    assert counted.as_tuple() == (passes, passes)


# ----------------------------------------------------------------------------- the standard cascade
def test_standard_cascade_runs_fab_t_between_apgd_t_and_square(digits):
    model, x, y = digits
    x16 = F.interpolate(x, size=12, mode="bilinear")
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 10)).eval()
    for model_, data in ((model, x), (cnn, x16)):
        aa = AutoAttack(eps=0.03, steps=5, n_queries=20, generator=make_generator("cpu", 0), checks="off")
        adv = aa(model_, data, y)
        names = list(aa.last_report.accuracies)
        expected = ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
        assert names == expected[: len(names)] and "fab-t" in names
        accs = list(aa.last_report.accuracies.values())
        assert accs == sorted(accs, reverse=True) and accuracy(model_, adv, y) == accs[-1]
        assert ((adv - data).abs().flatten(1).amax(1) <= 0.03 + 1e-6).all()


def test_l1_cascade_uses_l1_apgd_and_fab_t_and_says_square_is_skipped(digits):
    model, x, y = digits
    x, y = x[:64], y[:64]
    aa = AutoAttack(eps=2.0, norm="l1", steps=6, generator=make_generator("cpu", 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adv = aa(model, x, y)
    assert aa.n_target_classes == 5 and any("square" in s for s in aa.last_report.skipped)
    assert any("skipped" in str(w.message) for w in caught)
    assert (geometry.per_example_norm(adv - x, "l1").flatten() <= 2.0 * (1 + 1e-5)).all()
    assert aa.last_report.robust_accuracy < aa.last_report.accuracies["clean"]


def test_l1_is_refused_where_it_is_not_implemented():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x, y = torch.rand(2, 1, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ConfigurationError, match="norm must be one of"):
        pgd(model, x, y, norm="l1")
    with pytest.raises(ConfigurationError, match="random starts"):
        ThreatModel("l1", 1.0).random_start(x, make_generator("cpu", 0))
    with pytest.raises(ConfigurationError, match="bounds"):
        fab_targeted(model, x, y, bounds=None)
    with pytest.raises(ConfigurationError, match="alpha_max"):
        fab_targeted(model, x, y, alpha_max=2.0)


@pytest.mark.parametrize("mode", ["eval", "train", "keep"])
def test_fab_and_l1_apgd_leave_the_model_and_rng_untouched_and_work_under_inference_mode(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).train()
    model[1].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 2.0)
    grads = [p.grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(12, 1, 6, 6, generator=g), torch.randint(0, 10, (12,), generator=g)
    with torch.inference_mode():
        fab_targeted(model, x, y, eps=0.3, steps=3, n_target_classes=2, model_mode=mode)
        apgd(model, x, y, eps=2.0, steps=4, norm="l1", model_mode=mode)
        apgd_targeted(model, x, y, eps=2.0, steps=4, norm="l1", n_target_classes=2, model_mode=mode)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is q and torch.all(q == 2.0) for p, q in zip(model.parameters(), grads))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(torch.get_rng_state(), rng)
