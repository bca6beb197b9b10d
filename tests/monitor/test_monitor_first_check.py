"""The first check is small and says so; the full check follows on the schedule; long checks show progress.

Laws checked against independent references: the quick first check's lambda_max is the top eigenvalue
of the dense float64 Hessian of the loss on the quick probe (its first examples) to its stated
tolerance, the full check's is the dense Hessian's of the whole probe to the full tolerance, and a
quick check's clean accuracy is the accuracy counted by hand on the same examples. The schedule law
(hypothesis): after a quick first check the next check is spaced by the planned full cost, so the
steady state keeps the budget when that plan is not an under-estimate.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpguard.attacks import _progress
from sharpguard.errors import ConfigurationError
from sharpguard.monitor import RobustnessMonitor, SharpnessMonitor
from sharpguard.monitor import schedule as schedule_module
from sharpguard.monitor.schedule import Schedule


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _dense_lambda_max(model, x, y):
    """Top eigenvalue of the float64 Hessian of mean cross entropy on (x, y), by torch.func.hessian."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def loss(w):
        chunks = torch.split(w, sizes)
        p = {k: c.reshape(params[k].shape) for k, c in zip(names, chunks)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    h = torch.autograd.functional.hessian(loss, flat)
    return float(torch.linalg.eigvalsh(h)[-1])


def _train(monitor, steps, data=None):
    model = _model()
    x, y = data or _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logged = []
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = monitor.on_step_end(step, model, optimizer=opt, loss=loss.detach())
        if metrics:
            logged.append((step, metrics))
    return model, logged


def _records(monitor, metric):
    return [r for r in monitor.history.records if r["metric"] == metric]


def test_the_first_check_is_quick_correct_to_its_tolerance_and_labelled():
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in (1, 2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = mon.on_step_end(step, model, optimizer=opt, loss=loss.detach())
    assert mon.schedule.n_checks == 1 and mon.schedule.first_check_step == 2
    (record,) = _records(mon, "sharpness/lambda_max")
    s = record["settings"]
    quick_n = math.ceil(32 * SharpnessMonitor.QUICK_FRACTION)
    assert s["check"] == "quick" and s["probe_size"] == quick_n == 4 and s["of_probe"] == 32
    assert s["tol"] == SharpnessMonitor.QUICK_TOL == 1e-2 and s["converged"]
    # the quick probe is the probe's first examples: its value is their dense Hessian's top eigenvalue
    reference = _dense_lambda_max(model, x[:quick_n], y[:quick_n])
    assert metrics["sharpness/lambda_max"] == pytest.approx(reference, rel=1e-2)
    # ... which is not the whole probe's (the test would pass for a full first check otherwise)
    assert abs(reference - _dense_lambda_max(model, x, y)) > 1e-2 * abs(reference)
    # the next (full) check is spaced by at least the quick cost scaled to the whole probe (32 / 4 examples)
    assert mon.schedule.last_cost >= 8 * mon.schedule.first_check_seconds
    assert {k: mon.first_check_settings[k] for k in ("check", "probe_size", "of_probe", "tol", "converged")} == {
        "check": "quick", "probe_size": 4, "of_probe": 32, "tol": 1e-2, "converged": True}


def test_a_quick_check_that_misses_its_tolerance_says_what_bound_it_has():
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None,
                           measure_kwargs={"lambda_max": {"max_iter": 2}})
    _train(mon, 2, (x, y))
    (record,) = _records(mon, "sharpness/lambda_max")
    assert record["settings"]["converged"] is False
    residual = record["settings"]["residual"]
    assert (f"tolerance 0.01 not reached in {record['settings']['n_hvp']} products, Ritz residual {residual:.2g} "
            "(an eigenvalue lies within it)") in mon.summary()


def test_the_full_check_follows_warm_started_on_the_whole_probe():
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None, max_every=3)
    model, logged = _train(mon, 5, (x, y))
    assert [step for step, _ in logged] == [2, 5]
    first, full = _records(mon, "sharpness/lambda_max")
    assert first["settings"]["check"] == "quick" and first["settings"]["warm_start"] is False
    assert "check" not in full["settings"] and full["settings"]["probe_size"] == 32
    assert full["settings"]["warm_start"] is True and full["settings"]["tol"] == 1e-3
    assert full["value"] == pytest.approx(_dense_lambda_max(model, x, y), rel=1e-3)
    # the quick check's micro-batch choice is not kept for the full probe
    assert mon._auto is not None and mon._auto[0] == tuple(id(b) for b in mon.probe.batches)


def test_first_check_full_measures_the_whole_probe_and_bad_values_are_refused():
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None, first_check="full")
    model, logged = _train(mon, 2, (x, y))
    (record,) = _records(mon, "sharpness/lambda_max")
    assert "check" not in record["settings"] and record["settings"]["probe_size"] == 32
    assert record["value"] == pytest.approx(_dense_lambda_max(model, x, y), rel=1e-3)
    assert "quick" not in mon.summary()
    with pytest.raises(ConfigurationError, match="first_check must be 'quick' or 'full', got 'fast'"):
        SharpnessMonitor(first_check="fast")
    with pytest.raises(ConfigurationError, match="progress must be True, False or None"):
        RobustnessMonitor(progress="yes")


def test_a_fixed_interval_makes_every_check_full():
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None, every_n_steps=2)
    _train(mon, 2, (x, y))
    (record,) = _records(mon, "sharpness/lambda_max")
    assert "check" not in record["settings"] and record["settings"]["probe_size"] == 32


def test_the_lines_say_the_first_check_is_quick():
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None)
    assert "a quick check on 12.5% of the first probe batch at tolerance 0.01" in mon.describe()
    _train(mon, 3, (x, y))
    line = mon.summary()
    assert ("first check at step 2 (a quick check that proves the measurement end to end: 4 of the probe's 32 "
            "examples, tolerance 0.01; full checks on the whole probe follow on the schedule)") in line


def test_a_quick_robustness_check_counts_the_first_examples():
    x, y = _data(40, seed=1)
    x = torch.sigmoid(x).float()
    model = _model().float()
    mon = RobustnessMonitor(measures=("clean_acc", "pgd_acc"), probe=[(x, y)], alerts=None, eps=0.05, steps=3)
    for step in (1, 2):
        metrics = mon.on_step_end(step, model)
    n = math.ceil(40 * RobustnessMonitor.QUICK_FRACTION)
    with torch.no_grad():
        expected = (model(x[:n]).argmax(1) == y[:n]).double().mean().item()
    assert metrics["robustness/clean_acc"] == pytest.approx(expected)
    (record,) = _records(mon, "robustness/pgd_acc")
    assert record["settings"]["check"] == "quick" and record["settings"]["probe_size"] == n == 5


def test_the_next_check_after_a_quick_one_is_spaced_by_the_planned_full_cost():
    s = Schedule(budget=0.1)
    clock = [0.0]
    saved = schedule_module.time.perf_counter
    schedule_module.time.perf_counter = lambda: clock[0]
    try:
        for step in (1, 2):
            clock[0] += 1.0
            due = s.tick(step)
        assert due
        clock[0] += 0.5
        # the quick check cost 0.5 s; a full one is planned at 20 s: 20 / 0.1 = 200 s of training first
        assert s.record(2, 0.5, planned_cost=20.0) == 2 + 200
        assert s.first_check_seconds == 0.5
    finally:
        schedule_module.time.perf_counter = saved


@settings(max_examples=40, deadline=None)
@given(step_time=st.floats(0.001, 1.0), quick_steps=st.floats(0.1, 10.0), full_steps=st.floats(1.0, 200.0),
       over=st.floats(1.0, 2.0), budget=st.sampled_from([0.02, 0.05, 0.25]))
def test_after_a_quick_first_check_the_steady_state_keeps_the_budget(step_time, quick_steps, full_steps, over, budget):
    """Whatever the quick and full costs, a plan that does not under-estimate the full check keeps every
    steady-state share within the budget."""
    clock = [0.0]
    saved = schedule_module.time.perf_counter
    schedule_module.time.perf_counter = lambda: clock[0]
    try:
        s = Schedule(budget=budget)
        full = full_steps * step_time
        overheads = []
        for step in range(1, 3000):
            clock[0] += step_time
            if s.tick(step):
                cost = quick_steps * step_time if s.n_checks == 0 else full
                clock[0] += cost
                s.record(step, cost, planned_cost=over * full if s.n_checks == 0 else None)
                overheads.append(s.overhead_pct)
            s.leave()
    finally:
        schedule_module.time.perf_counter = saved
    assert overheads[0] == 0.0 and s.first_check_seconds == pytest.approx(quick_steps * step_time)
    assert max(overheads) <= 100 * budget + 1e-6


def _progress_monitor(**kw):
    x, y = _data()
    return SharpnessMonitor(measures=("lambda_max", "trace"), probe=[(x, y)], alerts=None, **kw)


def test_progress_true_draws_a_bar_on_stderr_naming_the_check(capsys):
    _train(_progress_monitor(progress=True), 2)
    err = capsys.readouterr().err
    assert "sharpguard SharpnessMonitor quick first check at step 2" in err
    assert "2/2" in err  # both measures done


def test_progress_is_silent_when_off_or_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    _train(_progress_monitor(progress=False), 2)
    _train(_progress_monitor(), 2)  # capsys's stderr is not a terminal
    assert capsys.readouterr().err == ""
    # a terminal: shown, after PROGRESS_DELAY (0 here)
    monkeypatch.setattr(_progress, "interactive", lambda stream=None: True)
    monkeypatch.setattr(SharpnessMonitor, "PROGRESS_DELAY", 0.0)
    _train(_progress_monitor(), 2)
    assert "SharpnessMonitor quick first check at step 2" in capsys.readouterr().err


def test_progress_without_tqdm_prints_one_line_per_measure(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    _train(_progress_monitor(progress=True), 2)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sharpguard SharpnessMonitor")]
    assert len(lines) == 2 and "lambda done" in lines[0] and "trace done" in lines[1]


def test_sgd_with_weight_decay_takes_lambda_max_from_the_eos_run():
    """SGD's edge-of-stability operator with one weight decay wd is H + wd I: one Lanczos run gives both,
    lambda_max(H) = lambda_max(H + wd I) - wd (a large wd here, so a missing shift would show)."""
    x, y = _data()
    mon = SharpnessMonitor(measures=("lambda_max", "eos_ratio"), probe=[(x, y)], alerts=None, every_n_steps=1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.3)
    metrics = mon.on_step_end(1, model, optimizer=opt)
    reference = _dense_lambda_max(model, x, y)
    assert metrics["sharpness/lambda_max"] == pytest.approx(reference, rel=1e-3)
    assert metrics["sharpness/eos_ratio"] == pytest.approx((reference + 0.3) / ((2 + 2 * 0.9) / 0.05), rel=1e-3)
    (eos,) = _records(mon, "sharpness/eos_ratio")
    assert metrics["monitor/n_hvp"] == eos["settings"]["n_hvp"]  # one run, not two
    (lam,) = _records(mon, "sharpness/lambda_max")
    assert lam["settings"]["weight_decay"] == 0.3
    # groups with different decays: not a shift of H, so lambda_max gets its own run
    mon2 = SharpnessMonitor(measures=("lambda_max", "eos_ratio"), probe=[(x, y)], alerts=None, every_n_steps=1)
    params = list(model.parameters())
    opt2 = torch.optim.SGD([{"params": params[:2], "weight_decay": 0.3}, {"params": params[2:]}], lr=0.05)
    metrics2 = mon2.on_step_end(1, model, optimizer=opt2)
    assert metrics2["sharpness/lambda_max"] == pytest.approx(reference, rel=1e-3)
    assert metrics2["monitor/n_hvp"] > _records(mon2, "sharpness/eos_ratio")[0]["settings"]["n_hvp"]


def test_a_loss_that_needs_the_whole_batch_gets_a_quick_check_on_the_whole_first_batch():
    """A loss whose state is sized for the training batch (Lightning's LSTM demo carries one) cannot run
    on part of a batch: the quick check keeps the loose tolerance on the whole first batch, says so in
    its record, and micro-batching of later checks is not given up for it."""
    x, y = _data()

    def whole_batch_loss(model, batch):
        inputs, targets = batch
        if len(inputs) != 32:
            raise RuntimeError("state sized for 32 examples")
        return torch.nn.functional.cross_entropy(model(inputs), targets)

    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None, loss_fn=whole_batch_loss,
                           micro_batches=1)
    model, _ = _train(mon, 2, (x, y))
    (record,) = _records(mon, "sharpness/lambda_max")
    assert record["settings"]["check"] == "quick" and record["settings"]["probe_size"] == 32
    assert record["value"] == pytest.approx(_dense_lambda_max(model, x, y), rel=1e-2)
