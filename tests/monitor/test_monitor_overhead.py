"""Monitor cost where users look: the first check apart, the steady state within the budget.

A fake clock makes the accounting exact. The laws: the first check is reported apart
(``first_check_seconds``, ``monitor/first_check_s``) and is not part of ``overhead_pct``; from the
second check on the steady-state share never exceeds the budget, whatever the step time and check
cost (hypothesis); a pending check is re-planned when the step time changes after the check that
placed it; the end line says plainly why a short run has no steady-state check.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharpguard.errors import ConfigurationError
from sharpguard.monitor import SharpnessMonitor
from sharpguard.monitor import schedule as schedule_module
from sharpguard.monitor.schedule import Schedule


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(schedule, clock, steps, step_time, cost, first_cost=None, bookkeeping=0.0):
    """Train ``steps`` steps of ``step_time`` s; a due check costs ``cost`` (the first ``first_cost``)."""
    checks, overheads = [], []
    for step in range(1, steps + 1):
        clock.now += step_time(step) if callable(step_time) else step_time
        if schedule.tick(step):
            c = first_cost if (first_cost is not None and not checks) else cost
            clock.now += c
            schedule.record(step, c)
            checks.append(step)
            overheads.append(schedule.overhead_pct)
        clock.now += bookkeeping
        schedule.leave()
    return checks, overheads


@settings(max_examples=40, deadline=None)
@given(
    step_time=st.floats(0.001, 2.0),
    cost_steps=st.floats(0.5, 200.0),
    first_factor=st.floats(1.0, 20.0),
    budget=st.sampled_from([0.02, 0.05, 0.1, 0.25]),
)
def test_steady_state_keeps_the_budget_and_the_first_check_stands_apart(step_time, cost_steps, first_factor, budget):
    clock = FakeClock()
    schedule_module.time.perf_counter, saved = clock, schedule_module.time.perf_counter
    try:
        s = Schedule(budget=budget)
        cost = cost_steps * step_time
        checks, overheads = _run(s, clock, 4000, step_time, cost, first_cost=first_factor * cost)
    finally:
        schedule_module.time.perf_counter = saved
    assert checks[0] == 2 and s.first_check_step == 2
    assert s.first_check_seconds == pytest.approx(first_factor * cost)
    assert overheads[0] == 0.0  # no steady state at the first check
    # the steady state: the later checks against the training after the first, never above the budget
    assert max(overheads) <= 100 * budget + 1e-6
    steady = (len(checks) - 1) * cost
    train = (4000 - 2) * step_time
    assert s.steady_seconds == pytest.approx(steady, rel=1e-9, abs=1e-9)
    assert s.overhead_pct == pytest.approx(100 * steady / train, rel=1e-6, abs=1e-9)
    # all included: the first check counts there
    assert s.total_overhead_pct == pytest.approx(100 * (steady + first_factor * cost) / (train + step_time), rel=1e-6)
    # the gap after the first check is set by its cost (an over-estimate of later checks, on the safe side)
    if 2 + ((first_factor + 2) * cost / budget) / step_time < 4000:  # room for several intervals: the budget is used
        assert len(checks) >= 2 and s.overhead_pct >= 0.5 * 100 * budget


def test_a_pending_check_is_replanned_when_the_step_time_changes(monkeypatch):
    """One early step time is a poor guide: the first steps run 10x faster here than the rest of the run.
    Placed from the early step time alone the second check would come at step 2 + 10/0.05/0.01 = 20002;
    re-planned from the step time measured since, it comes near 2 + 200/0.1 = 2002."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = Schedule(budget=0.05)
    checks, _ = _run(s, clock, 3000, lambda step: 0.01 if step <= 2 else 0.1, cost=10.0)
    assert checks[0] == 2
    assert 1990 <= checks[1] <= 2010
    assert s.overhead_pct <= 5.0 + 1e-6


def test_replanning_never_makes_a_check_due_at_the_step_that_replans(monkeypatch):
    """Ranks agree on next_step through a broadcast after the step: a re-plan must not make a check due
    at that very step (it would be due on one rank and not on another)."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = Schedule(budget=0.5)
    clock.now = 1.0
    s.tick(1)
    clock.now += 1.0
    assert s.tick(2)
    s.record(2, 10.0)
    assert s.next_step == 2 + 20  # (0 + 10) / 0.5 s of training at 1 s per step
    s.changed = False
    clock.now += 1.0
    assert not s.tick(3) and not s.changed  # re-planned at 2, 4, 8, ... steps after the check only
    clock.now += 100.0  # one very slow step: the budget is more than paid
    assert not s.tick(4) and s.next_step == 5  # moved to the next step, never due now
    assert s.changed


def test_a_replan_step_is_announced_on_every_rank_even_when_its_clock_changes_nothing(monkeypatch):
    """The driver broadcasts rank 0's next_step when ``changed`` is set; a rank whose re-plan lands on the
    same step must join that collective too, so ``changed`` cannot depend on the local clock."""
    clock = FakeClock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    s = Schedule(budget=0.05)
    _run(s, clock, 2, 1.0, cost=10.0)
    s.changed = False
    before = s.next_step
    clock.now += 1.0
    s.tick(3)
    clock.now += 1.0
    s.tick(4)  # a re-plan step: same step time, same target
    assert s.next_step == before and s.changed


def _probe():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))]


def _loop(monitor, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logged = []
    for step in range(1, steps + 1):
        x, y = _probe()[0]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = monitor.on_step_end(step, model, optimizer=opt, loss=loss.detach())
        if metrics:
            logged.append((step, metrics))
    return logged


def test_the_first_check_is_logged_apart_and_overhead_pct_is_the_steady_state():
    mon = SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None)
    logged = _loop(mon, 5)
    step, first = logged[0]
    assert step == 2 and first["monitor/first_check_s"] == mon.schedule.first_check_seconds > 0
    assert first["monitor/overhead_pct"] == 0.0
    assert all("monitor/first_check_s" not in m for _, m in logged[1:])
    line = mon.summary()
    assert line.startswith("SharpnessMonitor made 1 checks; first check at step 2 (a quick check that proves the "
                           "measurement end to end: 1 of the probe's 8 examples, tolerance 0.01; ")
    assert "reported apart as monitor/first_check_s" in line
    assert f"the run ended at step 5, before the next check was due at step {mon.schedule.next_step}" in line
    assert mon.schedule.next_step > 5 and mon.end_notes() == []


def test_a_fixed_schedule_over_budget_says_so_and_names_an_interval_that_fits():
    mon = SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None, every_n_steps=1)
    _loop(mon, 6)
    line = mon.summary()
    assert "every_n_steps=1 fixes the interval, so the 5% budget does not bound it" in line
    # each check costs far more than a step of this tiny model: above the budget, with the interval that fits
    per_check = mon.schedule.steady_seconds / (mon.schedule.n_checks - 1) / mon.schedule.step_seconds
    assert f"every_n_steps of about {math.ceil(per_check / 0.05)}" in line


def test_every_n_steps_longer_than_the_run_warns_at_once_and_at_the_end():
    mon = SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None, every_n_steps=10)
    with pytest.warns(UserWarning, match=r"every_n_steps=10 exceeds this run's 4 optimizer steps \(max_steps=4\)"):
        mon.expect_steps(4, "max_steps=4")
    mon.expect_steps(float("inf"))  # an unknown length says nothing
    _loop(mon, 4)
    assert mon.summary().startswith("SharpnessMonitor made 0 checks")
    (note,) = mon.end_notes()
    assert "every_n_steps=10 is more than the 4 optimizer steps trained" in note
    reasons = [r["settings"]["reason"] for r in mon.history.records if r["metric"] == "monitor/note"]
    assert reasons[-1] == note and len(reasons) == 2  # the start warning and the end note, each once
    mon.end_notes()
    assert len([r for r in mon.history.records if r["metric"] == "monitor/note"]) == 2


def test_a_run_of_one_step_says_the_first_check_waits_for_a_step_time():
    mon = SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None)
    _loop(mon, 1)
    (note,) = mon.end_notes()
    assert "first check waits for a measured step time" in note


def test_the_schedule_state_round_trips_and_is_checked():
    mon = SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None)
    _loop(mon, 3)
    state = mon.state_dict()
    other = SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None)
    other.load_state_dict(state)
    assert other.schedule.first_check_seconds == mon.schedule.first_check_seconds
    assert other.schedule.steady_seconds == pytest.approx(mon.schedule.steady_seconds)
    for field, bad in (("first_check_seconds", -1.0), ("first_check_step", "2"), ("setup_seconds", [1.0])):
        broken = {**state, "schedule": {**state["schedule"], field: bad}}
        with pytest.raises(ConfigurationError, match=f"schedule.{field}"):
            SharpnessMonitor(measures=("lambda_max",), probe=_probe(), alerts=None).load_state_dict(broken)
    # a checkpoint from before the first check was kept apart loads (its steady state includes it)
    old = {**state, "schedule": {k: v for k, v in state["schedule"].items()
                                 if k not in ("first_check_seconds", "first_check_step", "setup_seconds")}}
    other.load_state_dict(old)
    assert (other.schedule.first_check_seconds is None
            and other.schedule.steady_seconds == other.schedule.monitor_seconds)


def test_the_start_line_states_the_cost_of_a_check_before_the_first_batch():
    """An auto-sized probe is whole training batches, as many as keep a check within CHECK_STEPS: the
    line can state the cost in training steps before any batch is seen."""
    mon = SharpnessMonitor(measures=("lambda_max",))
    per_batch = mon.passes()
    expected = per_batch * max(1, int(mon.CHECK_STEPS // per_batch))
    assert mon.estimated_check_steps() == pytest.approx(expected)
    line = mon.describe()
    assert f"~{expected:.0f} training steps per check (estimated)" in line
    assert "first check at the first measured step (a quick check" in line and "monitor/first_check_s" in line
    assert "within 5% of training time (monitor/overhead_pct)" in line
