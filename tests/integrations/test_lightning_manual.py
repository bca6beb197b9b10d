"""Lightning manual optimization with sharpguard.SAM: the advice the callback gives, followed as written.

The refusal of :class:`SharpnessAwareMinimization` for ``automatic_optimization=False`` tells users to
call the Lightning optimizer's ``step(closure=...)`` around ``sharpguard.SAM``. Followed, that must
train exact SAM updates (checked against a float64 hand computation of Foret et al., eq. 2-3) and
count Lightning's ``global_step``, so ``max_steps``, a step-interval scheduler and
``ModelCheckpoint(every_n_train_steps=...)`` act. ``first_step()``/``second_step()`` do not count it,
which is why the advice no longer names them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sharpguard as sg
from sharpguard.errors import ConfigurationError
from sharpguard.integrations.lightning import NAMESPACE, SharpnessAwareMinimization

pl = __import__(NAMESPACE, fromlist=["Trainer"])

LR, RHO, GAMMA = 0.1, 0.05, 0.5


def _data(n: int = 40, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=False)


class ManualSAM(pl.LightningModule):
    """Manual optimization as the refusal advises: the Lightning optimizer's step with a closure."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Linear(6, 3)
        self.automatic_optimization = False
        self.seen = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self.seen += 1

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        loss = opt.step(closure=closure)
        self.lr_schedulers().step()  # a step-interval scheduler, stepped as manual optimization does
        return loss

    def configure_optimizers(self):
        opt = sg.SAM(self.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _reference(batches, steps: int) -> dict[str, torch.Tensor]:
    """SAM by hand in float64: e = rho g/||g||, gradient at w + e, w -= lr_t * that gradient."""
    torch.manual_seed(1)
    net = nn.Linear(6, 3).double()
    lr = LR
    for x, y in list(batches)[:steps]:
        x = x.double()
        params = list(net.parameters())
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        with torch.no_grad():
            e = [RHO * g / norm for g in grads]
            for p, d in zip(params, e):
                p.add_(d)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        with torch.no_grad():
            for p, d, g in zip(params, e, grads):
                p.sub_(d).sub_(lr * g)
        lr *= GAMMA
    return {k: v.float() for k, v in net.state_dict().items()}


def test_manual_optimization_with_the_advised_closure_counts_steps_and_trains_sam(tmp_path):
    batches = _data()
    module = ManualSAM()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, max_epochs=10, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ckpt])
    trainer.fit(module, batches)
    assert trainer.global_step == 5 and module.seen == 5  # max_steps=5 is honoured
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * GAMMA**5)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    ref = _reference(batches, 5)
    for name, value in module.net.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6)


def test_first_step_second_step_leave_global_step_at_zero_which_is_why_the_advice_avoids_them():
    """The two-step form bypasses LightningOptimizer.step: Lightning never counts a step."""

    class TwoStep(ManualSAM):
        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers().optimizer
            self.seen += 1
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.net(x), y))
            if opt.first_step(zero_grad=True):
                self.manual_backward(F.cross_entropy(self.net(x), y))
            opt.second_step(zero_grad=True)

    module = TwoStep()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, max_epochs=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, _data())
    assert trainer.global_step == 0 and module.seen == 10  # a whole epoch, max_steps ignored


def test_the_refusal_gives_the_advice_that_works():
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[SharpnessAwareMinimization(rho=RHO)])
    with pytest.raises(ConfigurationError) as info:
        trainer.fit(ManualSAM(), _data())
    text = str(info.value)
    assert "self.optimizers().step(closure=closure)" in text and "manual_backward" in text
    assert "global_step" in text and "bypass" in text


def test_adversarial_training_refusal_does_not_send_users_to_sam():
    from sharpguard.integrations.lightning import AdversarialTraining
    from sharpguard.integrations.lightning._hooks import _refuse_unsupported

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(ConfigurationError) as info:
        _refuse_unsupported(trainer, ManualSAM(), AdversarialTraining._who)
    assert "make_method" in str(info.value) and "SAM" not in str(info.value)
