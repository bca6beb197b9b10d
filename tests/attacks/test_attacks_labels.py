"""Labels out of range (issue 12, item 7) and the input-range check of input_grad_norm (item 8): one
sharpguard ConfigurationError, raised before anything changes, from every attack, metric and image
training method that takes labels."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.adversarial import DefensiveDistillation, make_method
from sharpguard.attacks import (
    AutoAttack,
    apgd,
    apgd_targeted,
    auto_attack,
    clean_accuracy,
    fgsm,
    input_grad_norm,
    make_generator,
    pgd,
    robust_accuracy,
    square,
)
from sharpguard.errors import ConfigurationError

MESSAGE = r"labels must be class indices in \[0, 10\)"


def model_with_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10)
    ).train()


def data(bad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    y[2] = bad
    return x, y


def snapshot(model: nn.Module):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
        torch.get_rng_state(),
    )


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for a, b in zip(before[1], after[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(before[2], after[2]):
        assert torch.equal(a, b)
    assert before[3] == after[3]
    assert torch.equal(before[4], after[4])


ATTACKS = {
    "pgd": lambda m, x, y: pgd(m, x, y, steps=2),
    "pgd-kl": lambda m, x, y: pgd(m, x, y, steps=2, loss="kl"),  # label-free loss, labels still given: checked
    "fgsm": lambda m, x, y: fgsm(m, x, y),
    "apgd": lambda m, x, y: apgd(m, x, y, steps=2),
    "apgd-t": lambda m, x, y: apgd_targeted(m, x, y, steps=2, n_target_classes=2),
    "square": lambda m, x, y: square(m, x, y, n_queries=3),
    "auto_attack": lambda m, x, y: auto_attack(m, x, y, steps=2, n_queries=3, checks="off"),
    "AutoAttack(fast)": lambda m, x, y: AutoAttack(version="fast", steps=2, checks="off")(m, x, y),
    "clean_accuracy": lambda m, x, y: clean_accuracy(m, (x, y)),
    # an attack that ignores y
    "robust_accuracy": lambda m, x, y: robust_accuracy(m, (x, y), lambda mm, a, b: a.clone()),
    "input_grad_norm": lambda m, x, y: input_grad_norm(m, (x, y)),
}


@pytest.mark.parametrize("bad", [10, 37, -1])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_and_metrics_refuse_out_of_range_labels(name, bad):
    model = model_with_bn()
    x, y = data(bad)
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match=r"labels must be class indices in \[0, 10\)"):
        ATTACKS[name](model, x, y)
    assert_unchanged(model, before)
    ATTACKS[name](model, x, y.clamp(0, 9))  # the same call with valid labels runs


METHODS = [("pgd-at", {"steps": 2}), ("trades", {"steps": 2}), ("mart", {"steps": 2}), ("fast-at", {}),
           ("awp", {"steps": 2}), ("awp", {"base": "trades", "steps": 2}), ("defensive-distillation", {})]


@pytest.mark.parametrize("name, kw", METHODS)
def test_image_methods_refuse_out_of_range_labels_before_any_state_changes(name, kw):
    model = model_with_bn()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x, y = data(10)
    method = make_method(name, **kw)
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match=MESSAGE):
        method(model, (x, y))
    assert_unchanged(model, before)  # TRADES used to update BatchNorm statistics before torch raised
    method(model, (x, y.clamp(0, 9))).backward()  # valid labels train
    # after the first call the number of classes is known: a later bad batch is refused before its forward
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match=MESSAGE):
        method(model, (x, y))
    assert_unchanged(model, before)


def test_defensive_distillation_with_a_teacher_checks_against_the_teacher_output():
    model = model_with_bn()
    teacher = copy.deepcopy(model).eval()
    x, y = data(12)
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match=MESSAGE):
        DefensiveDistillation(teacher=teacher)(model, (x, y))
    assert_unchanged(model, before)


def test_input_grad_norm_checks_the_input_range_as_the_attacks_do():
    model = model_with_bn().eval()
    x, y = data(0)
    with pytest.raises(ConfigurationError, match="outside the declared bounds"):
        input_grad_norm(model, (x * 4 - 2, y))
    with pytest.raises(ConfigurationError, match="outside the declared bounds"):
        pgd(model, x * 4 - 2, y)  # the same sentence as the attacks
    # unbounded inputs are declared, as for the attacks; the value equals the bounded call on in-range data
    assert input_grad_norm(model, (x * 4 - 2, y), bounds=None) > 0
    assert input_grad_norm(model, (x, y), bounds=None) == input_grad_norm(model, (x, y))
    # normalized outside the model: checked in pixel space, like the attacks
    mean, std = (0.5,), (0.25,)
    normalized = (x - 0.5) / 0.25
    input_grad_norm(model, (normalized, y), mean=mean, std=std)
    with pytest.raises(ConfigurationError, match="check mean/std"):
        input_grad_norm(model, (normalized + 3, y), mean=mean, std=std)


def test_valid_labels_still_give_the_same_numbers():
    model = model_with_bn().eval()
    x, y = data(3)
    with torch.no_grad():
        expected = int((model(x).argmax(1) == y).sum()) / len(y)
    assert clean_accuracy(model, (x, y)) == expected
    adv = pgd(model, x, y, steps=3, generator=make_generator("cpu", 0))
    with torch.no_grad():
        assert robust_accuracy(model, (adv, y)) == int((model(adv).argmax(1) == y).sum()) / len(y)


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(-4, 14), min_size=1, max_size=6), classes=st.integers(2, 10))
def test_a_label_is_accepted_exactly_when_it_is_a_class_index(labels, classes):
    """The law: every measurement accepts labels in [0, C) and refuses any other, whatever the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, classes)).eval()
    x, y = torch.rand(len(labels), 1, 2, 2), torch.tensor(labels)
    valid = all(0 <= v < classes for v in labels)
    for measure in (lambda: clean_accuracy(model, (x, y)), lambda: pgd(model, x, y, steps=1),
                    lambda: input_grad_norm(model, (x, y))):
        if valid:
            measure()
        else:
            with pytest.raises(ConfigurationError, match=rf"class indices in \[0, {classes}\)"):
                measure()
