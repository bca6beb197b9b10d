"""Callback state integrity (issue 12): a corrupted checkpoint entry of a SAM callback is refused with
one sharpguard error and changes nothing; a valid one loads. Every field times every bad value."""

from __future__ import annotations

import copy

import pytest
import torch
from pytorch_lightning.demos import boring_classes

from sharpguard.errors import ConfigurationError
from sharpguard.integrations._lightning_namespace import pl
from sharpguard.integrations.lightning import SharpnessAwareMinimization


def fitted(variant: str = "looksam") -> SharpnessAwareMinimization:
    torch.manual_seed(0)
    cb = SharpnessAwareMinimization(variant=variant,
                                    k=2) if variant == "looksam" else SharpnessAwareMinimization(variant=variant)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(boring_classes.BoringModel())
    return cb


CB = None


def callback() -> SharpnessAwareMinimization:
    global CB
    if CB is None:
        CB = fitted()
    return CB


def snapshot(cb: SharpnessAwareMinimization):
    return copy.deepcopy(cb.state_dict()), cb.n_steps


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


FIELDS = [("n_steps",), ("variant",), ("sam",), ("sam", "step"), ("sam", "variant"), ("sam", "knobs"),
          ("sam", "knobs", "k"), ("sam", "knobs", "rho"), ("sam", "buffers"), ("sam", "buffers", "gv"), ("unknown",)]
BAD = [None, "abc", -5, 2.5, True, float("nan"), [1, 2], {"x": 1}, torch.zeros(3), "gsam"]


# every (field, bad value) pair: a small space, enumerated whole rather than sampled
@pytest.mark.parametrize("path", FIELDS, ids=[".".join(p) for p in FIELDS])
@pytest.mark.parametrize("bad", BAD, ids=[repr(b)[:12] for b in BAD])
def test_a_corrupted_callback_state_is_refused_and_changes_nothing(path, bad):
    cb = callback()
    good = cb.state_dict()
    state = copy.deepcopy(good)
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    if same(state, good):
        return  # the "corruption" happened to be the value already there
    before = snapshot(cb)
    with pytest.raises(ConfigurationError):
        cb.load_state_dict(state)
    after = snapshot(cb)
    assert same(before[0], after[0]) and before[1] == after[1], path


def test_the_callbacks_own_state_round_trips():
    cb = callback()
    state = copy.deepcopy(cb.state_dict())
    cb.load_state_dict(state)
    assert same(cb.state_dict(), state)
