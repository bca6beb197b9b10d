"""Monitor state integrity (issue 12): load_state_dict checks everything first and changes nothing
unless all of it is valid; bad settings are refused at construction with the fix."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.monitor import ProbeSet, RobustnessMonitor, SharpnessMonitor
from sharpguard.monitor.driver import MonitorDriver
from sharpguard.monitor.history import decode_state, encode_state


def _trained_monitor() -> SharpnessMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    mon = SharpnessMonitor(measures=("lambda_max", "eos_ratio"), every_n_steps=2, probe_size=8,
                           measure_kwargs={"lambda_max": {"max_iter": 8}, "eos_ratio": {"max_iter": 8}})
    for step in range(1, 5):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.on_step_end(step, model, optimizer=opt, loss=loss.detach(), batch=(x, y))
    return mon


_BASE = _trained_monitor()
_STATE = _BASE.state_dict()


def _snapshot(mon: SharpnessMonitor) -> str:
    return json.dumps(encode_state(mon.state_dict()), sort_keys=True)


def _leaves(value, path=()):
    """Every path into the state (containers and leaves)."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))


_PATHS = [p for p in _leaves(_STATE) if p and p[0] != "history" or len(p) <= 4]
_BAD = st.sampled_from([None, "abc", math.nan, math.inf, -5, -0.5, 2.5, True, [], {}, [1, 2], torch.zeros(0)])


def _set(state, path, value):
    node = state
    for key in path[:-1]:
        node = node[key]
    if isinstance(node, tuple):
        raise KeyError
    node[path[-1]] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_PATHS), _BAD)
def test_corrupted_state_is_refused_whole_or_loaded_whole(path, bad):
    mon = copy.deepcopy(_BASE)
    before = _snapshot(mon)
    state = copy.deepcopy(_STATE)
    try:
        _set(state, path, bad)
    except (KeyError, TypeError, IndexError):
        return  # a tuple inside the state: nothing to corrupt there
    try:
        mon.load_state_dict(state)
    except ConfigurationError as exc:
        assert "nothing was loaded" in str(exc).lower() or "to resume" in str(exc)
        assert _snapshot(mon) == before  # bitwise unchanged
    else:
        # accepted: the value was a valid one for that field (e.g. None for an optional float),
        # and the monitor now holds exactly what was given
        reloaded = copy.deepcopy(_BASE)
        reloaded.load_state_dict(mon.state_dict())
        assert _snapshot(reloaded) == _snapshot(mon)


@pytest.mark.parametrize(
    "path,value",
    [
        (("schedule", "next_step"), "abc"),
        (("schedule", "next_step"), -5),
        (("schedule", "train_seconds"), math.nan),
        (("loss_avg"), math.inf),
        (("seed",), 2.5),
        (("should_stop",), "yes"),
        (("alerts", 0, "hits"), -1),
        (("history", "records", 0, "step"), "abc"),
        (("probe", "held"), 999),
        (("probe", "source"), "elsewhere"),
        (("extra", "n_hvp_total"), -3),
        (("measures",), ["trace"]),
    ],
)
def test_each_known_corruption_raises_before_anything_changes(path, value):
    path = path if isinstance(path, tuple) else (path,)
    mon = copy.deepcopy(_BASE)
    before = _snapshot(mon)
    state = copy.deepcopy(_STATE)
    _set(state, path, value)
    with pytest.raises(ConfigurationError):
        mon.load_state_dict(state)
    assert _snapshot(mon) == before


def test_state_roundtrips_through_the_json_codec_and_the_driver():
    driver = MonitorDriver(copy.deepcopy(_BASE))
    saved = json.loads(json.dumps(encode_state(driver.state_dict())))
    other = MonitorDriver(SharpnessMonitor(measures=("lambda_max", "eos_ratio"), every_n_steps=2, probe_size=8))
    other.load_state_dict(decode_state(saved))
    assert _snapshot(other.monitor) == _snapshot(driver.monitor)
    with pytest.raises(ConfigurationError, match="last_step"):
        other.load_state_dict({**decode_state(saved), "last_step": "x"})


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: SharpnessMonitor(every_n_steps=2.5), "every_n_steps"),
        (lambda: SharpnessMonitor(rho=math.nan), "rho"),
        (lambda: RobustnessMonitor(eps=math.nan), "eps"),
        (lambda: RobustnessMonitor(eps=0.1, steps=0), "steps"),
        (lambda: RobustnessMonitor(norm="l3"), "norm"),
        (lambda: SharpnessMonitor(probe_size=0), "probe_size"),
        (lambda: SharpnessMonitor(budget=math.nan), "budget"),
        (lambda: SharpnessMonitor(evry_n_steps=10), "did you mean 'every_n_steps'"),
        (lambda: RobustnessMonitor(input_kye="image"), "did you mean 'input_key'"),
        (lambda: SharpnessMonitor(probe=[(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))]), "no examples"),
        (lambda: SharpnessMonitor(loss_fn="ce"), "loss_fn"),
    ],
)
def test_bad_settings_are_refused_at_construction(build, match):
    with pytest.raises(ConfigurationError, match=match):
        build()


def test_robustness_keys_are_checked_on_the_first_captured_batch():
    mon = RobustnessMonitor(probe_size=8, every_n_steps=1)
    with pytest.raises(ConfigurationError, match="input_key"):
        mon.capture({"img": torch.rand(4, 3), "label": torch.zeros(4, dtype=torch.long)})
    mon = RobustnessMonitor(probe_size=8, every_n_steps=1, input_key="img")
    mon.capture({"img": torch.rand(4, 3), "label": torch.zeros(4, dtype=torch.long)})
    x, y = mon.pair(mon.probe.batches[0])
    assert x.shape == (4, 3) and y.shape == (4,)


def test_a_probe_that_cannot_fill_measures_with_what_it_holds_and_says_so():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    mon = SharpnessMonitor(measures=("lambda_max",), probe_size=64, every_n_steps=1, alerts=None)
    mon.capture((torch.randn(5, 3), torch.randint(0, 2, (5,))))
    with pytest.warns(UserWarning, match="holds 5 of the 64"):
        assert mon.freeze_partial_probe("the validation set")
    assert mon.probe.ready and len(mon.probe) == 5
    notes = [r for r in mon.history.records if r["metric"] == "monitor/note"]
    assert len(notes) == 1 and "5 of the 64" in notes[0]["settings"]["reason"]
    assert math.isfinite(mon.check(1, model)["sharpness/lambda_max"])
    assert isinstance(ProbeSet, type)


def test_a_due_check_without_any_probe_says_why_once():
    model = nn.Linear(3, 2)
    mon = SharpnessMonitor(measures=("lambda_max",), every_n_steps=1, alerts=None)
    with pytest.warns(UserWarning, match="probe set is empty") as record:
        for step in range(1, 4):
            assert mon.on_step_end(step, model) == {}
    assert sum("probe set is empty" in str(w.message) for w in record) == 1
    notes = [r for r in mon.history.records if r["metric"] == "monitor/note"]
    assert len(notes) == 1 and notes[0]["step"] == 1


# ---------------------------------------------------------------------------------------------- namedtuple probes
NamedBatch = __import__("collections").namedtuple("NamedBatch", ["x", "y"])


def _named_probe() -> list:
    g = torch.Generator().manual_seed(5)
    return [NamedBatch(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))]


def _named_loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch.x), batch.y)  # attribute access, as a user's loss_fn does


def test_a_namedtuple_probe_resumes_from_a_weights_only_checkpoint():
    """A probe of namedtuple batches is stored as plain data: the checkpoint loads with ``weights_only=True``
    (the class is no allowed global; it had refused the whole checkpoint) and the resumed monitor measures
    the same value, its batches again namedtuples: the given probe's own class where it is given again, one
    of the same name and fields otherwise."""
    import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    monitor = SharpnessMonitor(("lambda_max",), probe=_named_probe(), loss_fn=_named_loss, alerts=None)
    before = monitor.measure(model)["sharpness/lambda_max"]
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    for probe in (None, _named_probe()):
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        resumed = SharpnessMonitor(("lambda_max",), probe=probe, loss_fn=_named_loss, alerts=None)
        resumed.load_state_dict(state)
        (batch,) = resumed.probe.batches
        assert batch._fields == ("x", "y") and type(batch).__name__ == "NamedBatch"
        assert (type(batch) is NamedBatch) == (probe is not None)
        assert resumed.measure(model)["sharpness/lambda_max"] == before
