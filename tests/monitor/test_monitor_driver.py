"""The framework-free monitor driver (issue 10): step counting, one schedule-broadcast rule, metric
averaging and "stop" across ranks, rank-0 history, and its collectives over real gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.monitor import SharpnessMonitor
from sharpguard.monitor.driver import LocalComm, MonitorDriver, torch_comm


class RecordingComm:
    """Two fake ranks: this one and a peer whose values are given (rank 0 is the peer)."""

    world_size = 2

    def __init__(self, peer_next_step: int = 7, peer_offset: float = 1.0, peer_stop: bool = False) -> None:
        self.calls: list[tuple[str, object]] = []
        self.peer_next_step, self.peer_offset, self.peer_stop = peer_next_step, peer_offset, peer_stop

    def broadcast_int(self, value: int) -> int:
        self.calls.append(("broadcast", value))
        return self.peer_next_step

    def mean_floats(self, values: list[float]) -> list[float]:
        self.calls.append(("mean", list(values)))
        return [(v + (v + self.peer_offset)) / 2 for v in values]

    def any_true(self, flag: bool) -> bool:
        self.calls.append(("any", flag))
        return flag or self.peer_stop


def _setup(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    probe = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    mon = SharpnessMonitor(measures=("lambda_max",), probe=probe, alerts=None, **kw)
    return model, mon


def test_broadcast_only_when_the_schedule_changed_and_rank_zero_wins():
    model, mon = _setup()  # adaptive
    comm = RecordingComm(peer_next_step=5)
    driver = MonitorDriver(mon, comm, is_rank_zero=False)
    assert mon.history.enabled is False  # only rank 0 writes the history
    checks, broadcast_steps = [], []
    for step in range(1, 9):
        before = len(comm.calls)
        if driver.step(model, step=step):
            checks.append(step)
        if any(c[0] == "broadcast" for c in comm.calls[before:]):
            broadcast_steps.append(step)
    # the first check comes at the first measured step (2: placed by step count, the same on every
    # rank); each check changes the schedule from local timings, so rank 0's next step is taken then,
    # and at the re-plan steps 2, 4, 8, ... steps after a check (step 4 here: the same on every rank),
    # and on no other step
    assert checks[0] == 2
    assert broadcast_steps == sorted(set(checks) | {4})
    assert checks[1] == 5  # rank 0's next_step (5), not this rank's own
    own = [c[1] for c in comm.calls if c[0] == "broadcast"][0]
    assert own > 8  # (far away: a check costs many of these tiny steps)
    # at check steps only: the measured values are averaged inside the check (before alerts and the
    # history), what the check adds after them (overhead, alert flags) in the driver; "stop" is agreed
    assert sum(c[0] == "mean" for c in comm.calls) == 2 * len(checks)
    assert sum(c[0] == "any" for c in comm.calls) == len(checks)


def test_metrics_are_the_rank_mean_and_stop_on_any_rank():
    model, mon = _setup(every_n_steps=1)
    local = MonitorDriver(_setup(every_n_steps=1)[1])
    comm = RecordingComm(peer_offset=2.0, peer_stop=True)
    driver = MonitorDriver(mon, comm)
    got = driver.step(model, step=1)
    want = local.step(model, step=1)
    assert got["sharpness/lambda_max"] == pytest.approx(want["sharpness/lambda_max"] + 1.0)
    # the history and the alerts saw the averaged value too
    assert mon.history.values("sharpness/lambda_max")[-1][1] == got["sharpness/lambda_max"]
    assert driver.should_stop and not mon.should_stop  # the peer's alert stops this rank too
    # fixed schedules never broadcast
    assert not any(c[0] == "broadcast" for c in comm.calls)


def test_repeated_steps_are_accumulation_micro_batches():
    model, mon = _setup(every_n_steps=2)
    driver = MonitorDriver(mon)
    out = [bool(driver.step(model, step=s)) for s in (1, 1, 2, 2, 2, 3, 4)]
    assert out == [False, False, True, False, False, False, True]
    counted = MonitorDriver(_setup(every_n_steps=2)[1])
    assert [bool(counted.step(model)) for _ in range(4)] == [False, True, False, True]
    assert counted.global_step == 4


def test_driver_state_roundtrip_and_refusals():
    model, mon = _setup(every_n_steps=2)
    driver = MonitorDriver(mon)
    for s in range(1, 5):
        driver.step(model, step=s)
    state = driver.state_dict()
    other = MonitorDriver(_setup(every_n_steps=2)[1])
    other.load_state_dict(state)
    assert other.last_step == 4 and other.monitor.history.values("sharpness/lambda_max") == mon.history.values(
        "sharpness/lambda_max")
    with pytest.raises(ConfigurationError, match="monitor"):
        other.load_state_dict({"last_step": 3})
    with pytest.raises(ConfigurationError, match="on_step_end"):
        MonitorDriver(object())
    assert isinstance(torch_comm(), LocalComm)  # no process group: one process


def _gloo_worker(rank: int, port: int) -> None:
    from tests.helpers.distributed import process_group

    with process_group(rank, 2, port):
        comm = torch_comm()
        assert comm.world_size == 2
        assert comm.broadcast_int(10 + rank) == 10
        assert comm.mean_floats([float(rank), 2.0 * rank]) == [0.5, 1.0]
        assert comm.any_true(rank == 1) is True
        assert comm.any_true(False) is False
        assert math.isfinite(comm.mean_floats([1.0])[0])


@pytest.mark.distributed
def test_torch_comm_over_two_gloo_processes():
    from tests.helpers.distributed import spawn

    spawn(_gloo_worker)
