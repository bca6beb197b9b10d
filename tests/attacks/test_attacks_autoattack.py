"""APGD-T, Square and the AutoAttack cascade: parity with torchattacks and the reference AutoAttack, laws, checks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.attacks import (
    AutoAttack,
    GradientMaskingError,
    GradientMaskingWarning,
    ThreatModel,
    apgd_targeted,
    auto_attack,
    make_generator,
    pgd,
    robust_accuracy,
    square,
)
from sharpguard.attacks.losses import dlr_targeted
from sharpguard.attacks.square import _eta, p_schedule
from sharpguard.errors import ConfigurationError

import pyautoattack.autopgd_base
import torchattacks


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    """An MLP on scikit-learn's digits as (N, 1, 8, 8) images in [0, 1]; 512 examples to attack. ~1 s."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = train(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), x, y, 15)
    return model, x[:512], y[:512]


@pytest.fixture(scope="module")
def digits16():
    """A small CNN on digits upsampled to 16x16 (Square's windows need room to move). ~1 s."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = F.interpolate(torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0, size=16,
                      mode="bilinear")
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    return train(model, x, y, 8), x[:384], y[:384]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(6 * 8 * 8, 10),
    )


def batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientMaskingWarning)
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------- exact pieces
def test_targeted_dlr_equals_both_references_and_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    t = (y + torch.randint(1, 10, (64,), generator=g)) % 10
    ours = dlr_targeted(z, y, t)
    ta = torchattacks.APGDT(nn.Identity()).dlr_loss_targeted(z, y, t)
    ref = pyautoattack.autopgd_base.APGDAttack_targeted(nn.Identity(), eps=0.1, device="cpu")
    ref.y_target = t
    assert torch.allclose(ours, ta, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours, ref.dlr_loss_targeted(z, y), rtol=1e-6, atol=1e-7)
    zd = z.double()
    s = sorted(zd[0].tolist(), reverse=True)
    hand = -(zd[0, y[0]] - zd[0, t[0]]) / (s[0] - 0.5 * (s[2] + s[3]) + 1e-12)
    assert abs(float(ours[0]) - float(hand)) < 1e-5
    # scale and shift invariance (the reason AutoAttack uses it)
    assert torch.allclose(dlr_targeted(5 * z + 2, y, t), ours, rtol=1e-4, atol=1e-5)


def test_p_schedule_equals_torchattacks_and_eta_equals_autoattacks():
    attack = torchattacks.Square(nn.Identity(), n_queries=5000, p_init=0.8)
    for rescale in (True, False):
        attack.rescale_schedule = rescale
        for it in list(range(0, 60)) + list(range(60, 10000, 37)):
            assert p_schedule(it, 0.8, 5000, rescale) == attack.p_selection(it)
    torch.manual_seed(0)
    for s in (3, 5, 6, 7, 11):
        theirs = attack.eta(s).double()  # may come transposed (a coin flip on the global RNG)
        assert min((theirs - _eta(s)).abs().max(), (theirs - _eta(s).T).abs().max()) < 1e-6


def test_cascade_bookkeeping_equals_torchattacks_multiattack_with_deterministic_stages(digits):
    """PGD without random start is bitwise torchattacks' PGD, so the two cascades must agree bitwise."""
    model, x, y = digits
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct][:256], y[correct][:256]  # MultiAttack also attacks clean errors; AutoAttack leaves them
    settings_ = [(0.02, 3), (0.04, 3), (0.06, 5)]
    stages = [(f"pgd{i}", lambda m, a, b, e=e, k=k: pgd(m, a, b, eps=e, alpha=e / 4, steps=k, random_start=False))
              for i, (e, k) in enumerate(settings_)]
    ours = AutoAttack(version="custom", attacks=stages, checks="off")
    theirs = torchattacks.MultiAttack(
        [torchattacks.PGD(model, eps=e, alpha=e / 4, steps=k, random_start=False) for e, k in settings_]
    )
    adv = ours(model, x, y)
    assert torch.equal(adv, theirs(x, y))
    accs = list(ours.last_report.accuracies.values())
    assert accs == sorted(accs, reverse=True) and accs[0] == 1.0 and accs[-1] < accs[1] < 1.0
    assert accs[-1] == accuracy(model, adv, y)


# ----------------------------------------------------------------------------- cascade laws
def test_each_stage_sees_only_still_robust_points_and_the_first_success_is_kept(digits):
    model, x, y = digits
    x, y = x[:200], y[:200]
    seen, outputs = [], []

    def spy(e):
        def attack(m, a, b):
            out = pgd(m, a, b, eps=e, alpha=e / 4, steps=5, generator=make_generator("cpu", 3))
            seen.append(a.clone())
            outputs.append(out)
            return out
        return attack

    aa = AutoAttack(version="custom", attacks=[("weak", spy(0.03)), ("mid", spy(0.05)), ("strong", spy(0.2))],
                    checks="off")
    adv = aa(model, x, y)
    rows = {tuple(r.flatten().tolist()): i for i, r in enumerate(x)}
    robust = (model(x).argmax(1) == y).clone()
    expected = x.clone()
    for a, out in zip(seen, outputs):
        idx = torch.tensor([rows[tuple(r.flatten().tolist())] for r in a])
        assert torch.equal(idx, robust.nonzero().squeeze(1))  # exactly the points every earlier stage failed on
        broken = model(out).argmax(1) != y[idx]
        expected[idx[broken]] = out[broken]
        robust[idx[broken]] = False
    assert torch.equal(adv, expected)  # the first success kept, never overwritten
    assert accuracy(model, adv, y) == float(robust.float().mean()) == aa.last_report.robust_accuracy
    assert aa.last_report.robust_accuracy < aa.last_report.accuracies["mid"]


@pytest.mark.parametrize("eps", [0.03, 0.06, 0.1])
def test_auto_attack_is_at_least_as_strong_as_pgd(digits, eps):
    model, x, y = digits
    aa_acc = robust_accuracy(model, (x, y),
                             AutoAttack(eps=eps, n_queries=300, generator=make_generator("cpu", 0), checks="off"))
    pgd_acc = robust_accuracy(model, (x, y), lambda m, a, b: pgd(m, a, b, eps=eps, alpha=eps / 4, steps=20,
                                                                 generator=make_generator("cpu", 0)))
    assert aa_acc <= pgd_acc
    fast = robust_accuracy(model, (x, y),
                           AutoAttack(eps=eps, version="fast", generator=make_generator("cpu", 0), checks="off"))
    assert aa_acc <= fast <= pgd_acc + 0.004


# ----------------------------------------------------------------------------- parity with the references
def test_apgd_targeted_matches_torchattacks_and_reference_autoattack(digits):
    model, x, y = digits
    eps, steps = 0.06, 20
    ours = accuracy(model, apgd_targeted(model, x, y, eps=eps, steps=steps, generator=make_generator("cpu", 0)), y)
    with torch.random.fork_rng():  # both references reseed the global RNG
        ta = accuracy(model, torchattacks.APGDT(model, eps=eps, steps=steps, n_classes=10)(x, y), y)
        ref_attack = pyautoattack.autopgd_base.APGDAttack_targeted(
            model, n_iter=steps, eps=eps, norm="Linf", n_target_classes=9, device="cpu", seed=0)
        ref = accuracy(model, ref_attack.perturb(x, y), y)
    clean = accuracy(model, x, y)
    assert ours < clean - 0.1
    assert abs(ours - ta) <= 0.01 and abs(ours - ref) <= 0.01


@pytest.mark.parametrize("norm, eps", [("linf", 0.06), ("l2", 0.5)])
def test_square_robust_accuracy_within_two_points_of_torchattacks(digits16, norm, eps):
    model, x, y = digits16
    ours, theirs = [], []
    for seed in range(2):
        ours.append(accuracy(model, square(model, x, y, eps=eps, norm=norm, n_queries=200,
                                           generator=make_generator("cpu", seed)), y))
        with torch.random.fork_rng():
            attack = torchattacks.Square(model, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=200,
                                         seed=seed)
            theirs.append(accuracy(model, attack(x, y), y))
    clean = accuracy(model, x, y)
    assert sum(ours) / 2 < clean - 0.05  # it does attack
    assert abs(sum(ours) / 2 - sum(theirs) / 2) <= 0.02


def test_standard_auto_attack_not_weaker_than_torchattacks_autoattack(digits):
    model, x, y = digits
    x, y = x[:128], y[:128]
    eps = 0.06
    ours = accuracy(model, quiet(auto_attack, model, x, y, eps=eps, n_queries=200, generator=make_generator("cpu", 0)),
                    y)
    with torch.random.fork_rng():
        # torchattacks' port: APGD/APGD-T with 10 steps, FAB-T, Square; ours: 100 steps, no FAB-T.
        theirs = accuracy(model, torchattacks.AutoAttack(model, eps=eps, n_classes=10, seed=0)(x, y), y)
    assert ours <= theirs + 0.01


# ----------------------------------------------------------------------------- geometry and side effects
@settings(max_examples=12, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 0.6), normalized=st.booleans(),
       seed=st.integers(0, 999))
def test_outputs_stay_in_ball_and_bounds(norm, eps, normalized, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5))
    x = torch.rand(5, 3, 6, 6)
    y = torch.randint(0, 5, (5,))
    mean, std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)) if normalized else (None, None)
    tm = ThreatModel(norm, eps, (0.0, 1.0), mean, std)
    gen = make_generator("cpu", seed)
    outs = [
        square(model, tm.from_pixel(x), y, n_queries=15, threat=tm, generator=gen),
        apgd_targeted(model, tm.from_pixel(x), y, steps=3, n_target_classes=2, threat=tm, generator=gen),
        auto_attack(model, tm.from_pixel(x), y, threat=tm, steps=2, n_queries=10, generator=gen, checks="off"),
    ]
    for adv in outs:
        u = tm.to_pixel(adv, check=False)
        assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6
        delta = (u - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (size <= eps * (1 + 1e-5) + 1e-5).all()


def test_modes_grads_buffers_and_rng_untouched():
    model = small_cnn().train()
    model[1].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    grads = [p.grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    params = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    x, y = batch()
    apgd_targeted(model, x, y, steps=3, n_target_classes=2)
    square(model, x, y, n_queries=10)
    quiet(auto_attack, model, x, y, steps=2, n_queries=10)
    quiet(auto_attack, model, x, y, version="fast", model_mode="keep", steps=2)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is g and torch.all(g == 3.0) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert torch.equal(torch.get_rng_state(), rng)


def test_works_under_inference_mode_and_is_reproducible_with_a_generator():
    model = small_cnn()
    x, y = batch()
    ref = auto_attack(model, x, y, steps=3, n_queries=20, generator=make_generator("cpu", 4), checks="off")
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        again = auto_attack(model, xi, yi, steps=3, n_queries=20, generator=make_generator("cpu", 4), checks="off")
        acc = robust_accuracy(model, (xi, yi), AutoAttack(version="fast", steps=2, checks="off"))
    assert torch.equal(ref, again) and 0.0 <= acc <= 1.0


# ----------------------------------------------------------------------------- gradient-masking checks
class Quantize(nn.Module):
    """Rounds the input to 4 levels: zero gradient almost everywhere (a masking 'defense')."""

    def forward(self, x):
        return torch.round(x * 3) / 3


def test_softmax_output_is_flagged_and_raises_on_request(digits):
    model, x, y = digits
    probs = nn.Sequential(model, nn.Softmax(dim=-1))
    with pytest.warns(GradientMaskingWarning, match="probabilities"):
        auto_attack(probs, x[:32], y[:32], version="fast", steps=2)
    with pytest.raises(GradientMaskingError, match="remove the final softmax"):
        auto_attack(probs, x[:32], y[:32], version="fast", steps=2, checks="raise")


def test_randomized_model_is_flagged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.Dropout(0.5), nn.Linear(32, 10)).train()
    x, y = batch()
    with pytest.warns(GradientMaskingWarning, match="randomized"):
        auto_attack(model, x, y, version="fast", steps=2, model_mode="keep")
    aa = AutoAttack(version="fast", steps=2, checks="off")  # eval mode (default): deterministic, no flag
    aa(model, x, y)
    assert not any("randomized" in f for f in aa.last_report.flags)


def test_quantized_input_gives_zero_gradients_and_square_beats_white_box(digits16):
    model, x, y = digits16
    masked = nn.Sequential(Quantize(), model).eval()
    x, y = x[:96], y[:96]
    aa = AutoAttack(eps=0.2, steps=10, n_queries=300, generator=make_generator("cpu", 0), checks="off")
    adv = aa(masked, x, y)
    flags = " ".join(aa.last_report.flags)
    acc = aa.last_report.accuracies
    assert "zero input gradient" in flags and "Square attack lowered" in flags
    assert acc["square"] < acc["apgd-t"] - 0.1  # the black-box attack gets through the masking
    assert accuracy(masked, adv, y) == acc["square"]
    with pytest.raises(GradientMaskingError, match="zero input gradient"):
        AutoAttack(eps=0.2, steps=2, checks="raise")(masked, x, y)


# ----------------------------------------------------------------------------- errors
def test_bad_settings_raise_clear_errors():
    model = small_cnn()
    x, y = batch()
    with pytest.raises(ConfigurationError, match="at least 4 classes"):
        apgd_targeted(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)), x, y % 3, steps=2)
    with pytest.raises(ConfigurationError, match="n_target_classes"):
        apgd_targeted(model, x, y, n_target_classes=0)
    with pytest.raises(ConfigurationError, match=r"\(N, C, H, W\)"):
        square(nn.Linear(12, 10), torch.rand(4, 12), y[:4])
    with pytest.raises(ConfigurationError, match="p_init"):
        square(model, x, y, p_init=0.0)
    with pytest.raises(ConfigurationError, match="loss"):
        square(model, x, y, loss="dlr")
    with pytest.raises(ConfigurationError, match="version"):
        AutoAttack(version="plus")
    with pytest.raises(ConfigurationError, match="custom"):
        AutoAttack(version="custom")
    with pytest.raises(ConfigurationError, match="checks"):
        AutoAttack(checks="loud")
    with pytest.raises(ConfigurationError, match="outside the declared bounds"):
        auto_attack(model, x * 4 - 2, y)
    with pytest.raises(ConfigurationError, match=r"labels must have shape"):
        auto_attack(model, x, y[:3])


def test_stages_that_cannot_run_are_skipped_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.rand(8, 12), torch.randint(0, 3, (8,))
    aa = AutoAttack(eps=0.1, steps=3)
    with pytest.warns(UserWarning, match="skipped"):
        aa(model, x, y)
    assert list(aa.last_report.accuracies) == ["clean", "apgd-ce"][: len(aa.last_report.accuracies)]
    assert any("apgd-t" in s for s in aa.last_report.skipped) and any("square" in s for s in aa.last_report.skipped)
