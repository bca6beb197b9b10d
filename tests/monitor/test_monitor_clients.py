"""Monitors at their defaults on client code we did not write (issue 11): the demo LightningModules
that ship with Lightning (synthetic data in place of their downloads) and Hugging Face model families
built from configs. Each trains; a finite ``sharpness/lambda_max`` is logged within ~25 steps; the
monitored run equals the unmonitored one bitwise (docs/design.md promise 1), with and without SAM at its
defaults on both runs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pytorch_lightning as pl
from pytorch_lightning.demos import boring_classes, lstm, transformer

from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Tokens(Dataset):
    """(inputs, target) token blocks, as the demos' WikiText2 yields them, from a seeded generator."""

    def __init__(self, n: int, vocab: int, block: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.data = torch.randint(0, vocab, (n, block + 1), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def _boring():
    return boring_classes.BoringModel(), DataLoader(boring_classes.RandomDataset(32, 64), batch_size=4)


def _demo():
    return boring_classes.DemoModel(), DataLoader(boring_classes.RandomDataset(32, 64), batch_size=4)


def _transformer():
    module = transformer.LightningTransformer(vocab_size=40)
    module.model = transformer.Transformer(vocab_size=40, ninp=16, nhead=2, nhid=16, nlayers=1)
    module.prepare_data = lambda: None  # WikiText2 would be downloaded: synthetic tokens instead
    return module, DataLoader(_Tokens(64, 40, 8), batch_size=4)


def _lstm():
    module = lstm.LightningLSTM(vocab_size=40)
    module.model = lstm.SimpleLSTM(vocab_size=40, ninp=16, nhid=16, nlayers=2)
    module.prepare_data = lambda: None
    data = _Tokens(64, 40, 8)
    return module, DataLoader(data, batch_sampler=lstm.SequenceSampler(data, batch_size=4))


DEMOS = {"BoringModel": _boring, "DemoModel": _demo, "LightningTransformer": _transformer, "LightningLSTM": _lstm}


def _fit(build, callbacks, steps=12):
    torch.manual_seed(0)
    module, loader = build()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return module, trainer


@pytest.mark.parametrize("sam", [False, True], ids=["plain", "sam"])
@pytest.mark.parametrize("name", list(DEMOS))
def test_lightning_demo_module_with_a_default_monitor(name, sam):
    """With ``sam``, both runs also carry SAM at its defaults: SAM + monitor equals SAM alone bitwise."""
    def with_sam(callbacks):
        return callbacks + ([SharpnessAwareMinimization()] if sam else [])

    plain, _ = _fit(DEMOS[name], with_sam([]))
    cb = SharpnessMonitor()
    monitored, trainer = _fit(DEMOS[name], with_sam([cb]))
    # bitwise the same training: parameters, buffers and the module's own state (the LSTM's hidden)
    for (k, a), (_, b) in zip(plain.state_dict().items(), monitored.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # a finite top eigenvalue early: the first check comes at the first measured step
    values = cb.monitor.history.values("sharpness/lambda_max")
    assert values and values[0][0] <= 3 and all(math.isfinite(v) for _, v in values), values
    assert "sharpness/lambda_max" in trainer.callback_metrics
    # the default probe is the module's own loss on the batches it trains on: one whole batch
    assert len(cb.monitor.probe) == 4


def test_the_guard_is_what_keeps_a_stateful_training_step_bitwise(monkeypatch):
    """Negative control: without restoring the module's attributes, the probe's training_step leaves
    its own hidden state in the LSTM demo and training changes."""
    import contextlib

    from sharpguard.integrations.lightning import monitors

    plain, _ = _fit(_lstm, [])

    @contextlib.contextmanager
    def log_silenced_only(module):
        module.log = lambda *a, **k: None
        try:
            yield
        finally:
            del module.log

    from sharpguard.sharpness.operator import NonDeterministicHVPError

    monkeypatch.setattr(monitors, "_guarded_training_step", log_silenced_only)
    try:
        unguarded, _ = _fit(_lstm, [SharpnessMonitor()])
    except NonDeterministicHVPError:
        return  # each probe loss call moved the hidden state: the measurement itself is broken
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), unguarded.parameters(), strict=True))


def test_a_random_training_step_is_measured_as_one_fixed_function():
    """A training_step with random draws (noise added to the inputs, as an adversarial loss's random
    start would be) is measured with the same draws at every call of a check: the Hessian products are
    deterministic, the value finite, and training still bitwise the unmonitored run's."""

    class Noisy(boring_classes.BoringModel):
        def training_step(self, batch, batch_idx):
            return {"loss": self.step(batch + 0.1 * torch.randn_like(batch))}

    def build():
        return Noisy(), DataLoader(boring_classes.RandomDataset(32, 64), batch_size=4)

    plain, _ = _fit(build, [])
    cb = SharpnessMonitor()
    monitored, _ = _fit(build, [cb])
    for a, b in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(a, b)
    values = cb.monitor.history.values("sharpness/lambda_max")
    assert values and all(math.isfinite(v) for _, v in values)
