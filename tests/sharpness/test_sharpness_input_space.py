"""Input-space curvature against autograd's dense input Hessian, robust-loss sharpness against its
definition, and the geometry at adversarial examples."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.attacks import pgd
from sharpguard.errors import ConfigurationError
from sharpguard.sharpness import adversarial_geometry, input_hessian_eigenvalue, robust_sharpness, worst_case_sharpness


def _model(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    # tanh: a smooth network, so the input Hessian is not piecewise zero
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _data(n: int = 10, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return torch.rand(n, 1, 2, 3, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_input_hessian_eigenvalue_equals_dense_autograd_hessian():
    model = _model()
    x, y = _data()
    r = input_hessian_eigenvalue(model, [(x[:4], y[:4]), (x[4:], y[4:])], n_examples=7, tol=1e-8, max_iter=6)
    expected = []
    for i in range(7):
        h = torch.autograd.functional.hessian(
            lambda u, i=i: F.cross_entropy(model(u.view(1, 1, 2, 3)), y[i : i + 1]), x[i].reshape(-1))
        expected.append(float(torch.linalg.eigvalsh(h).max()))
    assert r.n_examples == 7 and r.converged == 1.0
    assert r.values == pytest.approx(expected, rel=1e-7, abs=1e-10)
    assert r.mean == pytest.approx(sum(expected) / 7, rel=1e-7)
    assert r.max == pytest.approx(max(expected), rel=1e-7)


def test_input_hessian_side_effect_free_and_bad_input():
    model = _model()
    model.train()
    before = copy.deepcopy(model.state_dict())
    state = torch.get_rng_state()
    input_hessian_eigenvalue(model, (_data()[0], _data()[1]), n_examples=3)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigurationError, match="n_examples"):
        input_hessian_eigenvalue(model, _data(), n_examples=0)
    with pytest.raises(ConfigurationError, match="floating point"):
        input_hessian_eigenvalue(model, (torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, dtype=torch.long)))


def test_robust_sharpness_is_sharpness_of_the_pgd_loss():
    model = _model()
    x, y = _data(16)
    batches = [(x, y)]
    r = robust_sharpness(model, batches, eps=0.1, attack_steps=5, rho=0.05, steps=3, seed=4)
    assert r.definition.startswith("robust_")
    # R(w): cross entropy at PGD examples made with the same seeded attack
    gen = torch.Generator().manual_seed(4)
    x_adv = pgd(model, x, y, eps=0.1, alpha=2.5 * 0.1 / 5, steps=5, generator=gen)
    with torch.no_grad():
        robust_loss = float(F.cross_entropy(model(x_adv), y))
        clean_loss = float(F.cross_entropy(model(x), y))
    assert r.loss == pytest.approx(robust_loss, rel=1e-9)
    assert r.loss > clean_loss
    assert r.value > 0.0
    # a zero radius gives no rise at all
    assert robust_sharpness(model, batches, eps=0.1, attack_steps=5, rho=1e-12, steps=1,
                            seed=4).value == pytest.approx(0.0, abs=1e-9)
    # the ascent is on the robust loss, not the clean one: the two sharpness values differ
    assert r.value != pytest.approx(worst_case_sharpness(model, batches, rho=0.05, steps=3).value, rel=1e-3)


def test_adversarial_geometry_fields():
    model = _model()
    x, y = _data(20)
    geo = adversarial_geometry(model, [(x, y)], eps=0.3, attack_steps=10, n_curvature=5)
    assert 0.0 <= geo.fooled <= 1.0 and geo.n_examples == 20
    assert geo.settings["n_curvature"] == 5
    # the attack raises the loss, so it lowers the confidence in the true class; gradients grow along
    with torch.no_grad():
        clean_conf = float(torch.softmax(model(x), -1).max(-1).values.mean())
    assert geo.clean_confidence == pytest.approx(clean_conf, rel=1e-9)
    assert geo.adv_grad_norm > geo.clean_grad_norm
    with pytest.raises(ConfigurationError, match="eps"):
        adversarial_geometry(model, [(x, y)], eps=0.0)
