"""SAM itself: the update against a float64 hand computation, exactness promises, checkpoints,
running statistics, GradScaler, accumulation and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import sharpguard as sg
from sharpguard.errors import ConfigurationError
from sharpguard.optim import SAM, make_sam

from tests.helpers.optim_lsq import B0, W0, X, Y, lsq_grad, lsq_loss, lsq_model, norm, weights  # noqa: E402


def test_sam_step_matches_float64_hand_computation_with_sgd_momentum():
    rho, lr, mu = 0.1, 0.05, 0.9
    model = lsq_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=mu)
    calls = []

    def closure():  # does NOT zero the gradients: SAM must zero before the second pass itself
        loss = lsq_loss(model)
        loss.backward()
        calls.append(loss.item())
        return loss

    w, buf = [W0.copy(), B0.copy()], None
    for _ in range(3):
        opt.zero_grad()
        loss = opt.step(closure)
        g = lsq_grad(w)
        e = [rho * t / norm(g) for t in g]
        gp = lsq_grad([a + b for a, b in zip(w, e)])
        buf = gp if buf is None else [mu * m + t for m, t in zip(buf, gp)]
        w = [a - lr * m for a, m in zip(w, buf)]
        assert loss.item() == calls[-2]  # the loss at w, not at w + e
        for got, want in zip(weights(model), w):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert len(calls) == 6


def test_adaptive_sam_matches_hand_computation():
    rho, lr = 0.5, 0.1
    model = lsq_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, lr=lr)
    opt.zero_grad()
    opt.step(lambda: lsq_loss(model).backward())
    w = [W0, B0]
    g = lsq_grad(w)
    t = [np.abs(a) for a in w]  # davda54's form: eta = 0
    tg = [a * b for a, b in zip(t, g)]
    e = [rho * a * a * b / norm(tg) for a, b in zip(t, g)]
    gp = lsq_grad([a + b for a, b in zip(w, e)])
    for got, want in zip(weights(model), [a - lr * b for a, b in zip(w, gp)]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# small float32 nets for the exactness promises
# --------------------------------------------------------------------------------------------------
def mlp(seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


BATCHES = [(torch.randn(12, 6, generator=torch.Generator().manual_seed(i)), torch.arange(12) % 3) for i in range(8)]


def make_closure(model, opt, batch, zero=True):
    x, y = batch

    def closure():
        if zero:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def state_of(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert torch.equal(s, t)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-2})])
def test_rho_zero_is_bitwise_the_base_optimizer(base, kw):
    m1, m2 = mlp(), mlp()
    sam = SAM(m1.parameters(), base, rho=0.0, **kw)
    plain = base(m2.parameters(), **kw)
    for batch in BATCHES[:4]:
        sam.step(make_closure(m1, sam, batch))
        plain.zero_grad()
        make_closure(m2, plain, batch, zero=False)()
        plain.step()
    assert_bitwise(state_of(m1)[:4], state_of(m2)[:4])  # parameters (BN stats saw two passes in m1)


def test_closure_that_does_not_zero_equals_closure_that_does_and_the_two_step_form():
    models = [mlp(), mlp(), mlp()]
    opts = [SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, model=m) for m in models]
    for batch in BATCHES[:3]:
        opts[0].step(make_closure(models[0], opts[0], batch, zero=True))
        opts[1].zero_grad()
        opts[1].step(make_closure(models[1], opts[1], batch, zero=False))
        # two-step form
        x, y = batch
        opts[2].zero_grad()
        nn.functional.cross_entropy(models[2](x), y).backward()
        assert opts[2].first_step(zero_grad=True)
        nn.functional.cross_entropy(models[2](x), y).backward()
        opts[2].second_step(zero_grad=True)
    assert_bitwise(state_of(models[0]), state_of(models[1]))
    assert_bitwise(state_of(models[0]), state_of(models[2]))


def test_param_groups_are_shared_and_schedulers_work_on_either():
    model = mlp(bn=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=1.0)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_closure(model, opt, BATCHES[0]))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    sched2 = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    opt.step(make_closure(model, opt, BATCHES[1]))
    sched2.step()
    assert opt.param_groups[0]["lr"] == 0.25
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 0.3})
    assert len(opt.base_optimizer.param_groups) == 2
    # loading keeps the link (torch replaces the base optimizer's param_groups list on load)
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base_optimizer.param_groups


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
def _train(model, opt, batches):
    for batch in batches:
        opt.step(make_closure(model, opt, batch))


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "variant,base,kw,knobs",
    [
        ("sam", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}, {}),
        ("sam", torch.optim.Adam, {"lr": 1e-2}, {}),
        ("looksam", torch.optim.Adam, {"lr": 1e-2}, {"k": 3}),
        ("friendly_sam", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {}),
        ("momentum_sam", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {}),
        ("sam", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {"interval": 2}),
    ],
)
def test_save_load_continue_is_bitwise_equal_to_never_stopping(variant, base, kw, knobs):
    ref = mlp()
    ref_opt = make_sam(base(ref.parameters(), **kw), variant, model=ref, **knobs)
    _train(ref, ref_opt, BATCHES)

    first = mlp()
    opt = make_sam(base(first.parameters(), **kw), variant, model=first, **knobs)
    _train(first, opt, BATCHES[:5])
    ckpt = _roundtrip({"model": first.state_dict(), "opt": opt.state_dict()})

    resumed = mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = make_sam(base(resumed.parameters(), **kw), variant, model=resumed, **knobs)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, BATCHES[5:])
    assert_bitwise(state_of(ref), state_of(resumed))


def test_state_dict_is_the_base_optimizers_plus_one_entry_and_loads_into_the_base():
    model = mlp(bn=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    _train(model, opt, BATCHES[:2])
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "sharpguard"}
    assert sd["sharpguard"]["step"] == 2 and sd["sharpguard"]["knobs"]["rho"] == 0.05
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(sd)  # checkpoints load without sharpguard
    for p in model.parameters():
        assert torch.equal(plain.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    # and a plain optimizer's checkpoint loads into SAM (counters start at 0)
    opt2 = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt2.load_state_dict(plain.state_dict())
    assert opt2.state_dict()["sharpguard"]["step"] == 0


def test_loading_another_variants_state_raises_before_changing_anything():
    model = mlp(bn=False)
    look = make_sam(torch.optim.SGD(model.parameters(), lr=0.1), "looksam")
    _train(model, look, BATCHES[:1])
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.5)
    with pytest.raises(ConfigurationError, match="looksam"):
        sam.load_state_dict(look.state_dict())
    assert sam.param_groups[0]["lr"] == 0.5


# --------------------------------------------------------------------------------------------------
# exception safety, zero and non-finite gradients
# --------------------------------------------------------------------------------------------------
def test_exception_in_the_perturbed_pass_restores_weights_and_statistics():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    x, y = BATCHES[0]
    calls, before = [], state_of(model)
    seen = {}

    def closure():
        opt.zero_grad()
        calls.append(1)
        if len(calls) == 2:
            seen["moved"] = not torch.equal(model[0].weight, before[0])
            model(x)  # updates BN statistics at w + e before failing
            raise RuntimeError("boom")
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen["stats_after_clean"] = [b.clone() for b in model.buffers()]
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert seen["moved"]
    assert_bitwise(state_of(model)[:6], before[:6])  # parameters bitwise
    assert_bitwise(list(model.buffers()), seen["stats_after_clean"])  # statistics of the clean pass only
    # the optimizer is usable afterwards and its counter did not advance
    assert opt.state_dict()["sharpguard"]["step"] == 0
    opt.step(make_closure(model, opt, BATCHES[1]))


def test_zero_gradient_gives_zero_perturbation_and_no_nan():
    model = mlp(bn=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = state_of(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert opt.first_step()
    assert_bitwise(state_of(model), before)  # w + 0
    opt.second_step()
    assert_bitwise(state_of(model), before)


def test_non_finite_gradient_gives_zero_scale_and_weights_are_restored_exactly():
    model = mlp(bn=False)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = state_of(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[0].weight.grad[0, 0] = float("inf")
    opt.first_step()
    # e = 0 at every finite entry of g: only the entry whose gradient is inf is touched
    moved = [~torch.eq(a, b) for a, b in zip(state_of(model), before)]
    assert sum(int(m.sum()) for m in moved) == 1
    opt.unperturb()
    assert_bitwise(state_of(model), before)


# --------------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------------
class RunningAverage(nn.Module):
    """A custom (non-BatchNorm) module with running statistics."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("running_avg", torch.zeros(n))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_avg.mul_(0.5).add_(0.5 * x.mean(0))
        return x


def test_running_statistics_come_from_the_unperturbed_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), RunningAverage(16), nn.ReLU(), nn.Linear(16, 3))
    reference = nn.Sequential(*[m for m in model])  # same modules: compute the expected stats first
    x, y = BATCHES[0]
    expected = None
    with torch.no_grad():
        snapshot = [b.clone() for b in model.buffers()]
        reference(x)  # one clean forward at w
        expected = [b.clone() for b in model.buffers()]
        for b, s in zip(model.buffers(), snapshot):
            b.copy_(s)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, model=model)
    opt.step(make_closure(model, opt, (x, y)))
    assert_bitwise(list(model.buffers()), expected)
    assert int(model[1].num_batches_tracked) == 1

    # without model=, both passes update them (what davda54/sam users get)
    plain = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    plain.step(make_closure(model, plain, (x, y)))
    assert int(model[1].num_batches_tracked) == 3


# --------------------------------------------------------------------------------------------------
# GradScaler and gradient accumulation
# --------------------------------------------------------------------------------------------------
def _scaler_step(model, opt, scaler, batch):
    x, y = batch
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    if opt.first_step(zero_grad=True):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.unperturb()
    scaler.step(opt.base_optimizer)
    scaler.update()


def test_gradscaler_path_equals_fp32_without_overflow():
    m1, m2 = mlp(), mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=m1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=m2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for batch in BATCHES[:3]:
        o1.step(make_closure(m1, o1, batch))
        _scaler_step(m2, o2, scaler, batch)
    for a, b in zip(state_of(m1), state_of(m2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_gradscaler_overflow_skips_the_step_with_weights_and_statistics_unchanged():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = BATCHES[0]
    params_before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    stats_after_clean = [b.clone() for b in model.buffers()]
    model[0].weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves in the clean gradient
    if opt.first_step(zero_grad=True):
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    opt.unperturb()
    scaler.step(opt.base_optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**12
    assert_bitwise([p.detach() for p in model.parameters()], params_before)
    assert_bitwise(list(model.buffers()), stats_after_clean)
    assert not opt.base_optimizer.state  # the base optimizer never stepped


def test_accumulation_closure_over_micro_batches_equals_the_full_batch():
    full, acc = lsq_model(), lsq_model()
    o_full = SAM(full.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o_acc = SAM(acc.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    parts = [(x[:3], y[:3]), (x[3:], y[3:])]

    def accumulate():
        total = 0.0
        for xb, yb in parts:
            loss = 0.5 * ((acc(xb) - yb) ** 2).sum(1).sum() / len(x)  # each micro-batch's share of the mean
            loss.backward()
            total = total + loss.detach()
        return total

    for _ in range(3):
        o_full.zero_grad()
        l_full = o_full.step(lambda: lsq_loss(full).backward() or lsq_loss(full))
        o_acc.zero_grad()
        l_acc = o_acc.step(accumulate)
        torch.testing.assert_close(l_full, l_acc, rtol=1e-12, atol=0)
    for a, b in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors_before_anything_changes():
    model = mlp(bn=False)
    params = list(model.parameters())
    with pytest.raises(ConfigurationError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ConfigurationError, match="rho"):
        SAM(params, torch.optim.SGD, rho=float("nan"), lr=0.1)
    with pytest.raises(ConfigurationError, match="Optimizer subclass"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)
    with pytest.raises(ConfigurationError, match="Optimizer subclass"):
        SAM(params, "sgd", lr=0.1)
    with pytest.raises(ConfigurationError, match="empty"):
        SAM([], torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigurationError, match="interval"):
        SAM(params, torch.optim.SGD, interval=0, lr=0.1)
    with pytest.raises(ConfigurationError, match="Optimizer instance"):
        SAM.wrap(torch.optim.SGD)
    with pytest.raises(ConfigurationError, match="no setting 'lr'"):
        SAM.wrap(torch.optim.SGD(params, lr=0.1), lr=0.1)
    with pytest.raises(ConfigurationError, match="unknown SAM variant"):
        make_sam(torch.optim.SGD(params, lr=0.1), "not_a_variant")
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigurationError, match="already a SAM"):
        SAM.wrap(opt)
    with pytest.raises(ConfigurationError, match="closure"):
        opt.step()
    before = state_of(model)
    make_closure(model, opt, BATCHES[0])()
    assert opt.perturb()
    with pytest.raises(ConfigurationError, match="twice"):
        opt.perturb()
    opt.cancel()
    assert_bitwise(state_of(model), before)


def test_wrap_and_make_sam_build_the_same_optimizer_as_the_constructor():
    m1, m2, m3 = mlp(bn=False), mlp(bn=False), mlp(bn=False)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM.wrap(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    o3 = make_sam(torch.optim.SGD(m3.parameters(), lr=0.1, momentum=0.9), "SAM", rho=0.1)
    for batch in BATCHES[:2]:
        for m, o in ((m1, o1), (m2, o2), (m3, o3)):
            o.step(make_closure(m, o, batch))
    assert_bitwise(state_of(m1), state_of(m2))
    assert_bitwise(state_of(m1), state_of(m3))
    assert sg.SAM is SAM


def test_constructor_and_configure_defaults_agree():
    """wrap()/make_sam() take their defaults from _configure, the constructor from __init__."""
    import inspect

    from sharpguard.optim import VARIANTS

    for cls in VARIANTS.values():
        init = inspect.signature(cls.__init__).parameters
        for name, param in inspect.signature(cls._configure).parameters.items():
            if name == "self":
                continue
            assert init[name].default == param.default, (cls.__name__, name)


def test_interval_runs_the_closure_once_on_skipped_steps_and_equals_plain_steps_there():
    m1 = mlp(bn=False)
    sam = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, interval=3, lr=0.1)
    calls = []

    def counting(batch):
        inner = make_closure(m1, sam, batch)

        def closure():
            calls.append(1)
            return inner()

        return closure

    counts = []
    for batch in BATCHES[:6]:
        n = len(calls)
        sam.step(counting(batch))
        counts.append(len(calls) - n)
    assert counts == [2, 1, 1, 2, 1, 1]
    assert sam.cost == (pytest.approx(4 / 3), pytest.approx(4 / 3))
    # a skipped step (index 7, 8) is exactly a plain step
    plain_model = mlp(bn=False)
    sam.step(make_closure(m1, sam, BATCHES[6]))  # index 6: perturbs
    plain_model.load_state_dict(m1.state_dict())
    plain = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    for batch in BATCHES[:2]:  # indices 7, 8: plain
        sam.step(make_closure(m1, sam, batch))
        plain.step(make_closure(plain_model, plain, batch))
    assert_bitwise(state_of(m1), state_of(plain_model))


def test_bf16_autocast_closure_and_two_step_forms_agree():
    m1, m2 = mlp(), mlp()
    o1 = SAM(m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=m1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=m2)
    for x, y in BATCHES[:2]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o1.step(make_closure(m1, o1, (x, y)))
            o2.zero_grad()
            nn.functional.cross_entropy(m2(x), y).backward()
            o2.first_step(zero_grad=True)
            nn.functional.cross_entropy(m2(x), y).backward()
            o2.second_step()
    assert all(torch.isfinite(p).all() for p in m1.parameters())
    assert_bitwise(state_of(m1), state_of(m2))


@pytest.mark.parametrize("nonfinite, kept", [("skip", {"w"}), ("fallback", {"w", "clean_grad"})])
def test_the_step_scratch_is_allocated_before_the_clean_forward_and_reused(nonfinite, kept):
    """The weight backup (and, for the fallback, the clean-gradient copy) exist before the first forward
    of a step (so they do not land above the freed activations on the heap) and are the same storage
    every step; the default policy keeps no clean-gradient copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, nonfinite=nonfinite)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    seen = []

    def closure():
        seen.append({k: [b.data_ptr() for b in v[2]] for k, v in opt._scratch.items() if k in ("w", "clean_grad")})
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.zero_grad()
        opt.step(closure)
    first_clean_pass = seen[0]
    assert set(first_clean_pass) == kept
    assert set(opt._scratch) == kept
    assert all(s == first_clean_pass for s in seen)
