"""Framework-agnostic monitor machinery: schedule, alerts, history, probe sets, state, side effects."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from sharpguard.errors import ConfigurationError
from sharpguard.monitor import (
    Alert,
    CatastrophicOverfittingAlert,
    EdgeOfStabilityAlert,
    LossSpikeAlert,
    MetricHistory,
    ProbeSet,
    Schedule,
    SurgeAlert,
    read_history,
)
from sharpguard.monitor import schedule as schedule_module


# ----------------------------------------------------------------------------------------- schedule
def test_every_n_steps_schedule_runs_on_multiples():
    s = Schedule(every_n_steps=3)
    due = []
    for step in range(1, 11):
        if s.tick(step):
            due.append(step)
            s.record(step, 0.0)
    assert due == [3, 6, 9]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("step_time,cost,budget", [(1.0, 0.5, 0.05), (0.01, 0.2, 0.05), (0.2, 0.05, 0.1)])
def test_adaptive_schedule_keeps_the_budget(monkeypatch, step_time, cost, budget):
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = Schedule(budget=budget)
    checks, overheads = [], []
    for step in range(1, 3001):
        clock.now += step_time  # one training step
        if s.tick(step):
            clock.now += cost  # the check
            s.record(step, cost)
            checks.append(step)
            overheads.append(s.overhead_pct)
    assert checks[0] == 2 and len(checks) >= 3  # the first check waits for one measured step
    # from the second check on, the cumulative share never exceeds the budget ...
    assert max(overheads[1:]) <= 100 * budget + 1e-6
    # ... and the schedule uses most of it (not needlessly sparse)
    assert overheads[-1] >= 0.8 * 100 * budget


def test_first_adaptive_check_comes_first_then_the_budget_spaces_the_steady_state(monkeypatch):
    """Fail fast (docs/design.md promise 9): the first check runs at the first measured step and is kept
    apart; a 10 s check on 1 s steps under a 5% budget is then followed by a gap of 10 / 0.05 steps, so
    the steady state (the second check against the training after the first) is at the budget."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = Schedule(budget=0.05)
    checks = []
    for step in range(1, 1000):
        clock.now += 1.0
        if s.tick(step):
            assert s.changed  # the adapter broadcasts next_step in distributed runs
            clock.now += 10.0
            s.record(step, 10.0)
            checks.append(step)
    assert checks[0] == 2  # the step time is known from step 2
    # after the first check: steady T_monitor = 0, steady T_train = 0; owed = 10 / 0.05 = 200 s
    assert checks[1] == 2 + 200
    assert s.first_check_seconds == 10.0 and s.first_check_step == 2
    assert s.overhead_pct <= 5.0 + 1e-6


def test_schedule_rejects_bad_settings():
    with pytest.raises(ConfigurationError, match="budget"):
        Schedule(budget=0)
    with pytest.raises(ConfigurationError, match="every_n_steps"):
        Schedule(every_n_steps=0)


# ------------------------------------------------------------------------------------------- alerts
def _run(rule, values, metric, context=None):
    fired, flags = [], []
    for step, v in enumerate(values):
        metrics = {metric: v}
        alert = rule.observe(step, metrics, context or {})
        rule.after_check(metrics, context or {})
        if alert is not None:
            fired.append(step)
        flags.append(rule.active)
    return fired, flags


def test_eos_alert_hysteresis():
    rule = EdgeOfStabilityAlert(threshold=1.0, patience=3, clear_below=0.9, clear_patience=2)
    values = [1.2, 1.2, 1.2, 1.2, 0.95, 1.2, 0.5, 0.5, 1.2, 1.2, 1.2]
    fired, flags = _run(rule, values, "sharpness/eos_ratio")
    # fires after 3 consecutive checks above 1, stays active through 0.95 (inside the band), clears after
    # two checks below 0.9, fires again after 3 more
    assert fired == [2, 10]
    assert flags == [False, False, True, True, True, True, True, False, False, False, True]
    assert rule.n_fired == 2


def test_eos_alert_interrupted_streak_does_not_fire():
    rule = EdgeOfStabilityAlert(patience=3)
    fired, _ = _run(rule, [1.5, 1.5, 0.8, 1.5, 1.5, 0.8], "sharpness/eos_ratio")
    assert fired == []


def test_surge_alert_against_running_average():
    rule = SurgeAlert(factor=3.0, decay=0.5, warmup=3)
    values = [10, 12, 11, 50, 55, 11, 11, 40]
    fired, _ = _run(rule, values, "sharpness/lambda_max")
    # average after 10,12,11 (decay 0.5) = 11.0; 50 > 33 fires; stays active while 55 > 3 * avg;
    # clears at 11; the average then is ~ (((11*.5+50*.5)*.5+55*.5)*.5+11*.5) = 26.1, so 40 < 78 does not fire
    assert fired == [3]


def test_loss_spike_needs_rising_curvature():
    rule = LossSpikeAlert(factor=2.0, rise=0.1)
    checks = [  # (loss, loss_avg, lambda_max)
        (1.0, 1.0, 5.0),
        (3.0, 1.0, 5.0),  # loss spike, flat curvature: no alert
        (3.0, 1.0, 7.0),  # spike and curvature +40%: alert
    ]
    fired = []
    for step, (loss, avg, lam) in enumerate(checks):
        m, ctx = {"sharpness/lambda_max": lam}, {"loss": loss, "loss_avg": avg}
        if rule.observe(step, m, ctx) is not None:
            fired.append(step)
        rule.after_check(m, ctx)
    assert fired == [2]


def test_catastrophic_overfitting_drop_between_checks():
    rule = CatastrophicOverfittingAlert(drop=0.2)
    fired, flags = _run(rule, [0.5, 0.45, 0.2, 0.15, 0.4, 0.1], "robustness/pgd_acc")
    # 0.45 -> 0.2 is a drop of 0.25; clears when back within 0.1 of 0.45 (never here: 0.4 >= 0.35 clears)
    assert fired == [2, 5]
    assert flags == [False, False, True, True, False, True]


def test_alert_rule_state_roundtrip():
    rule = SurgeAlert(warmup=1)
    _run(rule, [1.0, 2.0, 10.0], "sharpness/lambda_max")
    clone = SurgeAlert(warmup=1)
    clone.load_state_dict(rule.state_dict())
    assert clone.state_dict() == rule.state_dict()


# ------------------------------------------------------------------------------------------ history
def test_history_jsonl_roundtrip(tmp_path):
    path = tmp_path / "h.jsonl"
    h = MetricHistory(path)
    h.append(10, {"sharpness/lambda_max": 3.5, "monitor/n_hvp": 12.0}, {"sharpness/lambda_max": {"tol": 1e-3}})
    h.append(20, {"sharpness/lambda_max": float("nan")})
    h.append(20, {"sharpness/lambda_max": 4.0})  # the same step again (a resumed run): the last one wins
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first == {"step": 10, "metric": "sharpness/lambda_max", "value": 3.5, "settings": {"tol": 1e-3}}
    assert json.loads(lines[2])["value"] is None  # strict JSON: NaN is null
    records = read_history(path)
    assert [(r["step"], r["metric"], r["value"]) for r in records] == [
        (10, "sharpness/lambda_max", 3.5),
        (10, "monitor/n_hvp", 12.0),
        (20, "sharpness/lambda_max", 4.0),
    ]
    assert read_history(path, metrics=["monitor/n_hvp"])[0]["value"] == 12.0


def test_disabled_history_writes_nothing(tmp_path):
    h = MetricHistory(tmp_path / "h.jsonl", enabled=False)
    h.append(1, {"a/b": 1.0})
    assert not (tmp_path / "h.jsonl").exists() and h.values("a/b") == [(1, 1.0)]


# -------------------------------------------------------------------------------------------- probe
def test_capture_copies_the_first_examples():
    xs = [torch.arange(12.0).reshape(6, 2) + 100 * i for i in range(3)]
    ys = [torch.arange(6) + 10 * i for i in range(3)]
    probe = ProbeSet(size=8, batch_size=4)
    assert not probe.capture((xs[0], ys[0]))
    assert probe.capture((xs[1], ys[1]))
    assert probe.capture((xs[2], ys[2]))  # no-op once complete
    batches = probe.batches
    assert [b[0].shape[0] for b in batches] == [4, 2, 2]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(x, torch.cat([xs[0], xs[1][:2]]))
    xs[0].zero_()  # copies, not views of training tensors
    assert torch.equal(batches[0][0], torch.arange(8.0).reshape(4, 2))


def test_capture_works_on_inference_tensors():
    with torch.inference_mode():
        batch = (torch.randn(4, 3), torch.arange(4))
    probe = ProbeSet(size=4)
    probe.capture(batch)
    x = probe.batches[0][0]
    assert not x.is_inference()
    w = torch.randn(3, requires_grad=True)
    (x @ w).sum().backward()  # usable by autograd


def test_probe_from_dataset_is_seeded_and_leaves_global_rng():
    data = torch.utils.data.TensorDataset(torch.arange(100.0).unsqueeze(1), torch.arange(100))
    state = torch.get_rng_state()
    a = ProbeSet.from_dataset(data, 10, seed=3, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = ProbeSet.from_dataset(data, 10, seed=3, batch_size=4)
    c = ProbeSet.from_dataset(data, 10, seed=4, batch_size=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a) == 10 and [len(t[1]) for t in a.batches] == [4, 4, 2]


def test_probe_state_is_loadable_weights_only():
    probe = ProbeSet(size=5)
    probe.capture((torch.randn(8, 3), torch.arange(8)))
    buf = io.BytesIO()
    torch.save(probe.state_dict(), buf)
    buf.seek(0)
    restored = ProbeSet(size=5)
    assert restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.ready and restored.fingerprint == probe.fingerprint
    small = ProbeSet(size=5)
    small.capture((torch.randn(8, 3), torch.arange(8)))
    state = small.state_dict(max_bytes=10)
    assert state["batches"] is None
    again = ProbeSet(size=5)
    assert not again.load_state_dict(state) and not again.ready


def test_empty_probe_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="empty"):
        ProbeSet([])
    with pytest.raises(ConfigurationError, match="integer >= 1"):
        ProbeSet(size=0)


def test_alert_is_plain_data():
    a = Alert("eos", 3, "sharpness/eos_ratio", 1.5, "msg")
    assert json.loads(json.dumps(a.to_dict()))["step"] == 3
    assert math.isfinite(a.value)


def test_adapter_hook_time_counts_as_monitor_time_not_training_time(monkeypatch):
    """Honest cost: what a monitor does on every step (capture, bookkeeping) is its own time, so the
    budget and monitor/overhead_pct include it; the time between hooks is training time. A fake clock
    makes the accounting exact (no sleeps, no tolerance windows)."""
    from sharpguard.monitor import schedule as schedule_module
    from sharpguard.monitor.schedule import Schedule

    clock = [100.0]
    monkeypatch.setattr(schedule_module.time, "perf_counter", lambda: clock[0])
    schedule = Schedule(every_n_steps=1000)
    schedule.tick(0)
    clock[0] += 0.020                      # training
    schedule.tick(1, now=clock[0])
    clock[0] += 0.010                      # the monitor's per-step work inside the hook
    schedule.leave()
    assert schedule.train_seconds == pytest.approx(0.020, abs=1e-12)
    assert schedule.monitor_seconds == pytest.approx(0.010, abs=1e-12)
    clock[0] += 0.020                      # training again: not the monitor's
    schedule.tick(2)
    assert schedule.train_seconds == pytest.approx(0.040, abs=1e-12)
    assert schedule.monitor_seconds == pytest.approx(0.010, abs=1e-12)


def test_loss_average_folded_at_checks_equals_the_sequential_update():
    """The loss average is folded lazily (no tensor op on skipped steps) but equals the step-by-step
    exponential average that skips non-finite losses."""
    import math

    import torch

    from sharpguard.monitor import SharpnessMonitor

    losses = [2.0, 1.5, float("nan"), 1.2, float("inf"), 1.1, 0.9] + [1.0 + 0.01 * k for k in range(30)]
    mon = SharpnessMonitor(every_n_steps=10**6, probe=[(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    for step, value in enumerate(losses):
        mon._update_loss(torch.tensor(value, dtype=torch.float64) if step % 2 else value)
    avg = losses[0]
    for value in losses[1:]:
        if math.isfinite(value):
            avg = 0.9 * avg + 0.1 * value
    context = mon._loss_context(torch.tensor(5.0))
    assert context["loss"] == 5.0
    assert context["loss_avg"] == pytest.approx(avg, rel=1e-6)
    state = mon.state_dict()
    assert state["loss_avg"] == pytest.approx(avg, rel=1e-6) and state["loss"] == pytest.approx(losses[-1])


def test_eos_ratio_that_cannot_be_measured_warns_and_keeps_lambda_max():
    """A monitor never stops training: Adam whose first step was skipped has no exp_avg_sq yet."""
    import torch
    from torch import nn

    from sharpguard.monitor import SharpnessMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    probe = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # no step taken: no exp_avg_sq
    mon = SharpnessMonitor(measures=("lambda_max", "eos_ratio"), every_n_steps=1, probe=probe, alerts=None)
    with pytest.warns(UserWarning, match="eos_ratio skipped"):
        metrics = mon.check(1, model, optimizer=opt)
    assert "sharpness/eos_ratio" not in metrics
    assert math.isfinite(metrics["sharpness/lambda_max"])
    # lr = 0 (end of a cosine schedule) is measurable: ratio 0
    sgd = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    assert mon.check(2, model, optimizer=sgd)["sharpness/eos_ratio"] == 0.0
