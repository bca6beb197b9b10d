"""Relative flatness (Petzka et al. 2021, Def. 3) against the dense Hessian, and Dinh et al.'s rescaling law."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.sharpness import hessian_eigenvalues, relative_flatness, worst_case_sharpness


def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4)).to(dtype)


def _data(n: int = 24, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def _dense_reference(model: nn.Sequential, batches, loss=F.cross_entropy):
    """sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) and its diagonal, from autograd's dense Hessian of the mean
    probe loss with respect to the last layer's weight (float64)."""
    head = model[-1]
    w0 = head.weight.detach().clone()
    n = sum(len(y) for _, y in batches)

    def probe_loss(w):
        total = 0.0
        for x, y in batches:
            feats = model[:-1](x)
            total = total + len(y) * loss(F.linear(feats, w, head.bias.detach()), y)
        return total / n

    h = torch.autograd.functional.hessian(probe_loss, w0)  # (d_out, d_in, d_out, d_in)
    block_traces = torch.einsum("aibi->ab", h)
    gram = w0 @ w0.T
    return float((gram * block_traces).sum()), float((gram.diagonal() * block_traces.diagonal()).sum()), block_traces


def test_closed_form_equals_dense_hessian():
    model = _mlp()
    batches = [_data(16), _data(8)]
    value, neuronwise, blocks = _dense_reference(model, batches)
    r = relative_flatness(model, batches)
    assert r.method == "closed_form" and r.layer == "4" and r.n_examples == 24
    assert r.value == pytest.approx(value, rel=1e-10)
    assert r.neuronwise == pytest.approx(neuronwise, rel=1e-10)
    assert torch.allclose(torch.tensor(r.block_traces, dtype=torch.float64), blocks, rtol=1e-10, atol=1e-14)


def test_hvp_path_equals_dense_hessian_for_another_loss():
    model = _mlp()
    batches = [_data(12)]

    def smoothed(m, batch):  # not plain cross entropy: the closed form does not apply
        return F.cross_entropy(m(batch[0]), batch[1], label_smoothing=0.1)

    value, neuronwise, _ = _dense_reference(model, batches, lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1))
    r = relative_flatness(model, batches, smoothed)
    assert r.method == "hvp" and r.n_hvp >= 6 * 4
    assert r.value == pytest.approx(value, rel=1e-8)
    assert r.neuronwise == pytest.approx(neuronwise, rel=1e-8)
    # both paths agree on the default loss
    assert relative_flatness(model, batches,
                             method="hvp").value == pytest.approx(relative_flatness(model, batches).value, rel=1e-8)


def test_side_effect_free_and_bad_input():
    model = _mlp()
    model.train()
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    batches = [_data(8)]
    relative_flatness(model, batches, method="hvp")
    relative_flatness(model, batches)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    with pytest.raises(ConfigurationError, match="no submodule named"):
        relative_flatness(model, batches, layer="head")
    with pytest.raises(ConfigurationError, match="2-D weight"):
        relative_flatness(model, batches, layer="1")
    with pytest.raises(ConfigurationError, match="closed form needs"):
        relative_flatness(model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), method="closed_form")
    with pytest.raises(ConfigurationError, match="max_hvp"):
        relative_flatness(model, batches, method="hvp", max_hvp=10)


def _rescaled(model: nn.Sequential, a: float) -> nn.Sequential:
    """Dinh et al. (2017): multiply the penultimate ReLU layer by a, the last layer's weight by 1/a."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out[2].weight.mul_(a)
        out[2].bias.mul_(a)
        out[4].weight.div_(a)
    return out


@settings(max_examples=15, deadline=None)
@given(st.one_of(st.floats(min_value=0.05, max_value=0.25), st.floats(min_value=4.0, max_value=20.0)))
def test_dinh_rescaling_keeps_relative_flatness_and_moves_lambda_max(a):
    model = _mlp(seed=3)
    batches = [_data(32)]
    scaled = _rescaled(model, a)
    x = batches[0][0]
    assert torch.allclose(model(x), scaled(x), rtol=1e-10, atol=1e-12)  # the same function
    r0, r1 = relative_flatness(model, batches), relative_flatness(scaled, batches)
    assert r1.value == pytest.approx(r0.value, rel=1e-8)
    assert r1.neuronwise == pytest.approx(r0.neuronwise, rel=1e-8)
    lam0 = hessian_eigenvalues(model, batches, tol=1e-6, max_iter=80).lambda_max
    lam1 = hessian_eigenvalues(scaled, batches, tol=1e-6, max_iter=80).lambda_max
    # far from a = 1 one of the two layers' Hessian blocks grows like a^2 or 1/a^2 (near a = 1 lambda_max may
    # barely move, so the law is stated for |log a| >= log 4)
    assert lam1 > 1.5 * lam0


def test_dinh_rescaling_moves_plain_worst_case_sharpness():
    """The contrast the rescaling scenario reports: worst-case sharpness moves by a large factor."""
    model = _mlp(seed=3)
    batches = [_data(32)]
    scaled = _rescaled(model, 10.0)
    plain0 = worst_case_sharpness(model, batches, rho=0.05, steps=5).value
    plain1 = worst_case_sharpness(scaled, batches, rho=0.05, steps=5).value
    assert plain1 > 2.0 * plain0 or plain0 > 2.0 * plain1


def test_saturated_softmax_matches_a_50_digit_reference():
    """Margins of ~40 nats (a distilled model): 1 - p_top ~ 4e-18 is below float64's resolution of 1, so
    diag(p) - p p^T formed naively is rounding noise; the closed form must still match the exact value."""
    import mpmath

    mpmath.mp.dps = 50
    head = nn.Linear(3, 4, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[40.0, 0, 0], [0, 40.0, 0], [0, 0, 40.0], [1.0, 2.0, -3.0]]))
    model = nn.Sequential(nn.Identity(), head)
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0.1], [0.2, 0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    r = relative_flatness(model, (x, y))
    w = [[mpmath.mpf(float(v)) for v in row] for row in head.weight.detach()]
    total = mpmath.mpf(0)
    for xi in x.tolist():
        z = [sum(mpmath.mpf(a) * b for a, b in zip(xi, row)) for row in w]
        e = [mpmath.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        sq = sum(mpmath.mpf(a) ** 2 for a in xi)
        for s_ in range(4):
            for t in range(4):
                a = p[s_] * (1 - p[s_]) if s_ == t else -p[s_] * p[t]
                total += sq * sum(u * v for u, v in zip(w[s_], w[t])) * a
    exact = float(total / 3)
    assert 0.0 < exact < 1e-9
    assert r.value == pytest.approx(exact, rel=1e-6)
