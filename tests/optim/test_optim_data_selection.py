"""ESAM's sharpness-sensitive data selection (Du et al., ICLR 2022, Sec. 3.2) as a loss reducer.

The defining update is written here by hand (float64, torch.autograd on explicit tensors, none of
the package's code): the SDS step is the base step with the gradient at ``w + e`` of the mean loss
over exactly the examples whose loss rose most. Then: passes counted by hooks, the backward flowing
from the selected examples only, gamma = 1 is plain SAM bitwise, the four front ends agree with
gradient accumulation 2, and bad inputs are refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.optim import SAM, _phase, make_sam
from sharpguard.optim.data_selection import DEFAULT_GAMMA, SharpnessDataSelection
from tests.helpers import front_ends

RHO, LR = 0.5, 0.1


def problem(n: int = 10, d: int = 5, c: int = 3, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    w = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
    return x, y, w, b


def hand_sds_step(x, y, w, b, gamma: float) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One SGD step (no momentum) with ESAM's SDS gradient, by hand."""
    w0, b0 = w.clone().requires_grad_(), b.clone().requires_grad_()
    clean = F.cross_entropy(x @ w0.T + b0, y, reduction="none")
    gw, gb = torch.autograd.grad(clean.mean(), (w0, b0))
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    w1 = (w + RHO * gw / norm).requires_grad_()
    b1 = (b + RHO * gb / norm).requires_grad_()
    perturbed = F.cross_entropy(x @ w1.T + b1, y, reduction="none")
    rise = (perturbed - clean).detach().tolist()
    k = int(gamma * len(rise))
    chosen = sorted(range(len(rise)), key=lambda i: -rise[i])[:k]  # Python's sort is stable
    loss = sum(perturbed[i] for i in chosen) / k
    hw, hb = torch.autograd.grad(loss, (w1, b1))
    return w - LR * hw, b - LR * hb, sorted(chosen)


def linear(w, b) -> nn.Linear:
    m = nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def sam_step(model: nn.Module, x, y, reduce, opt=None) -> SAM:
    opt = opt or SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)

    def closure():
        loss = reduce(F.cross_entropy(model(x), y, reduction="none"))
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)
    return opt


@pytest.mark.parametrize("gamma", [0.5, 0.3, 0.8])
def test_the_sds_step_is_the_gradient_at_w_plus_e_of_the_mean_over_the_hand_selected_examples(gamma):
    x, y, w, b = problem()
    want_w, want_b, chosen = hand_sds_step(x, y, w, b, gamma)
    model = linear(w, b)
    sds = SharpnessDataSelection(gamma)
    sam_step(model, x, y, sds)
    assert sorted(sds.last_selected.tolist()) == chosen
    assert len(chosen) == int(gamma * len(x))
    torch.testing.assert_close(model.weight.detach(), want_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), want_b, rtol=0, atol=1e-12)
    assert sds.counts == {"clean": 1, "selected": 1, "plain": 0}
    # and it is not plain SAM: the selection changed the step
    plain = linear(w, b)
    sam_step(plain, x, y, lambda losses: losses.mean())
    assert (plain.weight.detach() - want_w).abs().max() > 1e-4


def test_hooks_count_two_passes_and_the_backward_flows_from_the_selected_examples_only():
    x, y, w, b = problem()
    model = linear(w, b)
    forwards, logit_grads = [], []

    def on_forward(module, inputs, output):
        forwards.append(_phase.current_pass().kind)
        output.register_hook(lambda g: logit_grads.append(g.detach().clone()))

    model.register_forward_hook(on_forward)
    sds = SharpnessDataSelection(0.5)
    sam_step(model, x, y, sds)
    assert forwards == ["clean", "perturbed"]
    clean_grad, perturbed_grad = logit_grads
    assert (clean_grad.abs().sum(1) > 0).all()  # the clean pass: every example
    rows = perturbed_grad.abs().sum(1) > 0
    assert rows.nonzero().flatten().tolist() == sorted(sds.last_selected.tolist())
    assert int(rows.sum()) == 5


def test_gamma_one_is_plain_sam_bitwise():
    x, y, w, b = problem(n=12)
    a, c = linear(w, b), linear(w, b)
    opt_a = opt_c = None
    sds = SharpnessDataSelection(1.0)
    for _ in range(3):
        opt_a = sam_step(a, x, y, sds, opt_a)
        opt_c = sam_step(c, x, y, lambda losses: losses.mean(), opt_c)
    assert torch.equal(a.weight, c.weight) and torch.equal(a.bias, c.bias)
    assert sds.counts["selected"] == 3


def test_default_gamma_and_kept_count():
    assert SharpnessDataSelection().gamma == DEFAULT_GAMMA == 0.5
    sds = SharpnessDataSelection(0.3)
    assert [sds.kept(n) for n in (1, 3, 10, 100)] == [1, 1, 3, 30]
    assert SharpnessDataSelection(0.29).kept(100) == 29  # 0.29 * 100 is 28.999... in floating point


def test_ties_go_to_the_earlier_example():
    # identical examples: identical rises; the stable sort keeps the first ones
    x, y, w, b = problem(n=4)
    x = x[:1].repeat(6, 1)
    y = y[:1].repeat(6)
    sds = SharpnessDataSelection(0.5)
    sam_step(linear(w, b), x, y, sds)
    assert sds.last_selected.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------ when it cannot act
def test_outside_a_sam_step_it_is_the_plain_mean_and_says_so_once():
    x, y, w, b = problem()
    model = linear(w, b)
    sds = SharpnessDataSelection(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.warns(UserWarning, match="outside any SAM step"):
        loss = sds(F.cross_entropy(model(x), y, reduction="none"))
    assert torch.equal(loss, F.cross_entropy(model(x), y, reduction="none").mean())
    loss.backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        sds(F.cross_entropy(model(x), y, reduction="none"))
    assert sds.counts["plain"] == 2


def test_evaluation_without_gradients_is_the_plain_mean_and_silent():
    x, y, w, b = problem()
    model = linear(w, b)
    sds = SharpnessDataSelection(0.5)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        loss = sds(F.cross_entropy(model(x), y, reduction="none"))
    assert torch.equal(loss, F.cross_entropy(model(x), y, reduction="none").mean())


def test_an_evaluation_inside_an_open_step_is_the_plain_mean_and_leaves_the_step_alone():
    """Lightning may validate between the micro-batches of a window: no_grad calls are plain and
    neither record nor disturb the pairing of the step's own calls."""
    x, y, w, b = problem()
    want_w, _, chosen = hand_sds_step(x, y, w, b, 0.5)
    model = linear(w, b)
    sds = SharpnessDataSelection(0.5)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    calls = []

    def closure():
        loss = sds(F.cross_entropy(model(x), y, reduction="none"))
        loss.backward()
        if not calls:
            with torch.no_grad():
                calls.append(sds(F.cross_entropy(model(x[:3]), y[:3], reduction="none")))
        return loss

    opt.step(closure)
    assert sds.counts == {"clean": 1, "selected": 1, "plain": 1}
    assert sorted(sds.last_selected.tolist()) == chosen
    torch.testing.assert_close(model.weight.detach(), want_w, rtol=0, atol=1e-12)


def test_the_two_step_form_says_it_selects_nothing():
    x, y, w, b = problem()
    model = linear(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sds = SharpnessDataSelection(0.5)
    with pytest.warns(UserWarning, match="first_step"):
        sds(F.cross_entropy(model(x), y, reduction="none")).backward()
    opt.first_step(zero_grad=True)
    sds(F.cross_entropy(model(x), y, reduction="none")).backward()
    opt.second_step(zero_grad=True)
    assert sds.counts == {"clean": 0, "selected": 0, "plain": 2}


def test_steps_without_a_perturbed_pass_are_plain_and_never_any_is_said_once():
    sds = SharpnessDataSelection(0.5)
    losses = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def steps(n: int) -> list[bool]:
        same = []
        for _ in range(n):
            _phase.set_pass(_phase.Pass("clean", _phase.new_window(), 0))
            try:
                same.append(torch.equal(sds(losses), losses.mean()))
            finally:
                _phase.set_pass(None)
        return same

    with pytest.warns(UserWarning, match="no perturbed pass"):
        same = steps(12)
    assert all(same)
    assert sds.counts == {"clean": 12, "selected": 0, "plain": 0}


def test_looksam_reuse_steps_are_plain_and_selection_resumes_on_perturbed_steps():
    x, y, w, b = problem()
    model = linear(w, b)
    opt = make_sam(torch.optim.SGD(model.parameters(), lr=LR), "looksam", rho=RHO, k=3)
    sds = SharpnessDataSelection(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            sam_step(model, x, y, sds, opt)
    assert sds.counts == {"clean": 6, "selected": 2, "plain": 0}  # steps 0 and 3 perturb


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("gamma", [0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_bad_gamma_is_refused(gamma):
    with pytest.raises(ConfigurationError, match="gamma"):
        SharpnessDataSelection(gamma)


@pytest.mark.parametrize(
    "losses", [torch.tensor(1.0), torch.ones(2, 3), torch.ones(0), torch.ones(4, dtype=torch.long), [1.0, 2.0]]
)
def test_anything_but_per_example_losses_is_refused(losses):
    with pytest.raises(ConfigurationError, match="per-example losses|floating-point"):
        SharpnessDataSelection()(losses)


def test_a_replay_with_another_batch_size_is_refused_and_the_weights_restored():
    x, y, w, b = problem()
    model = linear(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sds = SharpnessDataSelection(0.5)
    calls = []

    def closure():
        n = 10 if not calls else 7
        calls.append(n)
        loss = sds(F.cross_entropy(model(x[:n]), y[:n], reduction="none"))
        loss.backward()
        return loss

    with pytest.raises(ConfigurationError, match="7 per-example losses at w \\+ e but 10 at w"):
        opt.step(closure)
    assert torch.equal(model.weight.detach(), w) and torch.equal(model.bias.detach(), b)


def test_a_perturbed_call_without_a_clean_one_is_refused():
    x, y, w, b = problem()
    model = linear(w, b)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    sds = SharpnessDataSelection(0.5)
    calls = []

    def closure():
        calls.append(1)
        losses = F.cross_entropy(model(x), y, reduction="none")
        loss = sds(losses) if len(calls) > 1 else losses.mean()
        loss.backward()
        return loss

    with pytest.raises(ConfigurationError, match="no matching call in its clean pass"):
        opt.step(closure)


# ------------------------------------------------------------------------------- four front ends
STEPS, GA, MB = 4, 2, 8
OPTIMIZER = {"lr": 0.1, "momentum": 0.9}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int = STEPS * GA * MB) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Data(), batch_size=MB, shuffle=False)


def per_example(net: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(net(batch["x"]), batch["labels"], reduction="none")


def run_plain(variant: str, net: Net, sds) -> None:
    opt = make_sam(torch.optim.SGD(net.parameters(), **OPTIMIZER), variant, model=net)
    front_ends.run_plain(opt, net, list(loader()), GA, steps=STEPS, loss_fn=lambda m, mb,
                         epoch: sds(per_example(m, mb)))


def run_lightning(variant: str, net: Net, sds) -> None:
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    front_ends.run_lightning(net, lambda m: torch.optim.SGD(m.parameters(), **OPTIMIZER), loader(),
                             SharpnessAwareMinimization(variant=variant), GA, max_steps=STEPS,
                             loss_fn=lambda m, batch, epoch: sds(per_example(m, batch)))


def run_hf(variant: str, net: Net, sds, tmp_path) -> None:
    front_ends.run_hf(net, torch.optim.SGD(net.parameters(), **OPTIMIZER), Data(), tmp_path, {"variant": variant},
                      micro_batch=MB, lr=OPTIMIZER["lr"], accumulation=GA, max_steps=STEPS,
                      loss_fn=lambda m, batch, epoch: sds(per_example(m, batch)))


def run_accelerate(variant: str, net: Net, sds) -> None:
    front_ends.run_accelerate(net, torch.optim.SGD(net.parameters(), **OPTIMIZER), loader(), {"variant": variant}, GA,
                              loss_fn=lambda m, batch, epoch: sds(per_example(m, batch)))


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@pytest.mark.parametrize("variant", ["sam", "esam", "looksam", "gam"])
def test_sds_trains_to_the_same_weights_in_every_front_end(variant, tmp_path, _fresh_accelerate_state):
    runs = {}
    for name in ("plain", "lightning", "hf", "accelerate"):
        net, sds = Net(), SharpnessDataSelection(0.5)
        if name == "plain":
            run_plain(variant, net, sds)
        elif name == "lightning":
            run_lightning(variant, net, sds)
        elif name == "hf":
            run_hf(variant, net, sds, tmp_path)
        else:
            run_accelerate(variant, net, sds)
        runs[name] = (flat(net), dict(sds.counts))
    reference, counts = runs["plain"]
    # LookSAM (k = 5) perturbs on step 0 only; GAM replays at three points per step, each selecting
    replays = {"looksam": 1, "gam": 3 * STEPS}.get(variant, STEPS)
    assert counts == {"clean": STEPS * GA, "selected": replays * GA, "plain": 0}
    # SDS changed the trajectory: plain SAM differs
    plain_sam = Net()
    run_plain(variant, plain_sam, lambda losses: losses.mean())
    assert float((flat(plain_sam) - reference).abs().max() / reference.abs().max()) > 1e-5
    for name in ("lightning", "hf", "accelerate"):
        got, got_counts = runs[name]
        assert got_counts == counts, name
        assert float((got - reference).abs().max() / reference.abs().max()) <= 1e-5, name
