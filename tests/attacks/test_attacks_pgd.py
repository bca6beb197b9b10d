"""Input-space attacks: parity with torchattacks, geometry laws, side effects, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.attacks import (ThreatModel, apgd, clean_accuracy, fgsm, input_grad_norm, make_generator, pgd,
                                robust_accuracy)
from sharpguard.errors import ConfigurationError

import torchattacks


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 10),
    )


@pytest.fixture(scope="module")
def digits():
    """An MLP trained for a few epochs on scikit-learn's digits (inputs in [0, 1]); ~1 s."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, x, y


def batch(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


# ----------------------------------------------------------------------------- parity
def test_pgd_without_random_start_equals_torchattacks_linf():
    model = small_cnn().train()
    x, y = batch()
    ours = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)(x, y)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, x)


def test_pgd_l2_without_random_start_equals_torchattacks():
    model = small_cnn()
    x, y = batch()
    ours = pgd(model, x, y, eps=0.5, alpha=0.1, steps=7, norm="l2", random_start=False)
    theirs = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=7, random_start=False)(x, y)
    assert torch.equal(ours, theirs)


def test_fgsm_equals_torchattacks():
    model = small_cnn()
    x, y = batch()
    assert torch.equal(fgsm(model, x, y, eps=4 / 255), torchattacks.FGSM(model, eps=4 / 255)(x, y))


def test_robust_accuracy_with_random_start_within_one_point_of_torchattacks(digits):
    model, x, y = digits
    eps = 0.06
    ours = robust_accuracy(model, (x, y), lambda m, a, b: pgd(m, a, b, eps=eps, alpha=eps / 4, steps=10))
    attack = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=True)
    adv = attack(x, y)  # torchattacks needs grad enabled (it fails under no_grad; ours does not)
    with torch.no_grad():
        theirs = float((model(adv).argmax(1) == y).float().mean())
    clean = clean_accuracy(model, (x, y))
    assert clean > 0.9 and 0.05 < theirs < clean - 0.1  # an informative regime, not 0 or clean
    assert abs(ours - theirs) <= 0.01


# ----------------------------------------------------------------------------- geometry
@settings(max_examples=30, deadline=None)
@given(
    norm=st.sampled_from(["linf", "l2"]),
    eps=st.floats(0.0, 0.5),
    steps=st.integers(1, 4),
    start=st.sampled_from([True, False, "normal"]),
    normalized=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_adversarial_examples_stay_in_ball_and_bounds(norm, eps, steps, start, normalized, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.rand(6, 3, 4, 4)
    y = torch.randint(0, 5, (6,))
    mean, std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)) if normalized else (None, None)
    tm = ThreatModel(norm, eps, (0.0, 1.0), mean, std)
    given_x = tm.from_pixel(x)
    adv = pgd(model, given_x, y, alpha=eps / 2 + 0.01, steps=steps, random_start=start, threat=tm,
              generator=make_generator("cpu", seed))
    u = tm.to_pixel(adv, check=False)
    assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6
    delta = (u - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()


def test_l2_random_start_is_uniform_in_the_ball():
    """Radius r of a uniform point in a d-ball: (r / eps)^d ~ U(0, 1) (torchattacks' r ~ U fails this)."""
    from scipy.stats import kstest

    tm = ThreatModel("l2", 0.5, bounds=None)
    x0 = torch.zeros(4000, 3)
    r = (tm.random_start(x0, make_generator("cpu", 0)) - x0).norm(dim=1)
    assert kstest(((r / 0.5) ** 3).numpy(), "uniform").pvalue > 0.01
    assert kstest((r / 0.5).numpy(), "uniform").pvalue < 1e-6  # the non-uniform alternative is rejected


def test_linf_random_start_is_uniform_in_the_box():
    from scipy.stats import kstest

    tm = ThreatModel("linf", 0.25, bounds=None)
    d = tm.random_start(torch.zeros(2000, 2), make_generator("cpu", 1)).flatten()
    assert kstest(((d + 0.25) / 0.5).numpy(), "uniform").pvalue > 0.01


def test_normalization_outside_equals_normalization_inside():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    net = small_cnn().eval()

    class Normalize(nn.Module):
        def forward(self, u):
            return (u - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    inside = nn.Sequential(Normalize(), net)
    x, y = batch()
    tm = ThreatModel("linf", 8 / 255, (0, 1), mean, std)
    adv_inside = pgd(inside, x, y, random_start=False)
    adv_outside = pgd(net, tm.from_pixel(x), y, random_start=False, mean=mean, std=std)
    pixels = tm.to_pixel(adv_outside, check=False)
    assert (pixels - adv_inside).abs().max() < 1e-5
    assert (pixels - x).abs().max() <= 8 / 255 + 1e-6


# ----------------------------------------------------------------------------- side effects
def test_modes_grads_buffers_requires_grad_and_rng_untouched():
    model = small_cnn().train()
    model[1].eval()  # a frozen-BN layer inside a training model
    model[0].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    grads = [p.grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    x, y = batch()
    for mode in ("eval", "train", "keep"):
        pgd(model, x, y, steps=2, model_mode=mode)
        apgd(model, x, y, steps=3, model_mode=mode)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is g and torch.all(g == 3.0) for p, g in zip(model.parameters(), grads))
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_works_under_no_grad_and_inference_mode_with_same_result():
    model = small_cnn()
    x, y = batch()
    ref = pgd(model, x, y, steps=3, generator=make_generator("cpu", 5))
    with torch.no_grad():
        a = pgd(model, x, y, steps=3, generator=make_generator("cpu", 5))
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors, as a Lightning validation loop hands them over
        b = pgd(model, xi, yi, steps=3, generator=make_generator("cpu", 5))
        acc = robust_accuracy(model, (xi, yi), lambda m, u, t: pgd(m, u, t, steps=2))
        gn = input_grad_norm(model, (xi, yi))
    assert torch.equal(ref, a) and torch.equal(ref, b)
    assert 0.0 <= acc <= 1.0 and gn > 0


def test_dtype_and_device_follow_the_inputs():
    model = small_cnn().double()
    x, y = batch()
    adv = pgd(model, x.double(), y, steps=2)
    assert adv.dtype == torch.float64 and adv.device == x.device


def test_default_generator_is_reproducible_after_reseeding_and_leaves_global_rng():
    model = small_cnn()
    x, y = batch()
    torch.manual_seed(123)
    a = pgd(model, x, y, steps=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    b = pgd(model, x, y, steps=1)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- attack behaviour
def test_restarts_keep_the_per_example_worst(digits):
    model, x, y = digits
    x, y = x[:256], y[:256]
    eps = 0.05
    gen = make_generator("cpu", 7)
    best = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=5, restarts=3, generator=gen)
    gen = make_generator("cpu", 7)  # the same stream, one restart at a time
    singles = [pgd(model, x, y, eps=eps, alpha=eps / 4, steps=5, generator=gen) for _ in range(3)]
    with torch.no_grad():
        wrong = torch.stack([model(s).argmax(1) != y for s in singles])
        losses = torch.stack([F.cross_entropy(model(s), y, reduction="none") for s in singles])
        best_wrong = model(best).argmax(1) != y
        best_loss = F.cross_entropy(model(best), y, reduction="none")
    assert torch.equal(best_wrong, wrong.any(0))
    none = ~wrong.any(0)
    assert torch.allclose(best_loss[none], losses[:, none].amax(0))


def test_targeted_pgd_reaches_the_target(digits):
    model, x, y = digits
    x, y = x[:128], y[:128]
    target = (y + 1) % 10
    adv = pgd(model, x, target, eps=0.3, alpha=0.03, steps=20, targeted=True)
    with torch.no_grad():
        assert (model(adv).argmax(1) == target).float().mean() > 0.9


def test_losses_margin_kl_and_dlr_attack(digits):
    model, x, y = digits
    x, y = x[:256], y[:256]
    clean = clean_accuracy(model, (x, y))
    for loss in ("margin", "dlr"):
        acc = robust_accuracy(model, (x, y), lambda m, a, b: pgd(m, a, b, eps=0.1, alpha=0.02, steps=10, loss=loss))
        assert acc < clean - 0.3
    adv = pgd(model, x, None, eps=0.1, alpha=0.02, steps=5, loss="kl")
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(adv), 1), F.log_softmax(model(x), 1), log_target=True, reduction="batchmean")
    assert kl > 0.1


def test_apgd_is_at_least_as_strong_as_pgd(digits):
    model, x, y = digits
    x, y = x[:512], y[:512]
    eps = 0.05
    pgd_acc = robust_accuracy(model, (x, y), lambda m, a, b: pgd(m, a, b, eps=eps, alpha=eps / 4, steps=20))
    apgd_acc = robust_accuracy(model, (x, y), lambda m, a, b: apgd(m, a, b, eps=eps, steps=20))
    assert apgd_acc <= pgd_acc + 0.01
    adv = apgd(model, x, y, eps=0.5, steps=10, norm="l2")
    assert ((adv - x).norm(dim=1) <= 0.5 + 1e-5).all() and adv.min() >= 0 and adv.max() <= 1


def test_input_grad_norm_matches_hand_computation(digits):
    model, x, y = digits
    x, y = x[:16], y[:16]
    mlp = model.double()
    try:
        norms = []
        for i in range(16):
            xi = x[i : i + 1].double().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(mlp(xi), y[i : i + 1]), xi)
            norms.append(g.norm())
        assert math.isclose(input_grad_norm(mlp, (x.double(), y)), float(torch.stack(norms).mean()), rel_tol=1e-9)
    finally:
        model.float()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": -0.1}, "eps must be"),
        ({"steps": 0}, "steps must be"),
        ({"steps": 1.5}, "steps must be"),
        ({"alpha": -1.0}, "alpha"),
        ({"norm": "l1"}, "norm must be"),
        ({"loss": "hinge"}, "unknown attack loss"),
        ({"mean": (0.5, 0.5), "std": (0.2, 0.2)}, "channels"),
        ({"mean": (0.5,)}, "both mean and std"),
        ({"restarts": 0}, "restarts"),
        ({"random_start": "gauss"}, "random_start"),
        ({"model_mode": "inference"}, "model_mode"),
    ],
)
def test_bad_settings_raise_clear_errors(kwargs, message):
    model = small_cnn()
    x, y = batch()
    with pytest.raises(ConfigurationError, match=message):
        pgd(model, x, y, **kwargs)


def test_bad_labels_and_inputs_raise_before_anything_changes():
    model = small_cnn()
    x, y = batch()
    with pytest.raises(ConfigurationError, match=r"labels must have shape \(32,\)"):
        pgd(model, x, F.one_hot(y, 10))
    with pytest.raises(ConfigurationError, match="integer class indices"):
        pgd(model, x, y.float())
    with pytest.raises(ConfigurationError, match="outside the declared bounds"):
        pgd(model, (x - 0.5) / 0.25, y)
    with pytest.raises(ConfigurationError, match="needs labels"):
        pgd(model, x, None)


def test_robust_accuracy_rejects_one_hot_labels_instead_of_broadcasting():
    # (B, C) one-hot labels used to broadcast against the (B,) predictions and return a wrong fraction.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    assert 0.0 <= robust_accuracy(model, [(x, y)]) <= 1.0
    with pytest.raises(ConfigurationError, match="1-D tensor of class indices"):
        robust_accuracy(model, [(x, F.one_hot(y, 3))])
    with pytest.raises(ConfigurationError, match="predictions for"):
        robust_accuracy(model, [(x, y[:4])])
