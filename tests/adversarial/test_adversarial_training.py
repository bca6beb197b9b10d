"""End to end: adversarial training on digits, defensive distillation's masking, embedding AT on a
one-layer BERT, spectral normalization, the catastrophic-overfitting detector."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.adversarial import (
    CatastrophicOverfitting,
    CatastrophicOverfittingDetector,
    DefensiveDistillation,
    FastAT,
    make_method,
    spectral_normalize,
)
from sharpguard.attacks import ThreatModel, pgd, robust_accuracy
from sharpguard.errors import ConfigurationError

EPS = 0.2  # digits scaled to [0, 1]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[perm[:1400]], y[perm[:1400]]), (x[perm[1400:]], y[perm[1400:]])


def train_mlp(train, method=None, epochs=6, lr=3e-3, seed=0):
    x, y = train
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            batch = (x[idx], y[idx])
            loss = F.cross_entropy(model(batch[0]), batch[1]) if method is None else method(model, batch)
            loss.backward()
            opt.step()
    return model


def pgd_accuracy(model, data, loss="ce"):
    return robust_accuracy(model, data, lambda m, a, b: pgd(m, a, b, eps=EPS, alpha=EPS / 4, steps=10, loss=loss))


@pytest.fixture(scope="module")
def plain(digits):
    return train_mlp(digits[0])


@pytest.mark.parametrize("name", ["pgd-at", "trades", "fast-at"])
def test_adversarial_training_raises_pgd_accuracy_well_above_plain_training(digits, plain, name):
    settings = {"eps": EPS} if name == "fast-at" else {"eps": EPS, "alpha": EPS / 4, "steps": 5}
    robust = train_mlp(digits[0], make_method(name, **settings))
    test = digits[1]
    assert robust_accuracy(robust, test) > 0.75
    assert pgd_accuracy(plain, test) < 0.1
    assert pgd_accuracy(robust, test) > pgd_accuracy(plain, test) + 0.2


def test_defensive_distillation_masks_ce_gradients_but_a_margin_attack_breaks_it(digits):
    """Papernot et al.'s defense at T=50 vs Carlini & Wagner: CE-PGD sees zero gradients, the margin loss does not."""
    t = 50.0
    teacher = train_mlp(digits[0], DefensiveDistillation(t), epochs=10, lr=2e-2)
    student = train_mlp(digits[0], DefensiveDistillation(t, teacher), epochs=10, lr=2e-2)
    test = digits[1]
    clean = robust_accuracy(student, test)
    assert clean > 0.85
    assert pgd_accuracy(student, test, "ce") > 0.5  # masked: looks robust
    assert pgd_accuracy(student, test, "margin") < 0.1  # it is not


def test_embedding_adversarial_training_on_a_one_layer_bert_trains_and_changes_the_result():
    import transformers
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (64, 10), generator=g)
    labels = ((ids < 55).sum(1) * 2 > 10).long()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def run(method):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            loss = model(**batch).loss if method is None else method(model, batch)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(**batch)
        return model, float(out.loss), float((out.logits.argmax(-1) == labels).float().mean())

    with torch.no_grad():
        torch.manual_seed(0)
        initial = float(transformers.BertForSequenceClassification(cfg).eval()(**batch).loss)
    plain_model, _, _ = run(None)
    for name in ("freelb", "smart"):
        model, loss, acc = run(make_method(name))
        assert loss < initial - 0.2 and acc > 0.75
        diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), plain_model.parameters()))
        assert diff > 1e-4


def test_spectral_normalize_bounds_every_linear_and_conv_layer():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
                          nn.Linear(8, 2))
    with torch.no_grad():
        for m in model:
            if hasattr(m, "weight"):
                m.weight.mul_(5.0)
    spectral_normalize(model, n_power_iterations=30, exclude=("5",))
    layers = [model[0], model[3], model[5]]
    assert [parametrize.is_parametrized(m, "weight") for m in layers] == [True, True, False]
    model.train()
    model(torch.rand(2, 3, 6, 6))
    for m in layers[:2]:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1.0) < 1e-3
    assert torch.linalg.matrix_norm(model[5].weight.detach(), ord=2) > 1.5
    spectral_normalize(model)  # idempotent on the layers already done; picks up the excluded one
    assert parametrize.is_parametrized(model[5], "weight")
    with pytest.raises(ConfigurationError, match="no Linear or Conv"):
        spectral_normalize(nn.Sequential(nn.ReLU()))


def test_catastrophic_overfitting_detector_flags_a_pgd_accuracy_collapse(digits, plain):
    robust = train_mlp(digits[0], make_method("pgd-at", eps=EPS, alpha=EPS / 4, steps=5))
    probe = (digits[1][0][:128], digits[1][1][:128])
    threat = ThreatModel("linf", EPS)
    detector = CatastrophicOverfittingDetector(probe, every=2, grad_align=True)
    rng = torch.get_rng_state()
    assert detector.observe(robust, probe, threat)["detected"] is False
    assert detector.observe(robust, probe, threat) is None  # not due
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting"):
        record = detector.observe(plain, probe, threat)  # the same net after CO: PGD accuracy collapses
    assert record["detected"] and detector.detected
    assert all(-1.0 <= r["grad_cosine"] <= 1.0 for r in detector.history)
    assert torch.equal(torch.get_rng_state(), rng)
    state = detector.state_dict()
    fresh = CatastrophicOverfittingDetector(probe)
    fresh.load_state_dict(state)
    assert fresh.best == detector.best and fresh.detected

    raising = CatastrophicOverfittingDetector(probe, every=1, on_detect="raise")
    method = FastAT(EPS, detector=raising)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method(robust, probe)
    with pytest.raises(CatastrophicOverfitting):
        method(plain, probe)
