"""WSAM, m-RWP / m-ARWP, ESAM (SWP) and Flat-LoRA (issue 14): each defining update against a float64
hand computation, the random perturbations against their declared distributions, WSAM against
pytorch_optimizer's WSAM, passes per step counted with hooks against ``cost``, knobs and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.optim import ARWP, ESAM, RWP, WSAM, FlatLoRA, make_sam

from tests.helpers.optim_lsq import B0, W0, X, Y, lsq_grad, lsq_loss, lsq_model, norm, weights

LR = 0.1


def add(a, b, s=1.0):
    return [x + s * y for x, y in zip(a, b)]


def scale(a, s):
    return [s * x for x in a]


def close(got, want, rtol=1e-11, atol=1e-13):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def run(opt, model, steps, loss_scale=1.0):
    """``steps`` SAM steps; returns the weights after each and the weights each closure call saw."""
    seen, after = [], []

    def closure():
        seen.append(weights(model))
        opt.zero_grad()
        loss = loss_scale * lsq_loss(model)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        after.append(weights(model))
    return after, seen


# --------------------------------------------------------------------------------------------------
# WSAM
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_update(decouple):
    rho, gamma, mu = 0.2, 0.8, 0.9
    alpha = gamma / (1 - gamma)
    model = lsq_model()
    opt = WSAM(model.parameters(), torch.optim.SGD, rho=rho, gamma=gamma, decouple=decouple, lr=LR, momentum=mu)
    history, _ = run(opt, model, 3)
    w, v = [W0, B0], None
    for got in history:
        g = lsq_grad(w)
        gs = lsq_grad(add(w, scale(g, rho / norm(g))))
        sharp = add(gs, g, -1.0)
        step_grad = g if decouple else add(g, sharp, alpha)  # decoupled: the base optimizer sees g only
        v = step_grad if v is None else add(scale(v, mu), step_grad)
        w = add(w, v, -LR)
        if decouple:
            w = add(w, sharp, -LR * alpha)  # applied after the base step, outside its momentum
        close(got, w)


def test_wsam_matches_pytorch_optimizer():
    from pytorch_optimizer import WSAM as ReferenceWSAM

    for decouple in (True, False):
        ours, ref = lsq_model(), lsq_model()
        opt = WSAM(ours.parameters(), torch.optim.SGD, rho=0.1, gamma=0.9, decouple=decouple, lr=LR, momentum=0.9)
        theirs = ReferenceWSAM(ref, ref.parameters(), torch.optim.SGD, rho=0.1, gamma=0.9, decouple=decouple,
                               lr=LR, momentum=0.9)
        run(opt, ours, 4)

        def closure():
            theirs.zero_grad()
            loss = lsq_loss(ref)
            loss.backward()
            return loss

        for _ in range(4):
            theirs.step(closure)
        # pytorch_optimizer takes ||g|| in float32 (utils/gradient.py: ``.float()``), hence 1e-7, not 1e-11
        close(weights(ours), weights(ref), rtol=1e-7, atol=1e-8)


def test_wsam_decoupled_term_follows_the_unscaling_of_the_gradient():
    """Two-step form with the loss multiplied by 1024 and the gradient unscaled before the base step
    (what a GradScaler does): the same weights as the unscaled run."""
    plain, scaled = lsq_model(), lsq_model()
    run(WSAM(plain.parameters(), torch.optim.SGD, rho=0.1, lr=LR), plain, 2)
    opt = WSAM(scaled.parameters(), torch.optim.SGD, rho=0.1, lr=LR)
    for _ in range(2):
        opt.zero_grad()
        opt.prepare()
        (1024.0 * lsq_loss(scaled)).backward()
        assert opt.first_step(zero_grad=True)
        (1024.0 * lsq_loss(scaled)).backward()
        opt.unperturb()
        for p in scaled.parameters():
            p.grad.div_(1024.0)
        opt.base_optimizer.step()
    close(weights(scaled), weights(plain), rtol=1e-12, atol=1e-14)


def test_wsam_with_a_non_finite_perturbed_gradient_takes_the_plain_step():
    """g~ = NaN: the base optimizer steps with the clean g and the decoupled term is dropped (no NaN)."""
    model = lsq_model()
    opt = WSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=LR, nonfinite="fallback")
    opt.prepare()
    lsq_loss(model).backward()
    assert opt.first_step(zero_grad=True)
    lsq_loss(model).backward()
    model.weight.grad[0, 0] = float("nan")
    opt.second_step()
    assert opt.nonfinite_counts["nonfinite_perturbed"] == 1
    close(weights(model), add([W0, B0], lsq_grad([W0, B0]), -LR))


# --------------------------------------------------------------------------------------------------
# random weight perturbation
# --------------------------------------------------------------------------------------------------
def test_rwp_update_mixes_the_clean_and_the_randomly_perturbed_gradient():
    sigma, lmbda = 0.05, 0.3
    model = lsq_model()
    opt = RWP(model.parameters(), torch.optim.SGD, sigma=sigma, lmbda=lmbda, lr=LR)
    history, seen = run(opt, model, 3)
    w = [W0, B0]
    for t, got in enumerate(history):
        close(seen[2 * t], w)  # the clean pass runs at w
        eps = add(seen[2 * t + 1], w, -1.0)
        assert all(np.abs(e).max() > 0 for e in eps)
        g, gp = lsq_grad(w), lsq_grad(seen[2 * t + 1])
        w = add(w, add(scale(gp, lmbda), scale(g, 1 - lmbda)), -LR)
        close(got, w)


def _standardised(eps, w, sigma):
    """RWP noise divided by its declared std: per row of the weight, the whole norm for the bias."""
    rows = np.linalg.norm(w[0], axis=1, keepdims=True)
    return np.concatenate([(eps[0] / (sigma * rows)).ravel(), eps[1] / (sigma * np.linalg.norm(w[1]))])


def test_rwp_noise_is_filter_wise_gaussian_and_independent_of_the_gradient():
    sigma = 0.02
    model = lsq_model()
    opt = RWP(model.parameters(), torch.optim.SGD, sigma=sigma, lr=0.0)  # lr 0: w stays W0, B0
    _, seen = run(opt, model, 400)
    z = np.concatenate([_standardised(add(seen[2 * t + 1], [W0, B0], -1.0), [W0, B0], sigma) for t in range(400)])
    assert abs(z.mean()) < 0.06 and abs(z.std() - 1.0) < 0.05  # 3200 draws of N(0, 1)
    # the perturbation does not look at the gradient: a 10x loss draws exactly the same noise
    other = lsq_model()
    _, seen10 = run(RWP(other.parameters(), torch.optim.SGD, sigma=sigma, lr=0.0), other, 3, loss_scale=10.0)
    for t in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(seen[2 * t + 1], seen10[2 * t + 1]))


def test_arwp_divides_the_noise_by_the_accumulated_squared_gradients():
    sigma, eta, beta = 0.05, 2.0, 0.7
    # the standard normal draw of step t depends on (seed, t) only: read it off RWP with lr = 0
    ref_model = lsq_model()
    _, ref_seen = run(RWP(ref_model.parameters(), torch.optim.SGD, sigma=sigma, lr=0.0), ref_model, 3)
    model = lsq_model()
    opt = ARWP(model.parameters(), torch.optim.SGD, sigma=sigma, eta=eta, beta=beta, lr=LR)
    history, seen = run(opt, model, 3)
    w, fisher = [W0, B0], [np.zeros_like(W0), np.zeros_like(B0)]
    for t, got in enumerate(history):
        z_ref = _standardised(add(ref_seen[2 * t + 1], [W0, B0], -1.0), [W0, B0], sigma)
        divisor = np.concatenate([
            np.repeat(np.sqrt(1 + eta * fisher[0].sum(axis=1)), W0.shape[1]),  # summed over the row
            np.sqrt(1 + eta * fisher[1]),  # 1-D: per element, as the paper's code
        ])
        eps = add(seen[2 * t + 1], w, -1.0)
        np.testing.assert_allclose(_standardised(eps, w, sigma) * divisor, z_ref, rtol=1e-9, atol=1e-12)
        g, gp = lsq_grad(w), lsq_grad(seen[2 * t + 1])
        fisher = [beta * f + q * q for f, q in zip(fisher, gp)]
        w = add(w, add(scale(gp, 0.5), scale(g, 0.5)), -LR)
        close(got, w)


def test_arwp_resumes_bitwise_with_its_accumulator_and_step():
    straight = lsq_model()
    run(ARWP(straight.parameters(), torch.optim.SGD, lr=LR, momentum=0.9), straight, 4)
    first = lsq_model()
    opt = ARWP(first.parameters(), torch.optim.SGD, lr=LR, momentum=0.9)
    run(opt, first, 2)
    state = opt.state_dict()
    assert state["sharpguard"]["buffers"]["fisher"]
    resumed = lsq_model()
    resumed.load_state_dict(first.state_dict())
    opt2 = ARWP(resumed.parameters(), torch.optim.SGD, lr=LR, momentum=0.9)
    opt2.load_state_dict(state)
    run(opt2, resumed, 2)
    assert all(np.array_equal(a, b) for a, b in zip(weights(resumed), weights(straight)))


# --------------------------------------------------------------------------------------------------
# ESAM (stochastic weight perturbation)
# --------------------------------------------------------------------------------------------------
def test_esam_perturbs_a_random_subset_by_rho_over_beta():
    rho, beta = 0.2, 0.6
    model = lsq_model()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=rho, beta=beta, lr=LR)
    history, seen = run(opt, model, 300)
    chosen = 0
    for t, got in enumerate(history):
        w = seen[2 * t]  # one step at a time from the weights the clean pass saw
        g = lsq_grad(w)
        eps = add(seen[2 * t + 1], w, -1.0)
        moved = [bool(np.abs(e).max() > 0) for e in eps]
        chosen += sum(moved)
        if any(moved):
            g_s = [x for x, m in zip(g, moved) if m]
            # rho / (||g_S|| + 1e-12): the kernel's guard (functional.perturbation_scale); g is small late on
            want = [rho / beta * x / (norm(g_s) + 1e-12) if m else np.zeros_like(x) for x, m in zip(g, moved)]
            close(eps, want, rtol=1e-9, atol=1e-15)
        close(got, add(w, lsq_grad(seen[2 * t + 1]), -LR))
    assert abs(chosen / 600 - beta) < 0.07  # Bernoulli(0.6) per tensor; std of the mean 0.02


def test_esam_with_beta_one_is_sam():
    sam_model, esam_model = lsq_model(), lsq_model()
    run(make_sam(torch.optim.SGD(sam_model.parameters(), lr=LR), "sam", rho=0.1), sam_model, 3)
    run(ESAM(esam_model.parameters(), torch.optim.SGD, rho=0.1, beta=1.0, lr=LR), esam_model, 3)
    close(weights(esam_model), weights(sam_model), rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# Flat-LoRA on a hand-built LoRA linear model (float64)
# --------------------------------------------------------------------------------------------------
class Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.proj(x)


def lora_model(r=2, lora_alpha=4):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["proj"]), Proj()).double()
    layer = model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.from_numpy(W0))
        layer.lora_B["default"].weight.normal_(0, 0.5)  # B = 0 at init would hide the merged norm
    return model, layer


def test_flat_lora_perturbs_the_merged_weight_before_the_single_forward():
    sigma = 0.1
    model, layer = lora_model()
    s = layer.scaling["default"]
    base = layer.base_layer.weight
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    opt = FlatLoRA([layer.lora_A["default"].weight, layer.lora_B["default"].weight], torch.optim.SGD,
                   sigma=sigma, model=model, lr=LR)
    seen, calls, zs = [], [], []

    def closure():
        calls.append(1)
        seen.append(base.detach().numpy().copy())
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    for t in range(200):
        A = layer.lora_A["default"].weight.detach().numpy().copy()
        B = layer.lora_B["default"].weight.detach().numpy().copy()
        opt.step(closure)
        assert len(calls) == t + 1  # one forward/backward per step
        assert np.array_equal(base.detach().numpy(), W0)  # the frozen weight is back, bitwise
        eps = seen[-1] - W0
        merged = W0 + s * B @ A
        zs.append(eps * np.sqrt(W0.shape[1]) / (sigma * np.linalg.norm(merged, axis=1, keepdims=True)))
        # the step: gradient of the loss at W + eps + s B A, through A and B only
        r = X @ (W0 + eps + s * B @ A).T - Y
        gm = r.T @ X / len(X)
        close([layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()],
              [A - LR * s * B.T @ gm, B - LR * s * gm @ A.T], rtol=1e-10, atol=1e-13)
    z = np.concatenate([a.ravel() for a in zs])
    assert abs(z.mean()) < 0.08 and abs(z.std() - 1.0) < 0.06  # 1200 draws of N(0, 1)
    assert opt.cost == (1.0, 1.0)


def test_flat_lora_needs_the_model_and_prepare():
    model, layer = lora_model()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    with pytest.raises(ConfigurationError, match="model="):
        FlatLoRA(params, torch.optim.SGD, lr=LR)
    opt = FlatLoRA(params, torch.optim.SGD, model=model, lr=LR)
    model(torch.from_numpy(X)).sum().backward()
    with pytest.raises(ConfigurationError, match="prepare"):
        opt.first_step()


# --------------------------------------------------------------------------------------------------
# passes per step, counted with hooks, against the declared cost
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["wsam", "rwp", "arwp", "esam", "flat_lora"])
def test_passes_per_step_match_the_declared_cost(variant):
    model = lsq_model()
    counts = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1))
    model.weight.register_hook(lambda g: counts.__setitem__("backward", counts["backward"] + 1))
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), variant, model=model)
    steps = 4
    run(opt, model, steps)
    assert (counts["forward"] / steps, counts["backward"] / steps) == opt.cost


# --------------------------------------------------------------------------------------------------
# knobs
# --------------------------------------------------------------------------------------------------
def test_bad_knobs_are_refused_in_one_sentence():
    params = list(lsq_model().parameters())
    cases = [
        (WSAM, {"gamma": 1.0}, "gamma must be < 1"),
        (WSAM, {"rho": -0.1}, "rho"),
        (RWP, {"sigma": -1.0}, "sigma"),
        (RWP, {"lmbda": 1.5}, "lmbda"),
        (ARWP, {"eta": -1.0}, "eta"),
        (RWP, {"seed": -1}, "seed"),
        (ESAM, {"beta": 0.0}, "beta"),
        (ESAM, {"beta": 1.5}, "beta"),
    ]
    for cls, knobs, match in cases:
        with pytest.raises(ConfigurationError, match=match):
            cls(params, torch.optim.SGD, lr=LR, **knobs)
    opt = RWP(params, torch.optim.SGD, lr=LR)
    with pytest.raises(ConfigurationError, match="sigma"):
        opt.sigma = float("nan")
    assert opt.sigma == 0.01


@pytest.mark.parametrize("name", ["wsam", "rwp", "m-RWP", "arwp", "m-ARWP", "esam", "swp", "Flat-LoRA"])
def test_make_sam_builds_every_new_variant_by_name(name):
    model = lsq_model()
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), name, model=model)
    run(opt, model, 2)
    assert all(np.isfinite(w).all() for w in weights(model))


# --------------------------------------------------------------------------------------------------
# MESA (a loss term with an EMA teacher)
# --------------------------------------------------------------------------------------------------
def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def test_mesa_term_gradient_and_teacher_update():
    from sharpguard.optim import MESA

    weight, tau, decay = 0.7, 2.0, 0.5
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.integers(0, 3, size=6)
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(W))
        model.bias.copy_(torch.from_numpy(b))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    mesa = MESA(model, opt, weight=weight, temperature=tau, decay=decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    T, c = W.copy(), b.copy()  # the teacher starts as the model
    for _ in range(3):
        opt.zero_grad()
        out = model(xt)
        loss = nn.functional.cross_entropy(out, yt) + mesa(out, xt)
        loss.backward()
        opt.step()
        s, t = x @ W.T + b, x @ T.T + c
        p, q = _softmax(t / tau), _softmax(s / tau)
        term = weight * tau * tau * (p * (np.log(p) - np.log(q))).sum(-1).mean()
        assert abs(term - float(loss.detach() - nn.functional.cross_entropy(out, yt).detach())) < 1e-12
        g = (_softmax(s) - np.eye(3)[y]) / len(x) + weight * tau * (q - p) / len(x)  # d loss / d logits
        W, b = W - LR * g.T @ x, b - LR * g.sum(0)
        T, c = decay * T + (1 - decay) * W, decay * c + (1 - decay) * b  # after the step (post-hook)
        close(weights(model), [W, b])
        close([mesa.teacher.weight.detach().numpy(), mesa.teacher.bias.detach().numpy()], [T, c])
    assert mesa.steps == 3


def test_mesa_waits_for_start_step_and_refuses_bad_settings():
    from sharpguard.optim import MESA

    model = lsq_model()
    mesa = MESA(model, weight=1.0, start_step=2)
    out = model(torch.from_numpy(X))
    assert float(mesa(out, torch.from_numpy(X))) == 0.0
    with pytest.raises(ConfigurationError, match="temperature"):
        MESA(model, temperature=0.0)
    with pytest.raises(ConfigurationError, match="decay"):
        MESA(model, decay=1.5)
    with pytest.raises(ConfigurationError, match="logits"):
        mesa.output_fn(("no logits",))  # a model output without logits


def test_mesa_in_lightning_trains_like_plain_pytorch():
    """The term is a plain loss term and the teacher follows the optimizer's steps: a LightningModule that
    adds it to its loss (attach in on_fit_start) trains to the same weights as a hand-written loop."""
    from sharpguard.integrations._lightning_namespace import pl
    from sharpguard.optim import MESA

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(24, 4))).float()
    y = torch.from_numpy(rng.integers(0, 3, size=24))

    def fresh():
        torch.manual_seed(0)
        return nn.Linear(4, 3)

    plain = fresh()
    opt = torch.optim.SGD(plain.parameters(), lr=LR)
    mesa = MESA(plain, opt, decay=0.5)
    for i in range(0, 24, 8):
        opt.zero_grad()
        out = plain(x[i : i + 8])
        (nn.functional.cross_entropy(out, y[i : i + 8]) + mesa(out, x[i : i + 8])).backward()
        opt.step()

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = fresh()
            self.mesa = MESA(self.net, decay=0.5)

        def on_fit_start(self) -> None:
            self.mesa.attach(self.trainer.optimizers[0])

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            out = self.net(xb)
            return nn.functional.cross_entropy(out, yb) + self.mesa(out, xb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=LR)

    lit = Lit()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    assert lit.mesa.steps == 3
    for a, b in zip(lit.net.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
