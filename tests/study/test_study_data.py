"""The study's data, models and worst-case attack."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.study.config import StudyConfig
from sharpguard.study.data import load_dataset, load_digits, validate
from sharpguard.study.measure import worst_case_attack
from sharpguard.study.models import LogitEnsemble, make_mlp


def test_digits_are_scaled_17_gray_levels_with_a_fixed_stratified_split():
    d = load_digits()
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_train) + len(d.y_test) == 1797
    levels = torch.unique(torch.cat([d.x_train.flatten(), d.x_test.flatten()]) * 16)
    assert torch.equal(levels, torch.arange(17, dtype=torch.float32))
    assert d.n_classes == 10 and torch.bincount(d.y_test).min() >= 35  # every class in the test set
    again = load_digits()
    assert torch.equal(d.y_test, again.y_test) and torch.equal(d.x_train, again.x_train)


@pytest.mark.parametrize("spec, match",
                         [("mnist", "unknown dataset 'mnist'"), ("sharpguard:nothing", "has no function")])
def test_dataset_spec_errors(spec, match):
    with pytest.raises(ConfigurationError, match=match):
        load_dataset(spec)


def test_validate_rejects_bad_arrays():
    x, y = torch.rand(4, 3), torch.tensor([0, 1, 0, 1])
    assert validate("ok", x.numpy(), y.numpy(), x, y).n_classes == 2
    with pytest.raises(ConfigurationError, match="labels must be 1-D integer"):
        validate("d", x, y.float(), x, y)
    with pytest.raises(ConfigurationError, match="differ in length"):
        validate("d", x, y[:3], x, y)
    with pytest.raises(ConfigurationError, match="floating point"):
        validate("d", (x * 10).long(), y, x, y)


def test_config_rejects_unknown_methods_and_adds_sgd_for_the_ensemble():
    with pytest.raises(ConfigurationError, match="unknown method"):
        StudyConfig(methods=["sgd", "lion"])
    c = StudyConfig(methods=["ensemble", "sam"])
    assert c.methods == ["sgd", "sam"] and c.ensemble
    assert c.eval_pgd_alpha == pytest.approx(2.5 * 0.1 / 20)


def test_mlp_and_ensemble_average_the_logits():
    members = [make_mlp((1, 8, 8), 10, hidden=16) for _ in range(3)]
    x = torch.rand(5, 1, 8, 8)
    expected = sum(m(x) for m in members) / 3
    torch.testing.assert_close(LogitEnsemble(members)(x), expected)
    assert sum(isinstance(m, nn.Dropout) for m in make_mlp((4,), 2, dropout=0.3)) == 2


def test_worst_case_attack_counts_an_example_broken_by_any_attack():
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))  # class 0 iff x > 0
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.zeros(3, dtype=torch.long)
    flip_first = lambda m, x, y: torch.where(torch.arange(3)[:, None] == 0, -x, x)  # noqa: E731
    flip_second = lambda m, x, y: torch.where(torch.arange(3)[:, None] == 1, -x, x)  # noqa: E731
    adv = worst_case_attack(flip_first, flip_second)(model, x, y)
    assert adv.flatten().tolist() == [-1.0, -2.0, 3.0]


@pytest.mark.parametrize(
    "x_train, match",
    [(torch.rand(4), "at least 2 dimensions"), (torch.tensor(0.5), "at least 2 dimensions")],
)
def test_validate_rejects_inputs_without_a_feature_dimension(x_train, match):
    # A 1-D or scalar input has no (batch, features...) layout: it must fail here, not as an IndexError
    # or inside the model's Flatten once training has started.
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ConfigurationError, match=match):
        validate("d", x_train, y, torch.rand(4, 3), y)


def test_validate_rejects_boolean_labels():
    x = torch.rand(4, 3)
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ConfigurationError, match="labels must be 1-D integer"):
        validate("d", x, y.bool(), x, y)


def test_config_rejects_a_method_listed_twice():
    # Listing a method twice would train and report every seed twice, doubling n in its confidence
    # interval and Welch test with copies of the same runs.
    with pytest.raises(ConfigurationError, match="listed more than once"):
        StudyConfig(methods=["sgd", "sam", "sgd"])


def test_robust_acc_is_never_above_any_attack_it_combines():
    """robust_acc is the per-example worst case of FGSM, PGD and margin PGD with the same random starts,
    so it can be no higher than any of their accuracies (a law, checked on a trained-ish model)."""
    import torch
    from torch import nn

    from sharpguard.study.config import StudyConfig
    from sharpguard.study.measure import measure_model

    torch.manual_seed(0)
    x = torch.rand(96, 1, 8, 8)
    y = (x.flatten(1)[:, :32].sum(1) > x.flatten(1)[:, 32:].sum(1)).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    test = [(x[:48], y[:48]), (x[48:], y[48:])]
    config = StudyConfig(methods=("sgd",), seeds=1, epochs=1, quick=True)
    m = measure_model(model.eval(), test, test[:1], config, seed=0)
    assert m["robust_acc"] <= min(m["pgd_acc"], m["fgsm_acc"], m["pgd_margin_acc"]) + 1e-12
    assert m["pgd_acc"] < m["clean_acc"]  # the attacks bite: the law is not vacuous
