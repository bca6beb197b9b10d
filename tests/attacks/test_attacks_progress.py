"""Long attacks show progress when someone is watching (stderr a terminal, or progress=True) and stay silent
otherwise; the attacks report each target class through a hook that needs no monitor."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from sharpguard.attacks import AutoAttack, apgd_targeted, fab_targeted, square
from sharpguard.attacks import _progress


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(12, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(-1)  # every point starts correctly classified
    return model, x, y


def _cascade(progress):
    return AutoAttack(eps=0.01, version="standard", steps=3, n_queries=600, progress=progress, checks="off",
                      generator=torch.Generator().manual_seed(0))


def test_progress_true_shows_every_stage_and_each_target(model_and_batch, capsys):
    model, x, y = model_and_batch
    attack = _cascade(True)
    attack(model, x, y)
    err = capsys.readouterr().err
    ran = [name for name in ("apgd-ce", "apgd-t", "fab-t", "square") if name in attack.last_report.seconds]
    assert ran and all(f"{name} on " in err for name in ran)
    assert "AutoAttack standard" in err
    if "fab-t" in ran:
        assert "target 1 of 9" in err  # within a stage, each target class moves the display
    assert "robust accuracy" in err


def test_silent_when_stderr_is_not_a_terminal(model_and_batch, capsys):
    model, x, y = model_and_batch
    assert not _progress.interactive()  # pytest's captured stderr is not a terminal
    _cascade(None)(model, x, y)
    _cascade(False)(model, x, y)
    assert capsys.readouterr().err == ""


def test_shown_by_default_when_stderr_is_a_terminal(model_and_batch, capsys, monkeypatch):
    model, x, y = model_and_batch
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert _progress.interactive()
    _cascade(None)(model, x, y)
    assert "apgd-ce on 12 points" in capsys.readouterr().err


def test_one_line_per_stage_without_tqdm(model_and_batch, capsys, monkeypatch):
    model, x, y = model_and_batch
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: as if tqdm were not installed
    attack = _cascade(True)
    attack(model, x, y)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(attack.last_report.seconds)
    assert lines[0].startswith("AutoAttack standard: apgd-ce on 12 points: robust accuracy")


def test_attacks_tick_once_per_target_and_are_silent_without_a_hook(model_and_batch, capsys):
    model, x, y = model_and_batch
    events: list[str] = []
    with _progress.reporting(events.append):
        fab_targeted(model, x, y, eps=1e-4, steps=2, n_target_classes=3)
    assert events == ["target 1 of 3", "target 2 of 3", "target 3 of 3"]  # eps tiny: no point breaks early
    events.clear()
    with _progress.reporting(events.append):
        apgd_targeted(model, x, y, eps=1e-4, steps=2, n_target_classes=2)
        square(model, x, y, eps=1e-4, n_queries=1001)
    assert events[:2] == ["target 1 of 2", "target 2 of 2"] and events[2:] == ["500 of 1001 queries",
                                                                                "1000 of 1001 queries"]
    fab_targeted(model, x, y, eps=1e-4, steps=2, n_target_classes=2)  # no hook installed: nothing happens
    assert capsys.readouterr().err == ""
