"""Numeric faults and state integrity of the SAM family (issue 12), by generated cases.

Laws checked with hypothesis:
- a SAM step never writes more non-finite values into the weights or the optimizer state than the base
  optimizer writes from the same gradients (random non-finite entries in either pass, every variant);
- a corrupted state dict (any field of the ``"sharpguard"`` entry) raises one ConfigurationError and
  leaves the optimizer bitwise as it was; a valid one with other knobs is refused unless asked;
- knobs assigned between steps are validated by the constructor's rule.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sharpguard as sg
from sharpguard.errors import ConfigurationError
from sharpguard.optim import VARIANTS, make_sam
from sharpguard.optim.sam import SAMFallbackWarning

# every variant that wraps a plain model (Flat-LoRA needs a peft LoRA model: tests/optim/test_lora.py) around
# SGD with momentum (bSAM is its own Adam-like update on a plain SGD: its faults are in test_optim_gam_bsam.py)
VARIANT_NAMES = sorted(v for v in VARIANTS if v not in ("flat_lora", "bsam"))
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def snapshot(opt) -> tuple[list[torch.Tensor], dict]:
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    return params, copy.deepcopy(opt.state_dict())


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def warm(opt, model, steps: int = 3) -> None:
    x, y = batch()
    for _ in range(steps):
        opt.zero_grad()
        opt.step(lambda: nn.functional.cross_entropy(model(x), y).backward())


def n_nonfinite(tensors) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


# ------------------------------------------------------------------------------------ faults
@FAST
@given(
    variant=st.sampled_from(VARIANT_NAMES),
    which=st.sampled_from(["clean", "perturbed", "both"]),
    value=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
    where=st.integers(0, 10_000),
)
def test_a_step_never_writes_more_non_finite_values_than_the_base_optimizer(variant, which, value, where):
    """One non-finite gradient element in the clean pass, the perturbed pass or both. Under SAM the
    weights and state get at most what plain SGD-momentum gets from the same clean gradient."""
    model = net()
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), variant, model=model)
    warm(opt, model)  # momentum exists (Momentum-SAM perturbs), LookSAM has a g_v
    params = [p for p in model.parameters()]
    target = params[where % len(params)]
    index = where % target.numel()
    x, y = batch()
    calls = []

    def closure():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        first = len(calls) == 1
        if (first and which in ("clean", "both")) or (not first and which in ("perturbed", "both")):
            target.grad.view(-1)[index] = value

    # the reference: the base optimizer alone, same weights and state, given the clean gradient with the fault
    base_model = copy.deepcopy(model)
    base = torch.optim.SGD(base_model.parameters(), lr=0.1, momentum=0.9)
    base.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))  # load_state_dict shares tensors
    nn.functional.cross_entropy(base_model(x), y).backward()
    if which in ("clean", "both"):
        list(base_model.parameters())[where % len(params)].grad.view(-1)[index] = value
    base.step()
    allowed = n_nonfinite(base_model.parameters())

    opt.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
    # said whenever SAM acted on the faulty gradient: a step with a perturbed pass, or LookSAM's reuse step
    # (which adds its g_v to that gradient). Momentum-SAM's single pass gives the base optimizer its own
    # gradient at the point it was taken, untouched: nothing to say beyond what the base optimizer does.
    acted = len(calls) >= 2 or variant == "looksam"  # GAM calls the closure four times
    injected = which in ("clean", "both") or len(calls) >= 2
    assert (injected and acted) == any(issubclass(w.category, SAMFallbackWarning) for w in caught)
    assert n_nonfinite(params) <= allowed
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    state += [t for s in opt.sam_state.values() for t in s.values()]
    base_state = [t for s in base.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert n_nonfinite(state) <= max(n_nonfinite(base_state), allowed)


def test_a_nan_loss_warns_and_skip_policy_leaves_everything_unchanged():
    model = net()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nonfinite="skip")
    warm(opt, model)
    before = snapshot(opt)
    x, y = batch()
    opt.zero_grad()
    with pytest.warns(UserWarning, match="skipped the update"):
        opt.step(lambda: (nn.functional.cross_entropy(model(x), y) * float("nan")).backward())
    after = snapshot(opt)
    assert same(before[0], after[0]) and same(before[1]["state"], after[1]["state"])
    assert opt.nonfinite_counts == {"nonfinite_clean": 1, "nonfinite_perturbed": 0}


def test_sparse_gradients_are_refused_with_a_sharpguard_error_before_anything_moves():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = sg.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    before = emb.weight.detach().clone()
    with pytest.raises(ConfigurationError, match="sparse"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum().backward())
    assert torch.equal(emb.weight, before)


def test_a_closure_without_backward_and_a_frozen_model_are_refused():
    model = net()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch()
    with pytest.raises(ConfigurationError, match="backward"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))
    model.requires_grad_(False)
    with pytest.raises(ConfigurationError, match="do not require grad"):
        sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1)


def test_unknown_keywords_are_reported_by_sam_with_the_fix():
    model = net()
    with pytest.raises(ConfigurationError, match="neither SAM .* nor its base optimizer SGD"):
        sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1, radius=0.05)
    with pytest.raises(ConfigurationError, match="did you mean 'k'"):
        sg.LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, kk=3)
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    with pytest.raises(ConfigurationError, match="did you mean 'variant'"):
        SharpnessAwareMinimization(varient="asam")


# ----------------------------------------------------------------------------- knob assignment
@FAST
@given(
    variant=st.sampled_from(VARIANT_NAMES),
    value=st.sampled_from([float("nan"), float("inf"), -0.5, "0.1", True, None]),
)
def test_knobs_assigned_between_steps_are_validated_like_at_construction(variant, value):
    model = net()
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), variant)
    radius = "rho" if "rho" in opt.knob_defaults() else "sigma"  # random-perturbation variants: sigma
    before = opt._knobs()
    with pytest.raises(ConfigurationError):
        setattr(opt, radius, value)
    assert opt._knobs() == before
    setattr(opt, radius, 0.2)  # a valid schedule value is taken
    assert getattr(opt, radius) == 0.2
    if radius != "rho":
        with pytest.raises(ConfigurationError, match="has no setting 'rho'"):
            opt.rho = 0.1  # a SAM rho schedule on a variant without rho is said, not ignored


# ------------------------------------------------------------------------------ state dicts
def corrupted_variants(state: dict) -> list[tuple[str, object]]:
    """(field path, bad value) pairs for every field of the "sharpguard" entry."""
    ours = state["sharpguard"]
    out: list[tuple[str, object]] = [
        ("step", "abc"), ("step", -5), ("step", 2.5), ("step", True), ("variant", "not-a-variant"),
        ("knobs", [1, 2]), ("knobs.rho", float("nan")), ("knobs.rho", -1.0), ("knobs.unknown", 1),
        ("buffers", "x"), ("buffers.bogus", {}), ("whole", None), ("whole", 3),
    ]
    for name, entries in ours["buffers"].items():
        for i in list(entries)[:1]:
            out += [
                (f"buffers.{name}.{i}", entries[i].tolist()),  # a list, not a tensor
                (f"buffers.{name}.{i}", torch.zeros(99)),  # wrong shape
                (f"buffers.{name}.{i}", torch.full_like(entries[i], float("nan"))),
                (f"buffers.{name}.{i}", entries[i].long()),
                (f"buffers.{name}.999", entries[i]),  # no such parameter
            ]
    return out


def apply(state: dict, path: str, value: object) -> dict:
    state = copy.deepcopy(state)
    if path == "whole":
        state["sharpguard"] = value
        return state
    node = state["sharpguard"]
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k) if k.isdigit() else k]
    last = keys[-1]
    node[int(last) if last.isdigit() else last] = value
    return state


@pytest.mark.parametrize("variant", ["looksam", "friendly_sam", "sam"])
def test_every_corrupted_field_raises_one_error_and_changes_nothing(variant):
    model = net()
    knobs = {"k": 2} if variant == "looksam" else {}
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), variant, **knobs)
    warm(opt, model)
    good = opt.state_dict()
    cases = corrupted_variants(good)
    assert len(cases) >= 13
    for path, value in cases:
        fresh_model = net()
        target = make_sam(torch.optim.SGD(fresh_model.parameters(), lr=0.1, momentum=0.9), variant, **knobs)
        warm(target, fresh_model, steps=1)
        before_params, before_state = snapshot(target)
        before_own = copy.deepcopy(target.sharpguard_state_dict())
        with pytest.raises(ConfigurationError):
            target.load_state_dict(apply(good, path, value))
        after_params, after_state = snapshot(target)
        assert same(before_params, after_params), path
        assert same(before_state, after_state), path
        assert same(before_own, target.sharpguard_state_dict()), path


def test_a_base_state_the_base_optimizer_refuses_leaves_everything_as_it_was():
    model = net()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    warm(opt, model)
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:1]  # wrong group size
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    assert same(before[1], snapshot(opt)[1])


@FAST
@given(k_saved=st.integers(1, 6), k_now=st.integers(1, 6), rho_now=st.sampled_from([0.05, 0.1]))
def test_resume_with_other_knobs_is_refused_naming_them_unless_asked(k_saved, k_now, rho_now):
    model = net()
    saved = sg.LookSAM(model.parameters(), torch.optim.SGD, lr=0.1, k=k_saved)
    warm(saved, model, steps=2)
    state = saved.state_dict()
    other = sg.LookSAM(net().parameters(), torch.optim.SGD, lr=0.1, k=k_now, rho=rho_now)
    differ = sorted(n for n, a, b in (("k", k_saved, k_now), ("rho", 0.05, rho_now)) if a != b)
    if differ:
        with pytest.raises(ConfigurationError, match=" and ".join(differ) if len(differ) == 1 else differ[0]):
            other.load_state_dict(state)
        assert other.k == k_now and other.rho == rho_now
        other.load_state_dict(state, resume="current")
        assert other.k == k_now and other.rho == rho_now and other._step == 2
        other.load_state_dict(state, resume="checkpoint")
        assert other.k == k_saved and other.rho == 0.05
    else:
        other.load_state_dict(state)
        assert other._step == 2


# ------------------------------------------------------------------------- the default: skip, 1.0x
def _poisoned_closure(model, x, y, bad_calls: set[int], value: float = float("nan")):
    """A closure whose ``k``-th call (1-based; 1 is the clean pass) multiplies the loss by ``value``."""
    calls = [0]

    def closure():
        calls[0] += 1
        loss = nn.functional.cross_entropy(model(x), y)
        if calls[0] in bad_calls:
            loss = loss * value
        loss.backward()
        return loss

    return closure


def test_the_default_policy_is_skip_and_keeps_no_clean_gradient_copy():
    model = net()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.nonfinite == "skip" and not opt.keeps_clean_gradient
    warm(opt, model, steps=2)
    backup = sum(t.numel() for t in opt._scratch["w"][2])
    assert set(opt._scratch) == {"w"} and backup == sum(p.numel() for p in model.parameters())
    assert sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1, nonfinite="fallback").keeps_clean_gradient


def test_float64_hand_check_a_sound_step_is_sam_and_a_faulty_one_changes_nothing():
    """Step 1 by hand (float64 least squares, SGD-momentum): w1 = w0 - lr g(w0 + rho g0/||g0||).
    Step 2 with a NaN at w + e: weights and momentum stay bitwise those of step 1."""
    from tests.helpers.optim_lsq import B0, W0, lsq_grad, lsq_loss, lsq_model
    from tests.helpers.optim_lsq import norm as lsq_norm
    from tests.helpers.optim_lsq import weights as lsq_weights

    rho, lr = 0.1, 0.05
    model = lsq_model()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=0.9)
    opt.zero_grad()
    opt.step(lambda: lsq_loss(model).backward())
    g0 = lsq_grad([W0, B0])
    n0 = lsq_norm(g0)
    gs = lsq_grad([W0 + rho * g0[0] / n0, B0 + rho * g0[1] / n0])
    expected = [W0 - lr * gs[0], B0 - lr * gs[1]]
    for got, want in zip(lsq_weights(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    before = snapshot(opt)
    calls = [0]

    def faulty():
        calls[0] += 1
        loss = lsq_loss(model) * (float("nan") if calls[0] == 2 else 1.0)
        loss.backward()
        return loss

    opt.zero_grad()
    with pytest.warns(SAMFallbackWarning, match="it skipped the update"):
        opt.step(faulty)
    after = snapshot(opt)
    assert same(before[0], after[0]) and same(before[1]["state"], after[1]["state"])
    assert opt.nonfinite_counts == {"nonfinite_clean": 0, "nonfinite_perturbed": 1}


@FAST
@given(seed=st.integers(0, 2**16), lr=st.floats(1e-3, 0.5), momentum=st.sampled_from([0.0, 0.5, 0.9]),
       adam=st.booleans())
def test_rho_zero_is_the_base_optimizer_bitwise_under_the_default_policy(seed, lr, momentum, adam):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    b = copy.deepcopy(a)
    base_cls, kwargs = (torch.optim.Adam, {"lr": lr}) if adam else (torch.optim.SGD, {"lr": lr, "momentum": momentum})
    opt = sg.SAM(a.parameters(), base_cls, rho=0.0, **kwargs)
    ref = base_cls(b.parameters(), **kwargs)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: nn.functional.cross_entropy(a(x), y).backward())
        ref.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


STEPPING_VARIANTS = [v for v in VARIANT_NAMES if v != "momentum_sam"]  # momentum_sam has no perturbed pass


@FAST
@given(variant=st.sampled_from(STEPPING_VARIANTS), point=st.integers(0, 2),
       value=st.sampled_from([float("inf"), float("-inf"), float("nan")]), adam=st.booleans())
def test_under_the_default_a_faulty_perturbed_pass_never_writes_a_non_finite_weight(variant, point, value, adam):
    """A non-finite loss at any perturbed point of a step whose clean pass is sound: the weights stay
    finite and bitwise as they were, and so does the base optimizer's state (the step is skipped)."""
    model = net()
    base_cls, kwargs = (torch.optim.Adam, {"lr": 0.01}) if adam else (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    opt = make_sam(base_cls(model.parameters(), **kwargs), variant, model=model)
    warm(opt, model, steps=2)
    while not opt.needs_second_pass():  # LookSAM's reuse steps have no perturbed pass
        warm(opt, model, steps=1)
    before = snapshot(opt)
    x, y = batch()
    opt.zero_grad()
    bad = 2 + point % opt.perturbed_points
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAMFallbackWarning)
        opt.step(_poisoned_closure(model, x, y, {bad}, value))
    after = snapshot(opt)
    assert all(torch.isfinite(p).all() for p in after[0])
    assert same(before[0], after[0]) and same(before[1]["state"], after[1]["state"])
    assert opt.nonfinite_counts["nonfinite_perturbed"] == 1


def test_a_gradscaler_sees_an_overflow_at_w_plus_e_skips_and_backs_off_under_the_default():
    """Only the perturbed gradient overflows: the decision waits for the base step, so the scaler's
    own inf check finds it first, skips the step and lowers its scale, as without SAM."""
    model = net()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    assert opt.first_step(zero_grad=True)
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAMFallbackWarning)
        opt.unperturb()
    scaler.step(opt.base_optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.base_optimizer.state


def test_step_returns_the_clean_loss_detached():
    """The loss at w, without its graph (its backward has run): keeping it keeps no graph alive, and
    ``loss.backward()`` on it fails loudly instead of silently. A closure's non-tensor result is
    returned as it is."""
    model = net()
    opt = sg.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    ref = copy.deepcopy(model)
    x, y = batch()

    def closure():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and not loss.requires_grad and loss.grad_fn is None
    assert torch.equal(loss, nn.functional.cross_entropy(ref(x), y).detach())  # the loss at w, before the step

    def counting():
        nn.functional.cross_entropy(model(x), y).backward()
        return 7

    opt.zero_grad()
    assert opt.step(counting) == 7
