"""The law of docs/design.md promise 1, property-tested: for any monitor configuration, a monitored run
trains to bitwise the same weights, buffers and RNG state as the same run without the monitor."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.monitor import RobustnessMonitor, SharpnessMonitor


def _run(monitors, steps: int, seed: int, adam: bool):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(),
                           lr=1e-2) if adam else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x, y = torch.rand(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for mon in monitors:
            mon.on_step_end(step, model, optimizer=opt, loss=loss.detach(), batch=(x, y))
    state = [t.detach().clone() for t in model.state_dict().values()]
    return state, torch.get_rng_state(), [mon.schedule.n_checks for mon in monitors]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sharp=st.lists(st.sampled_from(SharpnessMonitor.MEASURES), min_size=1, max_size=3, unique=True),
    robust=st.lists(st.sampled_from(RobustnessMonitor.MEASURES), min_size=1, max_size=2, unique=True),
    every=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    adam=st.booleans(),
)
def test_monitored_run_is_bitwise_the_unmonitored_run(sharp, robust, every, seed, adam):
    kw = {"lambda_max": {"max_iter": 6}, "lambda_min": {"max_iter": 6}, "eos_ratio": {"max_iter": 6},
          "trace": {"n_hvp": 6}, "worst_case": {"steps": 2}, "adaptive_worst_case": {"steps": 2},
          "average": {"n_samples": 2}, "robust_sharpness": {"eps": 0.1, "attack_steps": 2, "steps": 1}}
    monitors = [
        SharpnessMonitor(sharp, every_n_steps=every, probe_size=6, alerts=None, seed=seed,
                         measure_kwargs={k: v for k, v in kw.items() if k in sharp}),
        RobustnessMonitor(robust, every_n_steps=every, probe_size=6, eps=0.1, steps=2, alerts=None, seed=seed),
    ]
    plain, rng_plain, _ = _run([], 4, seed, adam)
    watched, rng_watched, checks = _run(monitors, 4, seed, adam)
    assert all(n >= 1 for n in checks)  # the monitors did measure
    for a, b in zip(plain, watched, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(rng_plain, rng_watched)
