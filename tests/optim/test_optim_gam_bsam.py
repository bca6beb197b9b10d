"""GAM and bSAM (issue 14) on the multi-point step engine.

Each defining update against a float64 hand computation on a small tanh network (gradients by
``torch.autograd`` on hand-written formulas, not the package's kernels), the passes per step counted
with hooks against ``cost``, the degenerate cases (GAM reduces to SAM; bSAM's noise vanishes with a
huge ``num_data``), the fault policy at every point, exceptions in a replay, BatchNorm statistics,
the replay/no_sync/phase protocol of the engine, bitwise resume and the refusal of bad settings.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import sharpguard as sg
from sharpguard.errors import ConfigurationError
from sharpguard.optim import BSAM, GAM, SAMEngine, _phase, make_sam
from sharpguard.optim.sam import SAMFallbackWarning

LR = 0.1
GEN = torch.Generator().manual_seed(0)
X = torch.randn(10, 3, generator=GEN, dtype=torch.float64)
Y = torch.randn(10, 2, generator=GEN, dtype=torch.float64)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def loss_fn(model: nn.Module, x: torch.Tensor = X, y: torch.Tensor = Y) -> torch.Tensor:
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


# ------------------------------------------------------------------------ the reference, by hand
def ref_loss(w: list[torch.Tensor]) -> torch.Tensor:
    W1, b1, W2, b2 = w
    out = torch.tanh(X @ W1.T + b1) @ W2.T + b2
    return 0.5 * ((out - Y) ** 2).sum(1).mean()


def grad(w: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(ref_loss(leaves), leaves)]


def add(a, b, s=1.0):
    return [x + s * y for x, y in zip(a, b)]


def mul(a, b):
    return [x * y for x, y in zip(a, b)]


def scale(a, s):
    return [s * x for x in a]


def norm(a) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in a))


def dot(a, b) -> float:
    return sum(float((s * t).sum()) for s, t in zip(a, b))


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def close(got, want, rtol=1e-10, atol=1e-12):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def run(opt, model, steps, *, bomb=None, loss_scale=1.0):
    """``steps`` optimizer steps through ``step(closure)``; returns the weights each closure call saw.
    ``bomb(call, model)`` may poison a gradient after the backward of a call (1-based, all steps)."""
    seen = []

    def closure():
        seen.append(params_of(model))
        opt.zero_grad()
        loss = loss_scale * loss_fn(model)
        loss.backward()
        if bomb is not None:
            bomb(len(seen), model)
        return loss

    for _ in range(steps):
        opt.step(closure)
    return seen


# --------------------------------------------------------------------------------------------------
# GAM
# --------------------------------------------------------------------------------------------------
def gam_ascent(w, g, rho, adaptive):
    """(direction, radius): e = rho g / ||g||, or ASAM's rho T^2 g / ||T g|| with T = |w| (official code)."""
    if not adaptive:
        return scale(g, rho / (norm(g) + 1e-12))
    t = [x.abs() for x in w]
    return scale(mul(mul(t, t), g), rho / (norm(mul(t, g)) + 1e-12))


@pytest.mark.parametrize("adaptive", [False, True])
def test_gam_update_is_the_official_algorithm(adaptive):
    rho, rho_norm, b1, b2, b3, gamma, mu = 0.05, 0.3, 0.7, -0.4, 0.5, 0.2, 0.9
    model = net()
    opt = GAM(model.parameters(), torch.optim.SGD, rho=rho, rho_norm=rho_norm, beta1=b1, beta2=b2, beta3=b3,
              gamma=gamma, adaptive=adaptive, lr=LR, momentum=mu)
    w, buf = params_of(model), None
    steps = 3
    seen = run(opt, model, steps)
    assert len(seen) == 4 * steps
    for t in range(steps):
        close(seen[4 * t], w)  # the clean pass at w
        g0 = grad(w)
        p1 = add(w, gam_ascent(w, g0, rho, adaptive))
        g1 = grad(p1)
        p2 = add(w, gam_ascent(w, add(g1, g0, -1.0), rho_norm, adaptive))  # ascent on ||grad L||
        g2 = grad(p2)
        p3 = add(p2, gam_ascent(p2, g2, rho, adaptive))  # SAM's ascent, from w_2
        g3 = grad(p3)
        for k, p in enumerate((p1, p2, p3), start=1):
            close(seen[4 * t + k], p)
        d = add(scale(g1, b1), scale(g3, b3))
        m = add(g0, scale(g2, abs(b2)))
        cosine = dot(m, d) / (norm(d) * norm(m) + 1e-12)
        vertical = add(m, scale(d, -cosine * norm(m) / (norm(d) + 1e-12)))
        final = add(d, scale(vertical, -gamma))
        buf = final if buf is None else add(scale(buf, mu), final)
        w = add(w, buf, -LR)
    close(params_of(model), w)


def test_gam_without_norm_ascent_and_decomposition_is_sam_bitwise():
    """rho_norm = 0: w_2 = w, so g_2 = g_0, the third point is SAM's and g_3 = g_1; with gamma = 0,
    beta1 = 1, beta3 = 0 the step is SAM's, bit for bit."""
    sam_model, gam_model = net(), net()
    run(make_sam(torch.optim.SGD(sam_model.parameters(), lr=LR, momentum=0.9), "sam", rho=0.05), sam_model, 3)
    gam = make_sam(torch.optim.SGD(gam_model.parameters(), lr=LR, momentum=0.9), "gam", rho=0.05, rho_norm=0.0,
                   gamma=0.0, beta1=1.0, beta3=0.0)
    seen = run(gam, gam_model, 3)
    for a, b in zip(sam_model.parameters(), gam_model.parameters()):
        assert torch.equal(a, b)
    for t in range(3):  # the point of the norm ascent is w itself, the third point SAM's
        assert all(torch.equal(a, b) for a, b in zip(seen[4 * t + 2], seen[4 * t]))
        assert all(torch.equal(a, b) for a, b in zip(seen[4 * t + 3], seen[4 * t + 1]))


def test_gam_direction_does_not_depend_on_a_loss_scale():
    """Every ascent is normalised and the decomposition is homogeneous: a loss times 1024 gives the
    same points, and a final gradient 1024 times larger (what a GradScaler unscales)."""
    a, b = net(), net()
    oa = GAM(a.parameters(), torch.optim.SGD, gamma=0.5, lr=LR)
    ob = GAM(b.parameters(), torch.optim.SGD, gamma=0.5, lr=LR / 1024)
    seen_a, seen_b = run(oa, a, 2), run(ob, b, 2, loss_scale=1024.0)
    for x, y in zip(seen_a, seen_b):
        close(y, x, rtol=1e-9, atol=1e-12)
    close(params_of(b), params_of(a), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# bSAM
# --------------------------------------------------------------------------------------------------
N_DATA = 50


@pytest.mark.parametrize("weight_decay", [None, 0.01])
def test_bsam_update_is_algorithm_1(weight_decay):
    rho, b1, b2, damping, s0 = 0.05, 0.8, 0.9, 0.1, 2.0
    model = net()
    opt = BSAM(model.parameters(), torch.optim.SGD, rho=rho, num_data=N_DATA, beta1=b1, beta2=b2,
               weight_decay=weight_decay, damping=damping, s_init=s0, lr=LR)
    delta = 25.0 / N_DATA if weight_decay is None else weight_decay
    steps = 4
    seen = run(opt, model, steps)
    assert len(seen) == 2 * steps
    theta = [p.detach().clone() for p in net().parameters()]
    s = [torch.full_like(t, s0) for t in theta]
    g_m = [torch.zeros_like(t) for t in theta]
    for t in range(steps):
        eps = add(seen[2 * t], theta, -1.0)  # the noise, read off the weights the clean pass saw
        assert all(e.abs().max() > 0 for e in eps)
        g = grad(seen[2 * t])  # at theta + eps
        e = scale([x / y for x, y in zip(g, s)], rho)
        close(seen[2 * t + 1], add(theta, e))  # the ascent starts from theta, the noise removed
        g_e = grad(add(theta, e))
        g_m = add(scale(g_m, b1), scale(add(g_e, scale(theta, delta)), 1 - b1))
        s = add(scale(s, b2), scale([x.sqrt() * y.abs() + delta + damping for x, y in zip(s, g)], 1 - b2))
        theta = add(theta, [x / y for x, y in zip(g_m, s)], -LR)
    close(params_of(model), theta)
    saved = opt.state_dict()["sharpguard"]["buffers"]
    close([saved["s"][i] for i in range(4)], s)
    close([saved["g_m"][i] for i in range(4)], g_m)


def test_bsam_noise_is_gaussian_with_variance_one_over_n_s():
    model = net()
    opt = BSAM(model.parameters(), torch.optim.SGD, num_data=N_DATA, s_init=3.0, lr=0.0)  # lr 0: theta stays
    theta = params_of(model)
    zs = []
    for _ in range(150):
        s = [opt.sam_state[p]["s"].clone() if "s" in opt.sam_state[p] else torch.full_like(p, 3.0)
             for p in model.parameters()]
        seen = run(opt, model, 1)
        zs += [((x - w) * (N_DATA * v).sqrt()).reshape(-1) for x, w, v in zip(seen[0], theta, s)]
    z = torch.cat(zs)  # 150 steps x 22 weights of N(0, 1)
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 1.0) < 0.05
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), theta))


def test_bsam_with_a_huge_num_data_has_no_noise_and_no_seed_dependence():
    """sigma^2 = 1/(N s) -> 0: two seeds give the same trajectory, the deterministic Algorithm 1."""
    runs = []
    for seed in (0, 1):
        model = net()
        opt = BSAM(model.parameters(), torch.optim.SGD, num_data=10**60, weight_decay=0.0, seed=seed, lr=LR)
        run(opt, model, 3)
        runs.append(params_of(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # and a small N does depend on the seed
    small = []
    for seed in (0, 1):
        model = net()
        run(BSAM(model.parameters(), torch.optim.SGD, num_data=N_DATA, seed=seed, lr=LR), model, 1)
        small.append(params_of(model))
    assert not all(torch.equal(a, b) for a, b in zip(*small))


# --------------------------------------------------------------------------------------------------
# passes per step, protocol, phase
# --------------------------------------------------------------------------------------------------
def build(variant: str, model: nn.Module, **knobs):
    if variant == "bsam":
        return make_sam(torch.optim.SGD(model.parameters(), lr=LR), "bsam", model=model, num_data=N_DATA, **knobs)
    return make_sam(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), variant, model=model, **knobs)


@pytest.mark.parametrize("variant, passes", [("gam", 4), ("bsam", 2)])
def test_passes_per_step_match_the_declared_cost(variant, passes):
    model = net()
    counts = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    model[0].weight.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))
    opt = build(variant, model)
    steps = 3
    run(opt, model, steps)
    assert opt.cost == (float(passes), float(passes))
    assert (counts["forward"] / steps, counts["backward"] / steps) == opt.cost


def test_engine_replays_every_micro_batch_at_every_point_with_the_no_sync_rule():
    """Two micro-batches: each point replays both, the first under no_sync, as ``_phase`` says."""
    model = net()
    opt = build("gam", model)
    engine = SAMEngine(opt)
    log, inside = [], []

    @contextlib.contextmanager
    def no_sync():
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    halves = [(X[:5], Y[:5]), (X[5:], Y[5:])]

    def micro(k):
        def replay():
            p = _phase.current_pass()
            log.append((p.kind, p.micro_batch, p.point, bool(inside)))
            (loss_fn(model, *halves[k]) / 2).backward()

        return replay

    opt.zero_grad()
    for k in range(2):
        engine.record(micro(k), model)
        micro(k)()
    assert engine.finish(no_sync=no_sync)
    opt.base_optimizer.step()
    # the clean passes run in the caller's own context; every point replays both micro-batches,
    # the first under no_sync so that only the last backward of each point all-reduces
    assert log == [("clean", 0, 0, False), ("clean", 1, 0, False)] + [
        ("perturbed", k, point, k == 0) for point in range(3) for k in range(2)
    ]
    assert _phase.current_pass() is None
    assert "3 extra forward/backward passes" in engine.summary()


def test_gam_refuses_the_two_step_form_and_a_step_missing_its_points():
    model = net()
    opt = build("gam", model)
    before = params_of(model)
    loss_fn(model).backward()
    with pytest.raises(ConfigurationError, match="step\\(closure\\) or a framework adapter"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    # the raw protocol without advance(): refused, w back by copy
    assert opt.perturb()
    opt.zero_grad(set_to_none=False)
    loss_fn(model).backward()
    with pytest.raises(ConfigurationError, match="after 1 of its 3 perturbed points; .* advance\\(\\)"):
        opt.unperturb()
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    # and it is usable again: the documented loop
    opt.zero_grad()
    loss_fn(model).backward()
    assert opt.perturb()
    rounds = 1
    while True:
        opt.zero_grad(set_to_none=False)
        loss_fn(model).backward()
        if not opt.advance():
            break
        rounds += 1
    opt.unperturb()
    assert rounds == 3


def test_single_point_variants_never_advance():
    model = net()
    for variant in ("sam", "gsam", "bsam"):
        opt = build(variant, model)
        opt.prepare()
        loss_fn(model).backward()
        assert opt.perturb()
        assert opt.advance() is False
        opt.cancel()


# --------------------------------------------------------------------------------------------------
# faults, exceptions, running statistics
# --------------------------------------------------------------------------------------------------
def n_nonfinite(tensors) -> int:
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def poison(call_no: int, value: float = float("nan")):
    def bomb(call, model):
        if call == call_no:
            model[2].weight.grad[0, 1] = value

    return bomb


@pytest.mark.parametrize("call", [2, 3, 4])
def test_gam_non_finite_gradient_at_any_point_falls_back_to_the_clean_one(call):
    model = net()
    expected = add(params_of(model), grad(params_of(model)), -LR)  # SGD(momentum) first step: w - lr g_0
    opt = build("gam", model, nonfinite="fallback")
    with pytest.warns(SAMFallbackWarning, match="at w \\+ e"):
        run(opt, model, 1, bomb=poison(call, float("inf")))
    close(params_of(model), expected)
    assert opt.nonfinite_counts == {"nonfinite_clean": 0, "nonfinite_perturbed": 1}


@pytest.mark.parametrize("variant, call", [("gam", 3), ("bsam", 2)])
def test_skip_policy_leaves_weights_and_state_alone_after_a_fault_at_a_later_point(variant, call):
    model = net()
    knobs = {"num_data": N_DATA} if variant == "bsam" else {}
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=LR), variant, model=model, nonfinite="skip", **knobs)
    run(opt, model, 1)
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    with pytest.warns(SAMFallbackWarning, match="skipped the update"):
        run(opt, model, 1, bomb=poison(call))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))
    after = opt.state_dict()
    for name, entries in state["sharpguard"]["buffers"].items():
        assert all(torch.equal(entries[i], after["sharpguard"]["buffers"][name][i]) for i in entries)


@pytest.mark.parametrize("variant", ["gam", "bsam"])
def test_a_non_finite_clean_gradient_writes_no_more_than_the_base_optimizer(variant):
    model = net()
    opt = build(variant, model, nonfinite="fallback")  # the fallback gives the base optimizer that gradient
    base_model = copy.deepcopy(model)
    base = torch.optim.SGD(base_model.parameters(), lr=LR, momentum=0.0 if variant == "bsam" else 0.9)
    loss_fn(base_model).backward()
    base_model[2].weight.grad[0, 1] = float("nan")
    base.step()
    with pytest.warns(SAMFallbackWarning, match="non-finite clean gradient"):
        run(opt, model, 1, bomb=poison(1))
    assert 0 < n_nonfinite(model.parameters()) <= n_nonfinite(base_model.parameters())
    assert n_nonfinite(t for s in opt.sam_state.values() for t in s.values()) == 0


def test_bsam_non_finite_perturbed_gradient_falls_back_and_keeps_its_state():
    model = net()
    opt = build("bsam", model, nonfinite="fallback")
    run(opt, model, 2)
    state = copy.deepcopy(opt.state_dict()["sharpguard"]["buffers"])
    seen = []

    def bomb(call, m):
        if call == 2:
            m[2].weight.grad[0, 1] = float("inf")

    start = params_of(model)
    with pytest.warns(SAMFallbackWarning, match="at w \\+ e"):
        seen = run(opt, model, 1, bomb=bomb)
    # the base SGD steps with the clean gradient (taken at theta + eps): theta - lr g
    close(params_of(model), add(start, grad(seen[0]), -LR))
    after = opt.state_dict()["sharpguard"]["buffers"]
    for name in ("s", "g_m"):
        assert all(torch.equal(state[name][i], after[name][i]) for i in state[name])


@pytest.mark.parametrize("variant, fail_at", [("gam", 1), ("gam", 2), ("gam", 3), ("gam", 4), ("bsam", 1), ("bsam", 2)])
def test_an_exception_in_any_pass_restores_weights_and_statistics_bitwise(variant, fail_at):
    """Weights come back bitwise; running statistics are those the clean pass left (none from a replay)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = build(variant, model)
    run(opt, model, 1)
    weights = params_of(model)
    reference = copy.deepcopy(model)
    calls, seen = [], []

    def closure():
        calls.append(1)
        seen.append(params_of(model))
        opt.zero_grad()
        loss_fn(model).backward()
        if len(calls) == fail_at:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), weights))
    with torch.no_grad():  # the clean forward alone, at the weights it saw (bSAM: theta + eps)
        for p, w in zip(reference.parameters(), seen[0]):
            p.copy_(w)
        reference(X)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), reference.buffers()))
    assert opt._step == 1  # the failed step did not count
    run(opt, model, 1)  # and the next step runs
    assert n_nonfinite(model.parameters()) == 0


@pytest.mark.parametrize("variant", ["gam", "bsam"])
def test_running_statistics_come_from_the_clean_pass_only(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    reference = copy.deepcopy(model)
    opt = build(variant, model)
    seen = run(opt, model, 1)
    # the clean forward, at the weights the clean pass saw, updates the statistics once
    with torch.no_grad():
        for p, w in zip(reference.parameters(), seen[0]):
            p.copy_(w)
        reference(X)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert torch.equal(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 1


# --------------------------------------------------------------------------------------------------
# resume, knobs, registry
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["gam", "bsam"])
def test_resume_is_bitwise_never_stopping(variant):
    straight = net()
    run(build(variant, straight), straight, 4)
    first = net()
    opt = build(variant, first)
    run(opt, first, 2)
    state = copy.deepcopy(opt.state_dict())
    if variant == "bsam":
        assert set(state["sharpguard"]["buffers"]) == {"s", "g_m"} and state["sharpguard"]["buffers"]["s"]
    resumed = net()
    resumed.load_state_dict(first.state_dict())
    opt2 = build(variant, resumed)
    opt2.load_state_dict(state)
    run(opt2, resumed, 2)
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters()))


def test_bad_settings_are_refused_in_one_sentence_before_anything_changes():
    params = list(net().parameters())
    cases = [
        (GAM, {"rho": -0.1}, "rho must be >= 0"),
        (GAM, {"rho_norm": -1.0}, "rho_norm must be >= 0"),
        (GAM, {"gamma": -0.1}, "gamma must be >= 0"),
        (GAM, {"beta1": float("nan")}, "beta1 must be a finite number"),
        (BSAM, {}, "needs num_data"),
        (BSAM, {"num_data": 0}, "num_data must be an integer >= 1"),
        (BSAM, {"num_data": 10.5}, "num_data must be an integer"),
        (BSAM, {"num_data": 10, "beta1": 1.0}, "beta1 must lie in \\[0, 1\\)"),
        (BSAM, {"num_data": 10, "beta2": -0.1}, "beta2 must lie in"),
        (BSAM, {"num_data": 10, "damping": 0.0}, "damping must be > 0"),
        (BSAM, {"num_data": 10, "s_init": 0.0}, "s_init must be > 0"),
        (BSAM, {"num_data": 10, "weight_decay": -1.0}, "weight_decay must be >= 0"),
        (BSAM, {"num_data": 10, "seed": -1}, "seed"),
        (BSAM, {"num_data": 10, "rho": float("inf")}, "rho must be a finite number"),
    ]
    for cls, knobs, match in cases:
        with pytest.raises(ConfigurationError, match=match):
            cls(params, torch.optim.SGD, lr=LR, **knobs)
    # bSAM computes its own update: a base optimizer with momentum, weight decay, or another rule is refused
    for base in (torch.optim.SGD(params, lr=LR, momentum=0.9), torch.optim.SGD(params, lr=LR, weight_decay=1e-4),
                 torch.optim.Adam(params, lr=LR)):
        hooks = dict(base._optimizer_step_post_hooks)
        with pytest.raises(ConfigurationError,
                           match="pass torch.optim.SGD\\(params, lr=<bSAM's step size>\\) with momentum=0"):
            make_sam(base, "bsam", num_data=10)
        assert base._optimizer_step_post_hooks == hooks and not base.state
    with pytest.raises(ConfigurationError, match="momentum=0"):
        BSAM(params, torch.optim.SGD, num_data=10, lr=LR, momentum=0.9)
    # and make_sam / every adapter say the same before any training object exists
    from sharpguard.optim import SAMConfig

    with pytest.raises(ConfigurationError, match="needs num_data"):
        SAMConfig(variant="bsam")
    # knobs assigned between steps follow the same rule; nothing changes on refusal
    opt = BSAM(params, num_data=10, lr=LR)
    with pytest.raises(ConfigurationError, match="beta2"):
        opt.beta2 = 1.0
    assert opt.beta2 == 0.999
    gam = GAM(params, torch.optim.SGD, lr=LR)
    with pytest.raises(ConfigurationError, match="rho_norm"):
        gam.rho_norm = float("nan")
    assert gam.rho_norm == 0.2


def test_bsam_needs_prepare_before_the_forward():
    model = net()
    opt = build("bsam", model)
    before = params_of(model)
    loss_fn(model).backward()
    with pytest.raises(ConfigurationError, match="call prepare\\(\\) before computing the loss"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


@pytest.mark.parametrize("name, cls", [("gam", GAM), ("GAM", GAM), ("bsam", BSAM), ("b-SAM", BSAM), ("b_sam", BSAM),
                                       ("bayesian-sam", BSAM)])
def test_make_sam_builds_them_by_name_and_they_are_exported(name, cls):
    model = net()
    knobs = {"num_data": N_DATA} if cls is BSAM else {}
    base = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0 if cls is BSAM else 0.9)
    opt = make_sam(base, name, model=model, **knobs)
    assert type(opt) is cls and sg.GAM is GAM and sg.BSAM is BSAM
    run(opt, model, 2)
    assert n_nonfinite(model.parameters()) == 0
    assert opt.knob_defaults() == cls.knob_defaults()


# --------------------------------------------------------------------------------------------------
# DDP: every point's gradient is all-reduced, the replicas stay identical
# --------------------------------------------------------------------------------------------------
def _ddp_shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)


def _ddp_steps(opt, model: nn.Module, batches) -> None:
    for x, y in batches:
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist
    from tests.helpers.distributed import process_group

    with process_group(rank, 2, port):
        for variant in ("gam", "bsam"):
            ddp = nn.parallel.DistributedDataParallel(net())
            _ddp_steps(build(variant, ddp), ddp, [_ddp_shard(rank, step) for step in range(3)])
            flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            assert torch.equal(gathered[0], gathered[1]), f"{variant}: replicas diverged"
            torch.save(flat, os.path.join(out_dir, f"{variant}_rank{rank}.pt"))


@pytest.mark.distributed
def test_ddp_runs_every_point_synchronised_and_equals_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes on 5 examples each against one process on the 10: the clean pass and the last
    replay of every point all-reduce (neither variant perturbs per worker), so the steps agree."""
    from tests.helpers.distributed import spawn

    spawn(_ddp_worker, str(tmp_path), nprocs=2)
    for variant in ("gam", "bsam"):
        model = net()
        batches = []
        for step in range(3):
            (x0, y0), (x1, y1) = _ddp_shard(0, step), _ddp_shard(1, step)
            batches.append((torch.cat([x0, x1]), torch.cat([y0, y1])))
        _ddp_steps(build(variant, model), model, batches)
        want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        got = torch.load(tmp_path / f"{variant}_rank0.pt", weights_only=True)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_engine_unscales_every_point_before_the_variant_reads_it():
    """Lightning's 16-mixed: the clean gradient arrives unscaled, each replay scaled by the loss scale.
    GAM mixes the gradients of all points, so each point must be unscaled before advance() reads it."""
    plain, scaled = net(), net()
    run(GAM(plain.parameters(), torch.optim.SGD, gamma=0.5, lr=LR), plain, 2)
    opt = GAM(scaled.parameters(), torch.optim.SGD, gamma=0.5, lr=LR)
    engine = SAMEngine(opt)
    for _ in range(2):
        opt.zero_grad()
        replay = lambda: (1024.0 * loss_fn(scaled)).backward()
        engine.record(replay, scaled)
        replay()
        for p in scaled.parameters():
            p.grad.div_(1024.0)  # what the framework does to the clean gradient before the step hook
        engine.finish(unscale=lambda grads: torch._foreach_div_(grads, 1024.0))
        opt.base_optimizer.step()
    close(params_of(scaled), params_of(plain), rtol=1e-12, atol=1e-14)


def test_sharded_training_refuses_them_in_one_sentence():
    from sharpguard.optim import SAMConfig

    for variant, knobs in (("bsam", {"num_data": N_DATA}),):
        base = torch.optim.SGD(net().parameters(), lr=LR)
        with pytest.raises(ConfigurationError,
                           match="sharded \\(FSDP\\) training supports variant 'sam', 'asam', 'gsam', "
                           "'looksam' or 'gam'"):
            SAMConfig(variant=variant, knobs=knobs).build(base, sharded=True)
        assert not base.state
