"""Free-AT and GradAlign: float64 hand computations of their defining updates, pass counts against the
declared cost, BatchNorm statistics, the factory, and Free-AT driven by the Lightning callback."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.adversarial import FreeAT, GradAlign, count_passes, grad_align_cosine, make_method
from sharpguard.attacks import make_generator
from sharpguard.errors import ConfigurationError

EPS = 0.1


def mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def data(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ----------------------------------------------------------------------------- Free-AT
def free_at_reference(model, batches, replays, eps, lr):
    """Algorithm 1 of Shafahi et al. (2019) with x + delta kept in [0, 1], written out on its own."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    delta = torch.zeros_like(batches[0][0])
    for x, y in batches:
        for _ in range(replays):
            delta = (x + delta).clamp(0, 1) - x  # the input stays an image
            d = delta.clone().requires_grad_(True)
            opt.zero_grad()
            F.cross_entropy(model(x + d), y).backward()
            delta = (delta + eps * d.grad.sign()).clamp(-eps, eps)  # line 9, step eps
            opt.step()
    return model


@pytest.mark.parametrize("replays", [1, 3])
def test_free_at_is_algorithm_1_when_the_loop_replays_and_carries_delta_across_batches(replays):
    batches = [data(8, s) for s in range(3)]
    reference = free_at_reference(mlp(), batches, replays, EPS, 0.5)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    method = make_method("free-at", eps=EPS)
    for batch in batches:
        for _ in range(replays):
            opt.zero_grad()
            method(model, batch).backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    assert method._delta.abs().max() <= EPS and method._delta.abs().max() > 0


def test_free_at_delta_update_by_hand_and_batch_size_changes():
    model, (x, y) = mlp(), data(8)
    method = FreeAT(eps=EPS, alpha=0.03)
    method(model, (x, y)).backward()
    g = method._delta.grad.clone()
    x2, y2 = data(5, seed=4)
    loss = method(model, (x2, y2))
    expected = ((g.sign() * 0.03).clamp(-EPS, EPS)[:5] + x2).clamp(0, 1) - x2  # step, cut to 5 rows, box
    assert torch.allclose(method._delta, expected, atol=1e-15)
    assert torch.allclose(loss, F.cross_entropy(model(x2 + expected), y2))
    loss.backward()
    method._delta.grad.fill_(float("nan"))  # an overflowed step: delta does not move
    before = method._delta.detach().clone()
    x3 = torch.cat([x2, data(3, seed=5)[0]])
    method(model, (x3, torch.cat([y2, y2[:3]])))
    assert torch.equal(method._delta[:5], ((before + x3[:5]).clamp(0, 1) - x3[:5]))
    assert torch.equal(method._delta[5:], torch.zeros(3, 6, dtype=torch.float64))  # padded with zeros


def test_free_at_costs_one_forward_and_one_backward():
    model, batch = mlp(bn=True).train(), data(16)
    method = make_method("free-at")
    for _ in range(2):
        with count_passes(model) as counted:
            method(model, batch).backward()
        assert counted.as_tuple() == method.cost == (1, 1)


# ----------------------------------------------------------------------------- GradAlign
def hand_input_gradients(W1, b1, W2, b2, u, y):
    """d mean_i CE(W2 tanh(W1 u_i + b1) + b2, y_i) / d u, in numpy float64."""
    h = np.tanh(u @ W1.T + b1)
    z = h @ W2.T + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return ((p @ W2) * (1 - h**2)) @ W1 / len(y)


def hand_grad_align_loss(params, x, x_adv, eta, y, lam, eps):
    W1, b1, W2, b2 = params
    h = np.tanh(x_adv @ W1.T + b1)
    z = h @ W2.T + b2
    ce = np.mean(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(y)), y])
    g1 = hand_input_gradients(W1, b1, W2, b2, x, y)
    g2 = hand_input_gradients(W1, b1, W2, b2, np.clip(x + eta, 0, 1), y)
    cos = (g1 * g2).sum(1) / (np.linalg.norm(g1, axis=1) * np.linalg.norm(g2, axis=1))
    return ce + lam * (1 - cos.mean())


def test_grad_align_loss_and_gradient_match_a_float64_hand_computation():
    """Eq. 6 by hand (numpy), its parameter gradient by central finite differences: the double backward is right."""
    model, (x, y) = mlp(), data(6)
    lam, seed = 0.7, 3
    method = GradAlign(eps=EPS, lam=lam, seed=seed)
    loss = method(model, (x, y))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # FGSM from x with step eps (zero init), then the uniform eta drawn from the method's generator
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    x_adv = (x + EPS * gx.sign()).clamp(0, 1).numpy()
    eta = torch.empty(x.shape, dtype=torch.float64).uniform_(-EPS, EPS, generator=make_generator("cpu", seed)).numpy()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    hand = hand_grad_align_loss(params, x.numpy(), x_adv, eta, y.numpy(), lam, EPS)
    assert abs(float(loss.detach()) - hand) < 1e-12
    h = 1e-6
    for k, (p, g) in enumerate(zip(params, grads)):
        fd = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            plus, minus = [q.copy() for q in params], [q.copy() for q in params]
            plus[k][idx] += h
            minus[k][idx] -= h
            fd[idx] = (hand_grad_align_loss(plus, x.numpy(), x_adv, eta, y.numpy(), lam, EPS)
                       - hand_grad_align_loss(minus, x.numpy(), x_adv, eta, y.numpy(), lam, EPS)) / (2 * h)
        assert np.allclose(g.numpy(), fd, rtol=1e-6, atol=1e-8)


def test_grad_align_with_lambda_zero_is_fgsm_training_and_the_cosine_skips_zero_gradients():
    model, (x, y) = mlp(), data(6)
    loss = GradAlign(eps=EPS, lam=0.0)(model, (x, y))
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    assert torch.allclose(loss, F.cross_entropy(model((x + EPS * gx.sign()).clamp(0, 1)), y), rtol=1e-12)
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(grad_align_cosine(a, b), torch.tensor(2**-0.5))  # rows 2 and 3 have a zero gradient
    assert float(grad_align_cosine(torch.zeros(2, 3), torch.ones(2, 3))) == 1.0  # nothing to align: no penalty


def test_grad_align_cost_and_batchnorm_statistics_updated_by_the_training_forward_only():
    model, batch = mlp(bn=True).train(), data(16)
    twin = copy.deepcopy(model)
    method = make_method("grad-align", seed=0)
    with count_passes(model) as counted:
        method(model, batch).backward()
    assert counted.as_tuple() == method.cost == (4, 6)
    x_adv = GradAlign(eps=8 / 255, seed=0).generate(twin, batch)
    twin(x_adv)  # the one training forward
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


def test_factory_names_and_bad_settings():
    assert isinstance(make_method("FreeAT"), FreeAT) and isinstance(make_method("grad_align", lam=0.5), GradAlign)
    assert make_method("fgsm-grad-align").lam == 0.2 and make_method("free").alpha == pytest.approx(8 / 255)
    with pytest.raises(ConfigurationError, match="lam"):
        GradAlign(lam=-1.0)
    with pytest.raises(ConfigurationError, match="norm must be one of"):
        FreeAT(norm="l2")
    with pytest.raises(ConfigurationError, match=r"labels must be class indices in \[0, 3\)"):
        make_method("free-at")(mlp(), (data(4)[0], torch.tensor([0, 1, 2, 3])))


# ----------------------------------------------------------------------------- Lightning drives Free-AT
@pytest.mark.parametrize("name, settings",
                         [("free-at", {"eps": EPS}), ("grad-align", {"eps": EPS, "lam": 0.5, "seed": 1})])
def test_lightning_adversarial_training_callback_drives_the_method_like_a_plain_loop(tmp_path, name, settings):
    """The callback's gradient-replacement path back-propagates method(model, batch): Free-AT's carried
    delta and GradAlign's double backward follow the same sequence as in a plain loop, and so do the weights."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sharpguard.integrations.lightning import AdversarialTraining

    batches = [data(8, s) for s in range(4)]
    loader = DataLoader(TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
                        batch_size=8, shuffle=False)

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    lit = Lit()
    pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
               callbacks=[AdversarialTraining(name, **settings)]).fit(lit, loader)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    method = make_method(name, **settings)
    for batch in batches:
        opt.zero_grad()
        method(model, batch).backward()
        opt.step()
    for p, q in zip(lit.net.parameters(), model.parameters()):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)
    if name == "free-at":
        reference = free_at_reference(mlp(), batches, 1, EPS, 0.5)  # and both are Algorithm 1 with m = 1
        for p, q in zip(reference.parameters(), model.parameters()):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- the HF trainer drives Free-AT
def test_hf_trainer_drives_free_at_in_embedding_space(tmp_path):
    """SharpGuardTrainer(adversarial="free-at"): each optimizer step is the gradient of method(model, batch),
    the embedding-space delta carried from one batch to the next (an SGD reference on the same batches)."""
    from tests.helpers.tiny_text import FirstTokenTask, params_of, tiny_bert, trainer_args

    from sharpguard.integrations.huggingface import SharpGuardTrainer

    class Recording(SharpGuardTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, *args, **kwargs)

    settings = {"method": "free-at", "eps": 0.05, "alpha": 0.05}
    model = tiny_bert()
    trainer = Recording(
        model=model,
        args=trainer_args(tmp_path, max_steps=3, learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0),
        train_dataset=FirstTokenTask(32),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None),
        adversarial=settings,
    )
    trainer.seen = []
    trainer.train()
    reference = tiny_bert()
    reference.train()
    method = make_method("free-at", eps=0.05, alpha=0.05)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for batch in trainer.seen:
        opt.zero_grad()
        method(reference, batch).backward()
        opt.step()
    assert float(method._delta.detach().abs().max()) == pytest.approx(0.05)  # the carried delta moved
    got, want = params_of(trainer.model), params_of(reference)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    plain = tiny_bert()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for batch in trainer.seen:
        plain_opt.zero_grad()
        plain(**batch).loss.backward()
        plain_opt.step()
    assert any(not torch.allclose(got[k], params_of(plain)[k], atol=1e-7) for k in got)  # not plain training
