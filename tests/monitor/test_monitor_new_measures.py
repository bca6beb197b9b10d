"""The field's newer measures are available to the monitors (issue 15): each monitor metric equals the
function it delegates to on the same probe, and a measure that needs a setting says so when built."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpguard.sharpness as S
from sharpguard.attacks import input_grad_norm
from sharpguard.errors import ConfigurationError
from sharpguard.monitor import RobustnessMonitor, SharpnessMonitor


def model_and_probe():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 6, generator=g)
    y = torch.randint(0, 3, (24,), generator=g)
    return net, [(x, y)]


def test_relative_flatness_and_robust_sharpness_in_the_sharpness_monitor():
    net, probe = model_and_probe()
    monitor = SharpnessMonitor(measures=("relative_flatness", "robust_sharpness"), probe=probe, every_n_steps=1,
                               alerts=None, measure_kwargs={"robust_sharpness": {"eps": 0.1, "attack_steps": 3}})
    before = [p.detach().clone() for p in net.parameters()]
    metrics = monitor.check(1, net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # side-effect free
    rf = S.relative_flatness(net, probe)
    rs = S.robust_sharpness(net, probe, eps=0.1, attack_steps=3, rho=0.05, seed=0)
    assert metrics["sharpness/relative_flatness"] == pytest.approx(rf.value, rel=1e-6)
    assert metrics["sharpness/relative_flatness_neuronwise"] == pytest.approx(rf.neuronwise, rel=1e-6)
    assert metrics["sharpness/robust_sharpness"] == pytest.approx(rs.value, rel=1e-6)
    assert rf.value > 0 and rs.value >= 0


def test_robust_sharpness_without_a_radius_is_refused_when_built():
    with pytest.raises(ConfigurationError, match="robust_sharpness.*eps"):
        SharpnessMonitor(measures=("robust_sharpness",))


def test_input_space_measures_in_the_robustness_monitor():
    net, probe = model_and_probe()
    monitor = RobustnessMonitor(measures=("input_grad_norm", "input_curvature", "adv_confidence",
                                          "adv_input_curvature"),
                                eps=0.3, steps=5, probe=probe, every_n_steps=1, alerts=None)
    metrics = monitor.check(1, net)
    curvature = S.input_hessian_eigenvalue(net, probe, seed=0)
    geo = S.adversarial_geometry(net, probe, eps=0.3, attack_steps=5, alpha=0.3 / 4, seed=0)
    assert metrics["robustness/input_grad_norm"] == pytest.approx(float(input_grad_norm(net, probe)), rel=1e-6)
    assert metrics["robustness/input_curvature"] == pytest.approx(curvature.mean, rel=1e-5)
    assert geo.adv_confidence_fooled is not None  # eps = 0.3 fools this untrained net
    assert metrics["robustness/adv_confidence"] == pytest.approx(geo.adv_confidence_fooled, rel=1e-6)
    assert metrics["robustness/adv_input_curvature"] == pytest.approx(geo.adv_curvature, rel=1e-5)


def test_adversarial_measures_refuse_normalisation_they_cannot_apply():
    with pytest.raises(ConfigurationError, match="mean/std"):
        RobustnessMonitor(measures=("adv_confidence",), mean=[0.5] * 6, std=[0.2] * 6)
