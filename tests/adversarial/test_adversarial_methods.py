"""Each training method's loss (and gradient) against a hand computation on a tiny float64 model;
declared costs against hook counts; the SAM closure; the factory; errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.adversarial import (
    AWP,
    FGM,
    MART,
    PGDAT,
    R3F,
    SMART,
    TRADES,
    DefensiveDistillation,
    EmbeddingPGD,
    FastAT,
    FreeLB,
    count_passes,
    make_method,
    sam_adversarial_closure,
)
from sharpguard.attacks import make_generator
from sharpguard.errors import ConfigurationError

EPS, ALPHA = 0.1, 0.03


def mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 4)]
    return nn.Sequential(*layers).double()


def image_data(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def grads_of(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def hand_pgd(model, x, y, objective, start, steps=5, eps=EPS, alpha=ALPHA):
    """Textbook signed-gradient PGD with projection then clamping; ``objective(logits)`` per batch."""
    u = start.clone()
    for _ in range(steps):
        u.requires_grad_(True)
        (g,) = torch.autograd.grad(objective(model(u)), u)
        u = u.detach() + alpha * g.sign()
        u = torch.min(torch.max(u, x - eps), x + eps).clamp(0, 1)
    return u.detach()


def assert_same_loss_and_grads(method_loss, hand_loss, model, rtol=1e-9):
    assert torch.allclose(method_loss.detach(), hand_loss.detach(), rtol=rtol, atol=1e-12)
    for a, b in zip(grads_of(method_loss, model), grads_of(hand_loss, model)):
        assert torch.allclose(a, b, rtol=max(rtol, 1e-9), atol=1e-10)


# ----------------------------------------------------------------------------- images
def test_pgd_at_loss_is_cross_entropy_at_hand_pgd_point():
    model, (x, y) = mlp(), image_data()
    method = PGDAT(EPS, ALPHA, 5, random_start=False)
    x_adv = hand_pgd(model, x, y, lambda z: F.cross_entropy(z, y, reduction="sum"), x)
    assert_same_loss_and_grads(method(model, (x, y)), F.cross_entropy(model(x_adv), y), model)


def test_pgd_at_random_start_draws_from_the_methods_generator():
    model, (x, y) = mlp(), image_data()
    method = PGDAT(EPS, ALPHA, 3, seed=11)
    noise = torch.empty_like(x).uniform_(-EPS, EPS, generator=make_generator("cpu", 11))
    x_adv = hand_pgd(model, x, y, lambda z: F.cross_entropy(z, y, reduction="sum"), (x + noise).clamp(0, 1), steps=3)
    assert_same_loss_and_grads(method(model, (x, y)), F.cross_entropy(model(x_adv), y), model)


def test_trades_loss_matches_hand_computation():
    model, (x, y) = mlp(), image_data()
    beta = 3.0
    method = TRADES(beta, EPS, ALPHA, 4, seed=2)
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    kl_sum = lambda z: (p_clean * (p_clean.log() - F.log_softmax(z, 1))).sum()  # noqa: E731
    start = x + 0.001 * torch.randn(x.shape, generator=make_generator("cpu", 2), dtype=x.dtype)
    x_adv = hand_pgd(model, x, y, kl_sum, torch.min(torch.max(start, x - EPS), x + EPS).clamp(0, 1), steps=4)
    clean, adv = model(x), model(x_adv)
    p = F.softmax(clean, 1)
    hand = F.cross_entropy(clean, y) + beta * (p * (p.log() - F.log_softmax(adv, 1))).sum(1).mean()
    assert_same_loss_and_grads(method(model, (x, y)), hand, model, rtol=1e-6)  # TRADES' KL runs in float32


def test_mart_loss_matches_the_paper_formula():
    model, (x, y) = mlp(), image_data()
    beta = 5.0
    method = MART(beta, EPS, ALPHA, 3, random_start=False)
    x_adv = hand_pgd(model, x, y, lambda z: F.cross_entropy(z, y, reduction="sum"), x, steps=3)
    p_adv, p_clean = F.softmax(model(x_adv), 1), F.softmax(model(x), 1)
    others = p_adv.masked_fill(F.one_hot(y, 4).bool(), -1.0).amax(1)
    bce = -p_adv.gather(1, y[:, None]).squeeze(1).log() - (1 - others).log()
    kl = (p_clean * (p_clean.log() - p_adv.log())).sum(1)
    hand = bce.mean() + beta * (kl * (1 - p_clean.gather(1, y[:, None]).squeeze(1))).mean()
    # the authors' code adds 1e-4 / 1e-12 / 1e-7 inside logs and weights: agreement to ~1e-3
    assert torch.allclose(method(model, (x, y)).detach().double(), hand.detach(), rtol=2e-3)


def test_fast_at_is_fgsm_with_random_start_and_step_one_and_a_quarter_eps():
    model, (x, y) = mlp(), image_data()
    method = FastAT(EPS, seed=4)
    noise = torch.empty_like(x).uniform_(-EPS, EPS, generator=make_generator("cpu", 4))
    x_adv = hand_pgd(model, x, y, lambda z: F.cross_entropy(z, y, reduction="sum"), (x + noise).clamp(0, 1),
                     steps=1, alpha=1.25 * EPS)
    assert method.cost == (2, 2)
    assert_same_loss_and_grads(method(model, (x, y)), F.cross_entropy(model(x_adv), y), model)


def test_awp_gradient_is_the_gradient_at_layerwise_perturbed_weights_and_weights_are_untouched():
    model, (x, y) = mlp(), image_data()
    gamma = 0.05
    method = AWP(PGDAT(EPS, ALPHA, 3, random_start=False), gamma=gamma)
    before = [p.detach().clone() for p in model.parameters()]
    loss = method(model, (x, y))
    # hand: x_adv at w, gradient of CE at x_adv, v_l = gamma ||w_l|| / ||g_l|| g_l for matrices only
    x_adv = hand_pgd(model, x, y, lambda z: F.cross_entropy(z, y, reduction="sum"), x, steps=3)
    g = grads_of(F.cross_entropy(model(x_adv), y), model)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, w, gl in zip(shifted.parameters(), model.parameters(), g):
            if w.dim() > 1:
                p.add_(gamma * w.norm() / gl.norm() * gl)
    hand = F.cross_entropy(shifted(x_adv), y)
    assert torch.allclose(loss.detach(), hand.detach(), rtol=1e-10)
    for a, b in zip(grads_of(loss, model), grads_of(hand, shifted)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_awp_freezes_bn_statistics_during_the_ascent_pass():
    model, (x, y) = mlp(bn=True).train(), image_data()
    gamma = 0.05
    twin = copy.deepcopy(model)
    method = AWP(PGDAT(EPS, ALPHA, 2, random_start=False), gamma=gamma)
    method(model, (x, y)).backward()
    # hand: the ascent gradient on a throw-away copy (the authors' proxy), then ONE training-mode
    # forward at w + v updates the statistics
    x_adv = PGDAT(EPS, ALPHA, 2, random_start=False).generate(twin, (x, y))
    proxy = copy.deepcopy(twin)
    g = grads_of(F.cross_entropy(proxy(x_adv), y), proxy)
    with torch.no_grad():
        for w, gl in zip(twin.parameters(), g):
            if w.dim() > 1:
                w.add_(gamma * w.norm() / gl.norm() * gl)
    twin(x_adv)
    assert int(model[1].num_batches_tracked) == 1
    assert torch.allclose(model[1].running_mean, twin[1].running_mean, rtol=1e-10)
    assert torch.allclose(model[1].running_var, twin[1].running_var, rtol=1e-10)


def test_attack_generation_leaves_bn_statistics_and_modes_alone():
    model, (x, y) = mlp(bn=True).train(), image_data()
    stats = model[1].running_mean.clone()
    x_adv = PGDAT(EPS, ALPHA, 3).generate(model, (x, y))
    assert torch.equal(model[1].running_mean, stats) and model.training and model[1].training
    assert ((x_adv - x).abs() <= EPS + 1e-12).all()


def test_defensive_distillation_losses():
    model, (x, y) = mlp(), image_data()
    teacher = mlp(seed=3)
    t = 10.0
    assert_same_loss_and_grads(DefensiveDistillation(t)(model, (x, y)), F.cross_entropy(model(x) / t, y), model,
                               rtol=1e-6)
    soft = F.softmax(teacher(x).detach() / t, 1)
    hand = -(soft * F.log_softmax(model(x) / t, 1)).sum(1).mean()
    assert_same_loss_and_grads(DefensiveDistillation(t, teacher)(model, (x, y)), hand, model, rtol=1e-6)


# ----------------------------------------------------------------------------- text
class TinyText(nn.Module):
    """Embedding -> masked mean -> tanh -> linear; returns a dict like a Hugging Face model."""

    def __init__(self, vocab: int = 20, dim: int = 5, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)
        self.double()

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def head_of(self, e, attention_mask):
        m = attention_mask[..., None].to(e.dtype)
        return self.head(torch.tanh((e * m).sum(1) / m.sum(1)))

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.head_of(self.emb(input_ids), attention_mask)
        return {"loss": None if labels is None else F.cross_entropy(logits, labels), "logits": logits}


def text_batch(labels: bool = True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = torch.randint(0, 3, (4,), generator=g)
    return out


def masked_unit(g, mask):
    g = g * mask[..., None]
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def hand_loss(model, batch, delta):
    logits = model.head_of(model.emb(batch["input_ids"]) + delta * batch["attention_mask"][..., None],
                           batch["attention_mask"])
    return F.cross_entropy(logits, batch["labels"]), logits


def test_fgm_matches_hand_computation_and_never_touches_the_embedding_matrix():
    model, batch = TinyText(), text_batch()
    weight = model.emb.weight.detach().clone()
    loss = FGM(eps=0.7)(model, batch)
    zero = torch.zeros(4, 6, 5, dtype=torch.float64, requires_grad=True)
    clean, _ = hand_loss(model, batch, zero)
    (g,) = torch.autograd.grad(clean, zero, retain_graph=True)
    hand = clean + hand_loss(model, batch, 0.7 * masked_unit(g, batch["attention_mask"]))[0]
    assert_same_loss_and_grads(loss, hand, model)
    assert torch.equal(model.emb.weight, weight)


def test_embedding_pgd_matches_hand_computation():
    model, batch = TinyText(), text_batch()
    eps, alpha, steps = 0.5, 0.3, 3
    loss = EmbeddingPGD(eps, alpha, steps)(model, batch)
    mask = batch["attention_mask"]
    zero = torch.zeros(4, 6, 5, dtype=torch.float64, requires_grad=True)
    clean, _ = hand_loss(model, batch, zero)
    delta = torch.zeros_like(zero)
    for t in range(steps):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(hand_loss(model, batch, d)[0], d)
        delta = delta + alpha * masked_unit(g, mask)
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
        delta = delta * torch.clamp(eps / n, max=1.0)
    hand = clean + hand_loss(model, batch, delta)[0]
    assert_same_loss_and_grads(loss, hand, model)


def test_freelb_backward_gives_the_average_of_the_k_ascent_gradients():
    model, batch = TinyText(), text_batch()
    k, lr, mag, max_norm = 3, 0.2, 0.1, 0.15
    loss = FreeLB(k, lr, mag, max_norm, seed=9)(model, batch)
    mask = batch["attention_mask"]
    # the authors' loop: (loss / K).backward() at every step accumulates the parameter gradients
    init = torch.rand((4, 6, 5), generator=make_generator("cpu", 9), dtype=torch.float32) * 2 - 1
    delta = (init * mask[..., None] * (mag / torch.sqrt(mask.sum(1) * 5.0)).view(-1, 1, 1)).double()
    reference = copy.deepcopy(model)
    losses = []
    for t in range(k):
        d = delta.clone().requires_grad_(True)
        step_loss = hand_loss(reference, batch, d)[0]
        (step_loss / k).backward()
        losses.append(step_loss.detach())
        delta = delta + lr * masked_unit(d.grad, mask)
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
        delta = delta * torch.where(n > max_norm, max_norm / n, torch.ones_like(n))
    assert torch.allclose(loss.detach(), torch.stack(losses).mean())
    loss.backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12)


def test_smart_matches_hand_computation_and_is_label_free():
    model = TinyText()
    eps, step, noise, weight = 1e-2, 1e-1, 1e-2, 2.0
    for labels in (True, False):
        batch = text_batch(labels)
        loss = SMART(weight, eps, step, noise, steps=1, seed=5)(model, batch)
        mask = batch["attention_mask"]
        m = mask[..., None].double()
        e = model.emb(batch["input_ids"])
        clean = model.head_of(e, mask)
        delta = noise * torch.randn((4, 6, 5), generator=make_generator("cpu", 5), dtype=torch.float32).double()
        d = delta.clone().requires_grad_(True)
        adv = model.head_of(e.detach() + d * m, mask)
        p = F.softmax(clean.detach(), 1)
        (g,) = torch.autograd.grad((p * (p.log() - F.log_softmax(adv, 1))).sum(), d)
        g = g * m
        delta = (delta + step * g / (g.abs().amax(-1, keepdim=True) + 1e-6)).clamp(-eps, eps)
        adv = model.head_of(e + delta * m, mask)
        lp, la = F.log_softmax(clean, 1), F.log_softmax(adv, 1)
        sym = ((lp.exp() * (lp - la)).sum() + (la.exp() * (la - lp)).sum()) / 4
        hand = weight * sym + (F.cross_entropy(clean, batch["labels"]) if labels else 0.0)
        assert_same_loss_and_grads(loss, hand, model, rtol=1e-5)  # KL in float32


def test_r3f_matches_hand_computation():
    model, batch = TinyText(), text_batch()
    eps = 1e-2
    loss = R3F(weight=1.5, eps=eps, seed=6)(model, batch)
    z = ((torch.rand((4, 6, 5), generator=make_generator("cpu", 6)) * 2 - 1) * eps).double()
    clean, lc = hand_loss(model, batch, torch.zeros(4, 6, 5, dtype=torch.float64))[0], None
    lp = F.log_softmax(hand_loss(model, batch, torch.zeros(4, 6, 5, dtype=torch.float64))[1], 1)
    la = F.log_softmax(hand_loss(model, batch, z)[1], 1)
    hand = clean + 1.5 * ((lp.exp() * (lp - la)).sum() + (la.exp() * (la - lp)).sum()) / 4
    assert_same_loss_and_grads(loss, hand, model, rtol=1e-5)


# ----------------------------------------------------------------------------- costs
VISION = [("pgd-at", {}), ("trades", {}), ("mart", {}), ("fast-at", {}), ("awp", {}), ("awp", {"base": "trades"}),
          ("defensive-distillation", {})]
TEXT = [("fgm", {}), ("embedding-pgd", {}), ("freelb", {}), ("smart", {}), ("r3f", {})]


@pytest.mark.parametrize("name, kw", VISION)
def test_declared_cost_equals_hook_count_vision(name, kw):
    model, (x, y) = mlp(bn=True).train(), image_data(16)
    method = make_method(name, **kw) if name in ("fast-at",
                                                 "defensive-distillation") else make_method(name, steps=4, **kw)
    with count_passes(model) as counted:
        method(model, (x, y)).backward()
    assert counted.as_tuple() == method.cost


@pytest.mark.parametrize("name, kw", TEXT)
def test_declared_cost_equals_hook_count_text(name, kw):
    model, batch = TinyText(), text_batch()
    method = make_method(name, **kw)
    with count_passes(model) as counted:
        method(model, batch).backward()
    assert counted.as_tuple() == method.cost


# ----------------------------------------------------------------------------- SAM + AT
def hand_sam_perturbation(params, rho, adaptive=False):
    """e of SAM (Foret et al. 2021, eq. 2) or ASAM with eta = 0 (Kwon et al. 2021, eq. 9), written out
    per tensor in float64 -- an independent reference, not the package's kernel."""
    grads = [p.grad.double() for p in params]
    if adaptive:
        t = [p.detach().double().abs() for p in params]
        norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
        return [(rho * ti * ti * g / norm).to(p.dtype) for ti, g, p in zip(t, grads, params)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    return [(rho * g / norm).to(p.dtype) for g, p in zip(grads, params)]


def sam_step_reference(model, closure, rho=0.05):
    """SAM by hand: closure at w, move to w + e, closure at w + e, put w back."""
    params = [p for p in model.parameters()]
    closure()
    e = hand_sam_perturbation(params, rho)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    for p in params:
        p.grad = None
    closure()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)


@pytest.mark.parametrize("reuse, expected", [(True, (12, 12)), (False, (22, 22))])
def test_sam_closure_reuses_the_adversarial_examples(reuse, expected):
    model, (x, y) = mlp(), image_data()
    method = PGDAT(EPS, ALPHA, 10, random_start=False)
    closure = sam_adversarial_closure(model, method, (x, y), reuse=reuse)
    with count_passes(model) as counted:
        sam_step_reference(model, closure)
    assert counted.as_tuple() == expected == method.sam_cost(reuse)


def test_sam_closure_second_pass_is_the_objective_at_the_cached_adversary():
    model, (x, y) = mlp(), image_data()
    method = PGDAT(EPS, ALPHA, 3, random_start=False)
    closure = sam_adversarial_closure(model, method, (x, y))
    first = closure()
    x_adv = method.generate(model, (x, y))
    with torch.no_grad():
        model[0].weight.add_(0.01)  # "w + e"
    second = closure()
    assert torch.allclose(first, F.cross_entropy(mlp()(x_adv), y))
    assert torch.allclose(second, F.cross_entropy(model(x_adv), y))


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_adversarial_step_with_sharpguard_sam_matches_the_kernel_reference(adaptive):
    import sharpguard.optim as optim
    from sharpguard.adversarial import sam_adversarial_step
    (x, y), method = image_data(), PGDAT(EPS, ALPHA, 5, random_start=False)
    model, reference = mlp(), mlp()
    opt = optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, adaptive=adaptive, lr=0.1)
    opt.zero_grad()
    with count_passes(model) as counted:
        loss = sam_adversarial_step(opt, model, method, (x, y))
    assert counted.as_tuple() == method.sam_cost(True) == (7, 7)
    # reference: x_adv at w, gradient at w + e of CE(x_adv), plain SGD step
    params = list(reference.parameters())
    x_adv = method.generate(reference, (x, y))
    F.cross_entropy(reference(x_adv), y).backward()
    e = hand_sam_perturbation(params, 0.05, adaptive=adaptive)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, ei in zip(params, e):
            p.add_(ei)
    reference.zero_grad()
    F.cross_entropy(reference(x_adv), y).backward()
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    torch.optim.SGD(params, lr=0.1).step()
    assert torch.allclose(loss, F.cross_entropy(mlp()(x_adv), y))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- factory & errors
def test_make_method_names_and_aliases():
    assert isinstance(make_method("PGD_AT"), PGDAT)
    assert isinstance(make_method("fgsm-rs"), FastAT)
    assert isinstance(make_method("FreeLB", steps=2), FreeLB)
    with pytest.raises(ConfigurationError, match="unknown adversarial method"):
        make_method("gradalign")
    with pytest.raises(ConfigurationError, match="trades"):
        make_method("trades", rho=1.0)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: PGDAT(eps=-1.0), "eps must be"),
        (lambda: PGDAT(steps=0), "steps must be"),
        (lambda: TRADES(beta=-1.0), "beta"),
        (lambda: FreeLB(steps=0), "steps must be"),
        (lambda: FGM(eps=-0.1), "eps must be"),
        (lambda: SMART(dropout="sometimes"), "dropout must be"),
        (lambda: AWP("fgm"), "AWP supports"),
        (lambda: DefensiveDistillation(temperature=0.0), "temperature"),
    ],
)
def test_bad_method_settings(factory, message):
    with pytest.raises(ConfigurationError, match=message):
        factory()


def test_wrong_batch_kinds_raise_clear_errors():
    with pytest.raises(ConfigurationError, match=r"\(inputs, labels\)"):
        PGDAT()(mlp(), text_batch())
    with pytest.raises(ConfigurationError, match="mapping batch"):
        FGM()(TinyText(), image_data())
    with pytest.raises(ConfigurationError, match="get_input_embeddings"):
        FGM()(mlp(), text_batch())


def test_image_methods_accept_inputs_normalized_outside_the_model():
    model, (x, y) = mlp(), image_data()
    mean, std = (0.5,), (0.25,)
    normalized = (x - 0.5) / 0.25
    method = PGDAT(EPS, ALPHA, 3, mean=mean, std=std)
    x_adv = method.generate(model, (normalized, y))
    pixels = x_adv * 0.25 + 0.5
    assert ((pixels - x).abs() <= EPS + 1e-9).all() and pixels.min() >= 0 and pixels.max() <= 1
    with pytest.raises(ConfigurationError, match="outside the declared bounds"):
        PGDAT(EPS, ALPHA, 3)(model, (normalized, y))  # forgot to declare the normalization
