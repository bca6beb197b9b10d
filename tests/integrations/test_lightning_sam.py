"""The Lightning SAM callback against hand-written SAM references on the digits data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from tests.helpers import lit_digits  # noqa: E402

from sharpguard.errors import ConfigurationError  # noqa: E402
from sharpguard.integrations.lightning import NAMESPACE, SharpnessAwareMinimization  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, BATCH, RHO, LR = 192, 32, 0.05, 0.2


def digits(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    return lit_digits.digits(n)


def loader(batch_size: int = BATCH) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*digits()), batch_size=batch_size, shuffle=False)


def make_net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32) if bn else nn.Identity(), nn.Tanh(), nn.Linear(32, 10))


class LitDigits(lit_digits.LitDigits):
    """A LightningModule as users write it."""

    def __init__(self, lr: float = LR, momentum: float = 0.0, bn: bool = False, gamma: float | None = None):
        super().__init__(make_net(bn), lr=lr, momentum=momentum, gamma=gamma)


def trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def grad_of(net: nn.Module, x, y, scale: float = 1.0) -> list[torch.Tensor]:
    loss = F.cross_entropy(net(x), y) * scale
    return list(torch.autograd.grad(loss, list(net.parameters())))


def reference_sam(steps: int, *, accumulate: int = 1, clip: float | None = None, gamma: float | None = None,
                  rho: float = RHO, lr: float = LR) -> tuple[list[torch.Tensor], list[float]]:
    """SAM by hand in float64: e = rho g/||g|| from the accumulated clean gradient, every micro-batch
    re-evaluated at w + e, optional norm clipping of the SAM gradient, then SGD; returns the clean losses."""
    net = make_net().double()
    x, y = digits()
    x = x.double()
    params = list(net.parameters())
    losses = []
    micro = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    for step in range(steps):
        window = micro[step * accumulate : (step + 1) * accumulate]
        g = [torch.zeros_like(p) for p in params]
        for xb, yb in window:
            losses.append(float(F.cross_entropy(net(xb), yb)))
            for acc, gi in zip(g, grad_of(net, xb, yb, 1 / accumulate)):
                acc += gi
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi * (rho / (norm + 1e-12)))
        g2 = [torch.zeros_like(p) for p in params]
        for xb, yb in window:
            for acc, gi in zip(g2, grad_of(net, xb, yb, 1 / accumulate)):
                acc += gi
        step_lr = lr * (gamma**step if gamma is not None else 1.0)
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
            if clip is not None:
                n2 = torch.sqrt(sum((gi**2).sum() for gi in g2))
                factor = min(1.0, clip / (float(n2) + 1e-6))
                g2 = [gi * factor for gi in g2]
            for p, gi in zip(params, g2):
                p.sub_(step_lr * gi)
    return [p.detach().float() for p in params], losses


def assert_close(actual, expected, **tol):
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected) > 0  # zip alone would pass on a missing tensor
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tol)


def test_callbacks_subclass_the_namespace_they_report():
    """The callbacks are built on the Lightning namespace NAMESPACE names, and mixing namespaces is caught
    by Lightning itself: a Trainer of that namespace accepts them."""
    import importlib

    namespace = importlib.import_module(NAMESPACE)
    assert issubclass(SharpnessAwareMinimization, namespace.Callback)
    namespace.Trainer(callbacks=[SharpnessAwareMinimization()], logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("accumulate,clip,gamma", [(1, None, 0.5), (2, None, None), (1, 0.05, None)])
def test_sam_callback_matches_hand_written_sam(accumulate, clip, gamma, tmp_path):
    steps = 3
    model = LitDigits(gamma=gamma)
    logger = pl.loggers.CSVLogger(tmp_path) if NAMESPACE == "pytorch_lightning" else None
    t = trainer(max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                logger=logger or False, log_every_n_steps=1, callbacks=[SharpnessAwareMinimization(rho=RHO)])
    t.fit(model, loader())
    expected, clean_losses = reference_sam(steps, accumulate=accumulate, clip=clip, gamma=gamma)
    assert_close(weights(model.net), expected, rtol=1e-4, atol=1e-5)
    # SAM changes training: plain SGD lands elsewhere
    plain = LitDigits(gamma=gamma)
    trainer(max_steps=steps, accumulate_grad_batches=accumulate, gradient_clip_val=clip).fit(plain, loader())
    assert max(float((a - b).abs().max()) for a, b in zip(weights(plain.net), weights(model.net))) > 1e-4
    # training_step runs twice per micro-batch, but the logged loss is the clean one, once per batch
    assert model.train_steps == 2 * steps * accumulate
    if logger is not None and accumulate == 1:
        import csv

        rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
        logged = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
        assert logged == pytest.approx(clean_losses[:steps], rel=1e-4)


def test_sam_with_scheduler_keeps_the_users_optimizer():
    model = LitDigits(gamma=0.5)
    cb = SharpnessAwareMinimization(rho=RHO)
    t = trainer(max_steps=2, callbacks=[cb])
    t.fit(model, loader())
    opt = t.optimizers[0]
    assert type(opt) is torch.optim.SGD  # not replaced: checkpoints load without sharpguard
    assert cb.sam.base_optimizer is opt and cb.sam.param_groups is opt.param_groups
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.25)
    assert cb.n_steps == 2


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed-scaler"])
def test_sam_under_mixed_precision(precision):
    kw = {}
    if precision == "16-mixed-scaler":
        plugin_module = __import__(f"{NAMESPACE}.plugins.precision", fromlist=["MixedPrecision"])
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        kw["plugins"] = [plugin_module.MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    else:
        kw["precision"] = precision
    model = LitDigits()
    cb = SharpnessAwareMinimization(rho=RHO)
    t = trainer(max_steps=3, callbacks=[cb], **kw)
    t.fit(model, loader())
    if precision == "16-mixed-scaler":
        assert t.precision_plugin.scaler is not None
    expected, _ = reference_sam(3)
    # half-precision forwards: the same SAM trajectory to ~1e-2; forgetting to unscale the replayed
    # gradient (scale 16) would be 16x off
    assert_close(weights(model.net), expected, rtol=5e-2, atol=5e-3)
    assert cb.n_steps + cb.n_fallback == 3 and cb.n_steps >= 2


def test_resume_from_checkpoint_is_bitwise(tmp_path):
    def run(max_epochs, ckpt=None, save=None):
        torch.manual_seed(0)
        model = LitDigits(momentum=0.9, gamma=0.9)
        t = trainer(max_steps=-1, max_epochs=max_epochs,
                    callbacks=[SharpnessAwareMinimization(rho=RHO, variant="looksam", k=2)])
        t.fit(model, loader(), ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return weights(model.net), t

    straight, _ = run(2)
    path = tmp_path / "half.ckpt"
    run(1, save=path)
    ckpt = torch.load(path, weights_only=True)
    key = [k for k in ckpt["callbacks"] if k.startswith("SharpnessAwareMinimization")]
    assert key and ckpt["callbacks"][key[0]]["sam"]["variant"] == "looksam"
    assert "sharpguard" not in ckpt["optimizer_states"][0]  # the user's optimizer state, loadable without us
    resumed, t = run(2, ckpt=path)
    assert len(straight) == len(resumed) > 0
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_bn_statistics_come_from_the_clean_pass():
    model = LitDigits(bn=True)
    t = trainer(max_steps=1, callbacks=[SharpnessAwareMinimization(rho=RHO)])
    t.fit(model, loader())
    bn = model.net[1]
    assert int(bn.num_batches_tracked) == 1  # the replay's forward did not update the running stats
    ref = make_net(bn=True)
    x, y = digits()
    ref.train()
    ref(x[:BATCH])
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean)


class ManualModule(LitDigits):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class TwoOptimizers(LitDigits):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1)]


def test_refuses_manual_optimization_and_two_optimizers():
    with pytest.raises(ConfigurationError, match="automatic optimization"):
        trainer(callbacks=[SharpnessAwareMinimization()]).fit(ManualModule(), loader())
    with pytest.raises((ConfigurationError, Exception), match="optimizer"):
        trainer(callbacks=[SharpnessAwareMinimization()]).fit(TwoOptimizers(), loader())


def test_bad_rho_is_refused_before_training():
    with pytest.raises(ConfigurationError, match="rho"):
        SharpnessAwareMinimization(rho=-0.1)


def test_error_in_replay_restores_the_weights():
    class Exploding(LitDigits):
        def training_step(self, batch, batch_idx):
            if self.train_steps == 1:  # the replay of the first step
                self.train_steps += 1
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    model = Exploding()
    before = weights(model.net)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=1, callbacks=[SharpnessAwareMinimization(rho=1.0)]).fit(model, loader())
    after = weights(model.net)
    assert len(before) == len(after) > 0
    for a, b in zip(before, after):
        assert torch.equal(a, b)  # w restored by copy, never left at w + e


def test_missing_lightning_names_the_extra(monkeypatch):
    from sharpguard.errors import MissingDependencyError
    from sharpguard.integrations import _lightning_namespace

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # makes the import fail
    monkeypatch.delenv("SHARPGUARD_LIGHTNING", raising=False)
    with pytest.raises(MissingDependencyError, match=r'pip install "sharpguard\[lightning\]"'):
        _lightning_namespace.load()


def test_namespace_can_be_chosen(monkeypatch):
    from sharpguard.integrations import _lightning_namespace

    import lightning.pytorch  # noqa: F401
    monkeypatch.setenv("SHARPGUARD_LIGHTNING", "lightning")
    assert _lightning_namespace.load().__name__ == "lightning.pytorch"
    monkeypatch.setenv("SHARPGUARD_LIGHTNING", "pytorch_lightning")
    assert _lightning_namespace.load().__name__ == "pytorch_lightning"
    monkeypatch.setenv("SHARPGUARD_LIGHTNING", "keras")
    with pytest.raises(ConfigurationError, match="SHARPGUARD_LIGHTNING"):
        _lightning_namespace.load()


def test_per_worker_only_where_it_keeps_replicas_identical():
    """Under DDP the clean pass skips the all-reduce only when a perturbed pass follows and the variant's
    update does not use the clean gradient; anything else would let the replicas diverge."""
    for variant in ("gsam", "looksam", "friendly_sam"):
        with pytest.raises(ConfigurationError, match="per_worker=True"):
            SharpnessAwareMinimization(variant=variant, per_worker=True)
        assert not SharpnessAwareMinimization(variant=variant).per_worker
    from sharpguard.optim import SAMEngine, make_sam

    cb = SharpnessAwareMinimization(rho=0.05, interval=2)
    assert cb.per_worker
    assert not SharpnessAwareMinimization(rho=0.05, per_worker=False).per_worker
    net = nn.Linear(2, 2)
    engine = SAMEngine(make_sam(torch.optim.SGD(net.parameters(), lr=0.1), "sam", rho=0.05, interval=2))
    assert engine.clean_pass_unsynced(distributed=True)  # step 0 perturbs: its clean pass may stay local
    assert not engine.clean_pass_unsynced(distributed=False)  # nothing to skip in one process
    engine.sam._step = 1
    assert not engine.clean_pass_unsynced(distributed=True)  # step 1 is a plain step: its gradient must be all-reduced
