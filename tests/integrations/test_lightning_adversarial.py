"""The Lightning AdversarialTraining callback and AdversarialTrainingMixin in a real Trainer: passes per
step counted with hooks, SAM + adversarial training against hand-written loops, fp16 with the CPU
GradScaler, and ddp_spawn on two CPU ranks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from tests.helpers.lightning_dist import LeaveTogether  # noqa: E402
from tests.helpers import lit_digits  # noqa: E402

from sharpguard.adversarial import (  # noqa: E402
    PGDAT,
    TRADES,
    CatastrophicOverfittingDetector,
    FastAT,
    count_passes,
    make_method,
    sam_adversarial_step,
)
from sharpguard.errors import ConfigurationError  # noqa: E402
from sharpguard.integrations.lightning import (  # noqa: E402
    NAMESPACE,
    AdversarialTraining,
    AdversarialTrainingMixin,
    SharpnessAwareMinimization,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, BATCH, LR, RHO, STEPS = 128, 32, 0.2, 0.05, 3
EPS, ALPHA, K = 0.1, 0.05, 2


def digits(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    return lit_digits.digits(n)


def loader(batch_size: int = BATCH, collate_fn=None) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*digits()), batch_size=batch_size,
                                       shuffle=False, collate_fn=collate_fn)


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's first ``steps`` batches (epochs repeat the same order)."""
    x, y = digits()
    per_epoch = N // BATCH
    return [(x[(i % per_epoch) * BATCH : (i % per_epoch + 1) * BATCH],
             y[(i % per_epoch) * BATCH : (i % per_epoch + 1) * BATCH])
            for i in range(steps)]


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def pgd_at(**kw) -> PGDAT:
    return make_method("pgd-at", eps=EPS, alpha=ALPHA, steps=K, seed=0, **kw)


def trades() -> TRADES:
    return make_method("trades", beta=2.0, eps=EPS, alpha=ALPHA, steps=K, seed=0)


class LitDigits(lit_digits.LitDigits):
    """A LightningModule as users write it: cross entropy of its own forward."""

    def __init__(self):
        super().__init__(make_net(), lr=LR)


class LitMixin(AdversarialTrainingMixin, LitDigits):
    """The mixin: training_step returns the method's own loss."""

    def __init__(self, method):
        super().__init__()
        self.adversarial_method = method

    def training_step(self, batch, batch_idx):
        loss = self.adversarial_loss(batch)
        self.log("train_adv_loss", loss)
        return loss


def trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def fit_counting(model: LitDigits, callbacks: list, **kw) -> tuple[int, int]:
    """(forwards, backwards) of the model per optimizer step over a real Trainer.fit."""
    t = trainer(callbacks=callbacks, **kw)
    with count_passes(model.net) as counts:
        t.fit(model, loader())
    assert t.global_step == STEPS
    assert counts.forwards % STEPS == 0 and counts.backwards % STEPS == 0
    return counts.forwards // STEPS, counts.backwards // STEPS


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_close(actual, expected, **tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


# ---------------------------------------------------------------------------------------------- pass counts
def test_passes_per_step_in_a_real_trainer():
    method = pgd_at()
    assert method.replaces_inputs and FastAT().replaces_inputs and not trades().replaces_inputs
    # input replacement: the paper's K+1, nothing wasted
    assert fit_counting(LitDigits(), [AdversarialTraining(pgd_at())]) == method.cost == (K + 1, K + 1)
    assert fit_counting(LitDigits(), [AdversarialTraining(make_method("fast-at", eps=EPS, seed=0))]) == (2, 2)
    # SAM reuses x_adv at w + e: K+2 instead of 2(K+1), whichever order the callbacks are given in
    for order in (0, 1):
        cbs = [AdversarialTraining(pgd_at()), SharpnessAwareMinimization(rho=RHO)]
        counts = fit_counting(LitDigits(), cbs[::-1] if order else cbs)
        assert counts == method.sam_cost(reuse=True) == (K + 2, K + 2)
    # a loss-changing method through the callback: its cost plus Lightning's discarded clean pass
    tr = trades()
    f, b = tr.cost
    assert fit_counting(LitDigits(), [AdversarialTraining(trades())]) == (f + 1, b + 1)
    # ... and through the mixin: exactly its cost; with SAM the adversary is reused at w + e
    assert fit_counting(LitMixin(trades()), []) == tr.cost
    assert fit_counting(LitMixin(trades()), [SharpnessAwareMinimization(rho=RHO)]) == tr.sam_cost(reuse=True)


# ------------------------------------------------------------------------------------- against references
def reference_sam_pgd_at(steps: int = STEPS, accumulate: int = 1) -> list[torch.Tensor]:
    """SAM with PGD-AT by hand: x_adv built once per micro-batch at w (a fresh method: the same random
    starts), e = rho g/||g|| from the accumulated adversarial gradient at w, the gradient at w + e on the
    same x_adv, w restored, SGD."""
    net = make_net()
    method = pgd_at()
    params = list(net.parameters())
    micro = batches(steps * accumulate)
    for step in range(steps):
        window = [(method.generate(net, b), b[1]) for b in micro[step * accumulate : (step + 1) * accumulate]]

        def grad() -> list[torch.Tensor]:
            total = [torch.zeros_like(p) for p in params]
            for xa, yb in window:
                for acc, g in zip(total, torch.autograd.grad(F.cross_entropy(net(xa), yb) / accumulate, params)):
                    acc += g
            return total

        g = grad()
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        w = weights(net)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi * (RHO / (norm + 1e-12)))
        g2 = grad()
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g2):
                p.copy_(wi - LR * gi)
    return weights(net)


@pytest.mark.parametrize("order,accumulate", [("at-first", 1), ("sam-first", 1), ("sam-first", 2)])
def test_sam_with_pgd_at_reuses_x_adv_and_matches_a_hand_written_loop(order, accumulate):
    at, sam = AdversarialTraining(pgd_at()), SharpnessAwareMinimization(rho=RHO)
    model = LitDigits()
    t = trainer(callbacks=[at, sam] if order == "at-first" else [sam, at], accumulate_grad_batches=accumulate)
    t.fit(model, loader())
    assert at.n_steps == sam.n_steps == STEPS
    assert_close(weights(model.net), reference_sam_pgd_at(accumulate=accumulate), rtol=1e-5, atol=1e-6)
    # training_step ran on adversarial inputs at w and again at w + e on the same ones
    x0 = batches(1)[0][0]
    assert not torch.equal(model.seen[0], x0) and (model.seen[0] - x0).abs().max() <= EPS + 1e-6
    assert torch.equal(model.seen[0], model.seen[accumulate])


def test_mixin_with_sam_matches_sharpguards_sam_adversarial_step():
    """TRADES through the mixin + the SAM callback against the core's closure (SAM over SGD, adversary reused)."""
    import sharpguard as sg

    model = LitMixin(trades())
    t = trainer(callbacks=[SharpnessAwareMinimization(rho=RHO)])
    t.fit(model, loader())
    ref = make_net()
    opt = sg.SAM(ref.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    method = trades()
    for batch in batches():
        opt.zero_grad()
        sam_adversarial_step(opt, ref, method, batch, reuse=True)
    assert_close(weights(model.net), weights(ref), rtol=1e-5, atol=1e-6)


def test_mixin_alone_is_plain_training_on_the_methods_loss():
    model = LitMixin(trades())
    trainer().fit(model, loader())
    ref, method = make_net(), trades()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    for batch in batches():
        opt.zero_grad()
        method(ref, batch).backward()
        opt.step()
    assert_close(weights(model.net), weights(ref), rtol=1e-5, atol=1e-6)


def test_gradient_replacing_method_with_sam_is_refused_before_training():
    model = LitDigits()
    before = weights(model.net)
    with pytest.raises(ConfigurationError, match="AdversarialTrainingMixin"):
        trainer(callbacks=[SharpnessAwareMinimization(rho=RHO), AdversarialTraining(trades())]).fit(model, loader())
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model.net)))
    with pytest.raises(ConfigurationError, match="adversarial_method"):
        LitMixin(None).adversarial_loss(batches(1)[0])


class BatchSpy(pl.Callback):
    """Listed before AdversarialTraining: what does a monitor-like callback see at the batch end?"""

    def __init__(self):
        self.at_end: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.at_end.append(batch[0].detach().clone())


@pytest.mark.parametrize("container", ["list", "tuple"])
def test_clean_inputs_are_back_after_the_step(container):
    collate = None if container == "list" else (lambda s: tuple(torch.utils.data.default_collate(s)))
    spy, at = BatchSpy(), AdversarialTraining(pgd_at())
    model = LitDigits()
    t = trainer(callbacks=[spy, at])
    t.fit(model, loader(collate_fn=collate))
    assert t.callbacks[0] is at  # moved to the front: every other callback sees a consistent batch
    for step, (x, _) in enumerate(batches()):
        assert torch.equal(spy.at_end[step], x)  # a monitor capturing probes gets clean examples
        assert not torch.equal(model.seen[step], x)  # the loss was computed on x_adv
    # the dataset itself was never written
    assert torch.equal(loader().dataset.tensors[0], digits()[0])


def test_start_step_trains_clean_first():
    at = AdversarialTraining(pgd_at(), start_step=2)
    model = LitDigits()
    trainer(callbacks=[at]).fit(model, loader())
    x = [b[0] for b in batches()]
    assert torch.equal(model.seen[0], x[0]) and torch.equal(model.seen[1],
                                                            x[1]) and not torch.equal(model.seen[2], x[2])
    assert at.n_steps == 1


def test_fast_at_overfitting_detector_keeps_working_and_is_checkpointed(tmp_path):
    detector = CatastrophicOverfittingDetector(every=1, steps=2)
    at = AdversarialTraining(FastAT(eps=EPS, seed=0, detector=detector))
    t = trainer(callbacks=[at])
    t.fit(LitDigits(), loader())
    assert [r["step"] for r in detector.history] == [0, 1, 2]
    assert all(0.0 <= r["pgd_acc"] <= 1.0 for r in detector.history)
    path = tmp_path / "at.ckpt"
    t.save_checkpoint(path)
    state = [v for k,
             v in torch.load(path, weights_only=True)["callbacks"].items() if k.startswith("AdversarialTraining")]
    assert state and len(state[0]["detector"]["history"]) == 3

    with pytest.raises(Exception, match="catastrophic overfitting"):
        raising = CatastrophicOverfittingDetector(every=1, steps=2, drop=0.0, on_detect="raise")
        raising.best = 2.0  # any accuracy is a drop now
        trainer(callbacks=[AdversarialTraining(FastAT(eps=EPS, seed=0, detector=raising))]).fit(LitDigits(), loader())


# ---------------------------------------------------------------------------------------------------- fp16
def reference_plain(method_factory, steps: int = STEPS) -> list[torch.Tensor]:
    net, method = make_net(), method_factory()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for batch in batches(steps):
        opt.zero_grad()
        method(net, batch).backward()
        opt.step()
    return weights(net)


@pytest.mark.parametrize("name", ["pgd-at", "trades"])
def test_fp16_with_the_cpu_grad_scaler(name):
    plugin_module = __import__(f"{NAMESPACE}.plugins.precision", fromlist=["MixedPrecision"])
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    factory = pgd_at if name == "pgd-at" else trades
    at = AdversarialTraining(factory())
    model = LitDigits()
    t = trainer(callbacks=[at], plugins=[plugin_module.MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    t.fit(model, loader())
    assert t.precision_plugin.scaler is scaler and at.n_steps == STEPS and at.n_fallback == 0
    # half-precision forwards: the fp32 trajectory to ~1e-2; a gradient left scaled (x16) would be far off
    assert_close(weights(model.net), reference_plain(factory), rtol=5e-2, atol=5e-3)


# ----------------------------------------------------------------------------------------------------- DDP
class LitSharded(LitDigits):
    def train_dataloader(self):
        # each rank reads its own fixed shard (examples rank, rank + 2, ...) so the reference knows it
        x, y = digits()
        shard = torch.utils.data.TensorDataset(x[self.global_rank :: 2], y[self.global_rank :: 2])
        return torch.utils.data.DataLoader(shard, batch_size=BATCH // 2, shuffle=False)


class Report(pl.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        seen = trainer.strategy.all_gather(torch.stack(pl_module.seen))
        if trainer.is_global_zero:
            torch.save({"equal": bool(torch.equal(gathered[0], gathered[1])), "world": trainer.world_size,
                        "seen": seen.clone(), "weights": [p.detach().clone() for p in pl_module.parameters()]},
                       self.path)


def reference_ddp_pgd_at(rank_of_generator) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Rank r attacks its own shard with its own generator (seed + rank offset); DDP averages the gradients."""
    import sharpguard.attacks.threat as threat

    net = make_net()
    params = list(net.parameters())
    x, y = digits()
    half = BATCH // 2
    methods = [pgd_at(), pgd_at()]
    seen: list[list[torch.Tensor]] = [[], []]
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        for r in range(2):
            xb, yb = x[r::2][step * half : (step + 1) * half], y[r::2][step * half : (step + 1) * half]
            with mock.patch.object(threat, "_rank", lambda r=r: rank_of_generator(r)):
                xa = methods[r].generate(net, (xb, yb))
            seen[r].append(xa)
            for acc, g in zip(total, torch.autograd.grad(F.cross_entropy(net(xa), yb), params)):
                acc += g / 2
        with torch.no_grad():
            for p, g in zip(params, total):
                p.sub_(LR * g)
    return weights(net), seen


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_spawn_ranks_identical_and_attack_their_own_shard(tmp_path):
    path = str(tmp_path / "result.pt")
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS, logger=False,
                   use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[AdversarialTraining(pgd_at()), Report(path), LeaveTogether()])
    t.fit(LitSharded())
    result = torch.load(path, weights_only=True)
    assert result["world"] == 2 and result["equal"]
    expected, seen = reference_ddp_pgd_at(lambda r: r)
    for r in range(2):
        for step in range(STEPS):
            torch.testing.assert_close(result["seen"][r][step], seen[r][step], rtol=1e-5, atol=1e-6)
    assert_close(result["weights"], expected, rtol=1e-5, atol=1e-6)
    # negative control: had both ranks drawn rank 0's random starts, rank 1's examples would differ
    _, same_generator = reference_ddp_pgd_at(lambda r: 0)
    assert not torch.allclose(result["seen"][1][0], same_generator[1][0])


def test_gradient_replacing_callbacks_refuse_fsdp2_under_a_strategy_whose_name_does_not_say_fsdp():
    """FSDP2 under Lightning is ``fully_shard`` in ``configure_model`` with ``ModelParallelStrategy``: the
    refusal looks at the modules (``FSDPModule``), not only at the strategy's name."""
    import types

    from torch.distributed.fsdp import FSDPModule

    from sharpguard.errors import ConfigurationError
    from sharpguard.integrations.lightning._hooks import _refuse_unsupported

    class ShardedLinear(FSDPModule, torch.nn.Linear):  # what fully_shard makes of a module's class
        pass

    class ModelParallelStrategy:
        pass

    trainer = types.SimpleNamespace(strategy=ModelParallelStrategy())
    sharded = types.SimpleNamespace(modules=lambda: [object.__new__(ShardedLinear)], automatic_optimization=True)
    plain = types.SimpleNamespace(modules=lambda: [torch.nn.Linear(2, 2)], automatic_optimization=True)
    with pytest.raises(ConfigurationError, match="does not support FSDP"):
        _refuse_unsupported(trainer, sharded, "AdversarialTraining")
    _refuse_unsupported(trainer, plain, "AdversarialTraining")  # a replicated model is fine
    _refuse_unsupported(trainer, sharded, "SharpnessAwareMinimization", allow_fsdp=True)
