"""SAF (Du et al., NeurIPS 2022, eq. 5): the trajectory loss on outputs stored per training example.

The defining term is written here by hand (float64, torch.autograd, none of the package's code):
lambda * tau^2 * mean_i KL(softmax(z_i^(e - E~) / tau) || softmax(z_i / tau)) with z_i^(e - E~) the
logits the model gave example i E~ epochs earlier. Then: no extra pass (hooks), SAM's perturbed pass
reads but does not store, resume is bitwise, bad inputs are refused before anything changes.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.optim import SAM
from sharpguard.optim.saf import SAF
from tests.helpers import front_ends

N, D, C, MB, LR = 12, 5, 4, 4, 0.2


def data(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C)).double()


def order(epoch: int) -> torch.Tensor:
    """A different shuffle every epoch, so the stored rows must follow the indices, not the positions."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))


def hand_term(logits: torch.Tensor, past: torch.Tensor, weight: float, tau: float) -> torch.Tensor:
    p = torch.softmax(past / tau, dim=-1)
    log_q = torch.log_softmax(logits / tau, dim=-1)
    kl = (p * (torch.log(p) - log_q)).sum(-1)
    return weight * tau**2 * kl.mean()


def train(model, epochs, *, saf=None, hand=None, opt=None, start=0):
    """SGD over shuffled mini-batches; the loss is CE + SAF (package) or CE + the hand term."""
    x, y = data()
    opt = opt or torch.optim.SGD(model.parameters(), lr=LR)
    history = hand["history"] if hand is not None else None
    for epoch in range(start, epochs):
        perm = order(epoch)
        for s in range(0, N, MB):
            idx = perm[s : s + MB]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            if saf is not None:
                loss = loss + saf(logits, idx, epoch)
            else:
                ago = epoch - hand["epochs_ago"]
                if epoch >= hand["start"]:
                    past = torch.stack([history[(ago, int(i))] for i in idx])
                    loss = loss + hand_term(logits, past, hand["weight"], hand["tau"])
                for i, row in zip(idx.tolist(), logits.detach()):
                    history[(epoch, i)] = row.clone()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return opt


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("epochs_ago,start", [(1, 1), (3, 6), (2, 3)])
def test_training_with_saf_is_training_with_the_hand_kl_on_the_outputs_from_epochs_ago(epochs_ago, start):
    epochs = start + 3
    a, b = net(), net()
    saf = SAF(N, weight=0.3, temperature=5.0, epochs_ago=epochs_ago, start_epoch=start, dtype=torch.float64)
    train(a, epochs, saf=saf)
    train(b, epochs, hand={"history": {}, "epochs_ago": epochs_ago, "start": start, "weight": 0.3, "tau": 5.0})
    torch.testing.assert_close(flat(a), flat(b), rtol=0, atol=1e-12)
    # the term acted: without it the weights differ
    c = net()
    train(c, epochs, saf=SAF(N, weight=0.0, epochs_ago=epochs_ago, start_epoch=start))
    assert (flat(c) - flat(a)).abs().max() > 1e-6
    assert saf.missing == 0


def test_the_term_and_its_gradient_equal_the_hand_kl_with_the_stored_outputs():
    x, _ = data()
    model = net()
    saf = SAF(N, weight=0.5, temperature=2.0, epochs_ago=1, start_epoch=1, dtype=torch.float64)
    with torch.no_grad():
        assert float(saf(model(x), torch.arange(N), 0)) == 0.0  # epoch 0: off, stores
        past = model(x).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    idx = torch.tensor([7, 2, 11, 0, 5])
    logits = model(x[idx])
    got = saf(logits, idx, 1)
    want = hand_term(logits, past[idx], 0.5, 2.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    g_got = torch.autograd.grad(got, list(model.parameters()), retain_graph=True)
    g_want = torch.autograd.grad(want, list(model.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    assert float(got.detach()) > 0


def test_no_extra_forward_and_the_default_schedule():
    assert (SAF(N).weight, SAF(N).temperature, SAF(N).epochs_ago, SAF(N).start_epoch) == (0.3, 5.0, 3, 6)
    model = net()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    saf = SAF(N)
    x, _ = data()
    terms = []
    for epoch in range(8):
        logits = model(x)
        terms.append(float(saf(logits, torch.arange(N), epoch)))
    assert len(forwards) == 8  # one forward per call: SAF adds none
    assert terms[:6] == [0.0] * 6 and terms[6] >= 0.0
    # (E~ + 1) N C float32 (float64 logits stored as float32) + int64 stamps
    assert saf.memory_bytes == 4 * N * C * 4 + 4 * N * 8


def test_sam_perturbed_pass_reads_but_does_not_store():
    x, y = data()
    model = net()
    saf = SAF(N, epochs_ago=1, start_epoch=1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=LR)
    seen = []

    def closure():
        logits = model(x)
        seen.append(logits.detach().clone())
        loss = F.cross_entropy(logits, y) + saf(logits, torch.arange(N), 0)
        loss.backward()
        return loss

    opt.step(closure)
    clean, perturbed = seen
    assert not torch.equal(clean, perturbed)
    assert torch.equal(saf.memory[0], clean.float())  # the outputs at w


def test_float16_storage_halves_the_memory_and_rounds_the_term_slightly():
    x, _ = data()
    model = net()
    full, half = SAF(N, epochs_ago=1, start_epoch=1), SAF(N, epochs_ago=1, start_epoch=1, dtype=torch.float16)
    with torch.no_grad():
        first = model(x)
        full(first, torch.arange(N), 0), half(first, torch.arange(N), 0)
        second = first * 0.5
        a, b = full(second, torch.arange(N), 1), half(second, torch.arange(N), 1)
    assert half.memory.dtype == torch.float16
    stamps = 2 * N * 8
    assert (half.memory_bytes - stamps) * 2 == full.memory_bytes - stamps
    assert float(a) > 0 and abs(float(a) - float(b)) <= 1e-3 * float(a)


def test_low_precision_logits_get_the_kl_in_float32():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    ref, low = SAF(N, epochs_ago=1, start_epoch=1), SAF(N, epochs_ago=1, start_epoch=1)
    ref(first, torch.arange(N), 0)
    low(first.bfloat16(), torch.arange(N), 0)
    a = ref(second.bfloat16().float(), torch.arange(N), 1)
    b = low(second.bfloat16(), torch.arange(N), 1)
    assert b.dtype == torch.float32
    # the stored past differs only by bf16 rounding of the first logits
    assert abs(float(a) - float(b)) <= 2e-2 * float(a)
    assert low(second.bfloat16(), torch.arange(N), 0).dtype == torch.float32  # also when off


def test_examples_without_a_stored_past_get_no_term_and_are_said_once():
    x, _ = data()
    model = net()
    saf = SAF(N, epochs_ago=1, start_epoch=1)
    with torch.no_grad():
        saf(model(x[:8]), torch.arange(8), 0)  # examples 8..11 not seen in epoch 0
        logits = model(x)
        term = saf(logits, torch.arange(N), 1)
        want = hand_term(logits[:8], saf.memory[0, :8].double(), 0.3, 5.0) * 8 / N  # mean over the batch of 12
    torch.testing.assert_close(term, want, rtol=0, atol=1e-12)
    assert saf.missing == 4
    with torch.no_grad(), pytest.warns(UserWarning, match="4 examples had no output stored 1 epochs earlier"):
        saf(model(x), torch.arange(N), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            saf(model(x), torch.arange(N), 3)


def test_resume_is_bitwise(tmp_path):
    epochs, stop = 8, 5
    whole = net()
    train(whole, epochs, saf=SAF(N, epochs_ago=2, start_epoch=3))

    first = net()
    saf = SAF(N, epochs_ago=2, start_epoch=3)
    opt = train(first, stop, saf=saf)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "saf": saf.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed = net()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # the checkpoint must overwrite everything
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=LR)
    opt2.load_state_dict(state["opt"])
    saf2 = SAF(N, epochs_ago=2, start_epoch=3)
    saf2.load_state_dict(state["saf"])
    train(resumed, epochs, saf=saf2, opt=opt2, start=stop)
    assert torch.equal(flat(resumed), flat(whole))
    assert saf2.missing == 0
    # without SAF's state the run differs (and says why)
    lost = net()
    lost.load_state_dict(state["model"])
    with pytest.warns(UserWarning, match="no output stored"):
        train(lost, epochs, saf=SAF(N, epochs_ago=2, start_epoch=3), start=stop)
    assert not torch.equal(flat(lost), flat(whole))


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_examples": 0}, "num_examples"),
        ({"epochs_ago": 0}, "epochs_ago"),
        ({"epochs_ago": 3, "start_epoch": 2}, "start_epoch \\(2\\) must be >= epochs_ago \\(3\\)"),
        ({"start_epoch": 6, "end_epoch": 6}, "end_epoch"),
        ({"temperature": 0}, "temperature"),
        ({"weight": -1}, "weight"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    kwargs = {"num_examples": N, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        SAF(**kwargs)


def stored(saf: SAF):
    return saf.memory.clone(), saf.stamps.clone()


@pytest.mark.parametrize(
    "logits,indices,match",
    [
        (torch.zeros(3, C), torch.tensor([0, 1, N]), f"index {N}, outside \\[0, {N}\\)"),
        (torch.zeros(3, C), torch.tensor([0, -1, 2]), "index -1, outside"),
        (torch.zeros(3, C + 1), torch.tensor([0, 1, 2]), f"stores outputs of {C} classes but got logits of {C + 1}"),
        (torch.zeros(3, C), torch.tensor([0.0, 1.0, 2.0]), "one integer index per example"),
        (torch.zeros(3, C), torch.tensor([0, 1]), "one integer index per example \\(shape \\[3\\]\\)"),
        (torch.zeros(3, 2, C), torch.tensor([0, 1, 2]), "shape \\[batch, classes\\]"),
        (torch.zeros(3, C, dtype=torch.long), torch.tensor([0, 1, 2]), "floating-point logits"),
    ],
)
def test_bad_inputs_are_refused_before_anything_changes(logits, indices, match):
    saf = SAF(N, epochs_ago=1, start_epoch=1)
    saf(torch.randn(N, C), torch.arange(N), 0)
    before = stored(saf)
    with pytest.raises(ConfigurationError, match=match):
        saf(logits, indices, 1)
    after = stored(saf)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_a_bad_epoch_is_refused():
    with pytest.raises(ConfigurationError, match="epoch"):
        SAF(N)(torch.zeros(2, C), torch.tensor([0, 1]), -1)


def test_load_state_dict_refuses_a_mismatch_before_changing_anything():
    saf = SAF(N, epochs_ago=1, start_epoch=1)
    saf(torch.randn(N, C), torch.arange(N), 0)
    state = saf.state_dict()
    other = SAF(N, epochs_ago=1, start_epoch=1)
    other(torch.randn(N, C), torch.arange(N), 0)
    before = stored(other)
    with pytest.raises(ConfigurationError, match="num_examples"):
        SAF(N + 1, epochs_ago=1, start_epoch=1).load_state_dict({**state, "num_examples": N})
    with pytest.raises(ConfigurationError, match="build SAF with the checkpoint's settings"):
        other.load_state_dict({**state, "epochs_ago": 2})
    with pytest.raises(ConfigurationError, match="dtype=torch.float16"):
        other.load_state_dict({**state, "memory": state["memory"].half()})
    with pytest.raises(ConfigurationError, match="state_dict"):
        other.load_state_dict({"memory": None})
    after = stored(other)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    other.load_state_dict(state)
    assert torch.equal(other.memory, saf.memory) and other.memory is not saf.memory


# ------------------------------------------------------------------------------- four front ends
# The recipes of docs/cheap_sam.md, each with SAM on top (the perturbed pass reads the past outputs
# and stores nothing): the same weights in plain PyTorch, Lightning, the HF Trainer and Accelerate.
FE_N, FE_MB, FE_GA, FE_EPOCHS = 16, 4, 2, 4
FE_OPTIMIZER = {"lr": 0.1, "momentum": 0.9}


class FENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Indexed(torch.utils.data.Dataset):
    """Returns each example's position in the training set: what SAF needs from the data pipeline."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(FE_N, 6, generator=g)
        self.y = torch.randint(0, 3, (FE_N,), generator=g)

    def __len__(self) -> int:
        return FE_N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i], "index": torch.tensor(i)}


def fe_saf() -> SAF:
    return SAF(FE_N, weight=1.0, epochs_ago=1, start_epoch=1)


def fe_loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(Indexed(), batch_size=FE_MB, shuffle=False)


def fe_loss(net, batch, saf, epoch) -> torch.Tensor:
    logits = net(batch["x"])
    return F.cross_entropy(logits, batch["labels"]) + saf(logits, batch["index"], epoch)


def fe_plain(net, saf) -> None:
    from sharpguard.optim import make_sam

    opt = make_sam(torch.optim.SGD(net.parameters(), **FE_OPTIMIZER), "sam", model=net)
    front_ends.run_plain(opt, net, list(fe_loader()), FE_GA, epochs=FE_EPOCHS,
                         loss_fn=lambda m, mb, epoch: fe_loss(m, mb, saf, epoch))


def fe_lightning(net, saf) -> None:
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    front_ends.run_lightning(net, lambda m: torch.optim.SGD(m.parameters(), **FE_OPTIMIZER), fe_loader(),
                             SharpnessAwareMinimization(variant="sam"), FE_GA, max_epochs=FE_EPOCHS,
                             loss_fn=lambda m, batch, epoch: fe_loss(m, batch, saf, epoch))


def fe_hf(net, saf, tmp_path) -> None:
    front_ends.run_hf(net, torch.optim.SGD(net.parameters(), **FE_OPTIMIZER), Indexed(), tmp_path, {"variant": "sam"},
                      micro_batch=FE_MB, lr=FE_OPTIMIZER["lr"], accumulation=FE_GA, epochs=FE_EPOCHS,
                      loss_fn=lambda m, batch, epoch: fe_loss(m, batch, saf, epoch))


def fe_accelerate(net, saf) -> None:
    front_ends.run_accelerate(net, torch.optim.SGD(net.parameters(), **FE_OPTIMIZER), fe_loader(), {"variant": "sam"},
                              FE_GA, epochs=FE_EPOCHS, loss_fn=lambda m, batch, epoch: fe_loss(m, batch, saf, epoch))


def test_saf_with_sam_trains_to_the_same_weights_in_every_front_end(tmp_path, _fresh_accelerate_state):
    runs = {}
    for name in ("plain", "lightning", "hf", "accelerate"):
        model, saf = FENet(), fe_saf()
        if name == "plain":
            fe_plain(model, saf)
        elif name == "lightning":
            fe_lightning(model, saf)
        elif name == "hf":
            fe_hf(model, saf, tmp_path)
        else:
            fe_accelerate(model, saf)
        runs[name] = (flat(model), saf.stamps.clone(), saf.missing)
    reference, stamps, missing = runs["plain"]
    assert missing == 0
    assert sorted(stamps[:, 0].tolist()) == [FE_EPOCHS - 2, FE_EPOCHS - 1]  # the ring holds the last two epochs
    without = FENet()
    fe_plain(without, SAF(FE_N, weight=0.0, epochs_ago=1, start_epoch=1))
    assert float((flat(without) - reference).abs().max() / reference.abs().max()) > 1e-5  # the term acted
    for name in ("lightning", "hf", "accelerate"):
        got, got_stamps, got_missing = runs[name]
        assert got_missing == 0, name
        assert torch.equal(got_stamps, stamps), name
        assert float((got - reference).abs().max() / reference.abs().max()) <= 1e-5, name
