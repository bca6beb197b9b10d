"""The SAM callback on LightningModules we did not write (``pytorch_lightning.demos``), issues 11 and 12.

- Lightning's LSTM demo (truncated BPTT carrying ``self.hidden`` across steps): the replay at ``w + e``
  must start from the hidden state the clean pass started from, and the module must hold afterwards
  what the clean pass left. Checked against a hand-written SAM whose two passes start from the same
  state, with a negative control: the replay from the clean pass's *end* state gives other weights.
- BoringModel (a bare-tensor batch, the loss computed in ``training_step``) trains under every variant.
- Resume with other SAM settings is refused naming them, unless ``resume=`` says otherwise.
"""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.demos import boring_classes, lstm

from sharpguard.errors import ConfigurationError
from sharpguard.integrations._lightning_namespace import pl
from sharpguard.integrations.lightning import SharpnessAwareMinimization

VOCAB, BPTT, BATCH, STEPS, LR, RHO = 50, 6, 4, 5, 0.5, 0.05


def token_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, VOCAB, (STEPS, BATCH, BPTT + 1), generator=g)
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in stream]


class SmallLSTM(lstm.LightningLSTM):
    """Lightning's demo module with its own ``training_step``; only the sizes, the data (no download)
    and the learning rate (no clipping) are ours."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        torch.manual_seed(0)
        self.model = lstm.SimpleLSTM(vocab_size=VOCAB, ninp=8, nhid=8, nlayers=2, dropout=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(token_batches(), batch_size=None, shuffle=False)

    def prepare_data(self) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def fit(module, callbacks, max_steps=STEPS, ckpt_path=None, **kw):
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def weights(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def hand_written_sam(replay_from_end_state: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = lstm.SimpleLSTM(vocab_size=VOCAB, ninp=8, nhid=8, nlayers=2, dropout=0.0)
    params = list(model.parameters())
    hidden = None
    for x, y in token_batches():
        start = model.init_hidden(BATCH) if hidden is None else (hidden[0].detach(), hidden[1].detach())
        out, end = model(x, start)
        torch.nn.functional.nll_loss(out, y.reshape(-1)).backward()
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
            w = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * (RHO / (norm + 1e-12)))
                p.grad = None
        replay_start = (end[0].detach(), end[1].detach()) if replay_from_end_state else start
        out2, _ = model(x, replay_start)
        torch.nn.functional.nll_loss(out2, y.reshape(-1)).backward()
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi - LR * p.grad)
                p.grad = None
        hidden = end
    return torch.cat([p.detach().reshape(-1) for p in params]), hidden


def test_sam_on_the_lstm_demo_replays_from_the_state_the_clean_pass_started_from():
    module = SmallLSTM()
    held = []

    class HiddenAfterStep(pl.Callback):  # the demo resets self.hidden at the epoch's end: read it per step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            held.append(pl_module.hidden)

    fit(module, [SharpnessAwareMinimization(rho=RHO), HiddenAfterStep()])
    expected, expected_hidden = hand_written_sam()
    wrong, _ = hand_written_sam(replay_from_end_state=True)
    got = weights(module.model)
    scale = expected.abs().max()
    assert float((got - expected).abs().max() / scale) <= 1e-5
    assert float((wrong - expected).abs().max() / scale) > 1e-3  # the negative control tells them apart
    # after the step the module holds what the clean pass left, not the replay's state
    torch.testing.assert_close(held[-1][0], expected_hidden[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(held[-1][1], expected_hidden[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sam", "asam", "looksam", "gsam", "friendly_sam"])
def test_the_boring_model_trains_under_sam_with_bare_tensor_batches(variant):
    torch.manual_seed(0)
    module = boring_classes.BoringModel()
    start = weights(module)
    cb = SharpnessAwareMinimization(variant=variant)
    fit(module, [cb], max_steps=4)
    assert torch.isfinite(weights(module)).all() and not torch.equal(weights(module), start)
    assert cb.n_steps >= 1 and cb.sam.nonfinite_counts == {"nonfinite_clean": 0, "nonfinite_perturbed": 0}


def test_momentum_sam_on_a_module_without_momentum_says_what_to_do():
    with pytest.raises(ConfigurationError, match="momentum=0; set momentum"):
        fit(boring_classes.BoringModel(), [SharpnessAwareMinimization(variant="momentum_sam")], max_steps=1)


def test_resume_with_other_sam_settings_is_refused_naming_them(tmp_path):
    torch.manual_seed(0)
    module = boring_classes.BoringModel()
    trainer = fit(module, [SharpnessAwareMinimization(variant="looksam", k=2)], max_steps=3)
    ckpt = tmp_path / "sam.ckpt"
    trainer.save_checkpoint(ckpt)

    def resume(cb):
        torch.manual_seed(0)
        return fit(boring_classes.BoringModel(), [cb], max_steps=5, ckpt_path=str(ckpt))

    with pytest.raises(ConfigurationError, match="k: checkpoint 2 vs now 3"):
        resume(SharpnessAwareMinimization(variant="looksam", k=3))
    with pytest.raises(ConfigurationError, match="rho: checkpoint 0.05 vs now 0.1"):
        resume(SharpnessAwareMinimization(variant="looksam", k=2, rho=0.1))
    with pytest.raises(ConfigurationError, match="variant 'looksam'"):
        resume(SharpnessAwareMinimization(variant="gsam"))
    cb = SharpnessAwareMinimization(variant="looksam", k=3, resume="checkpoint")
    resume(cb)
    assert cb.sam.k == 2 and cb.sam._step == 5
    cb = SharpnessAwareMinimization(variant="looksam", k=3, resume="current")
    resume(cb)
    assert cb.sam.k == 3 and cb.sam._step == 5


def test_sam_says_what_runs_at_fit_start_and_what_it_spent_at_fit_end(caplog, monkeypatch):
    import logging
    from importlib import import_module

    from sharpguard.integrations.lightning import NAMESPACE

    for name in (NAMESPACE.split(".")[0], NAMESPACE, f"{NAMESPACE}.utilities", f"{NAMESPACE}.utilities.rank_zero"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setattr(import_module(f"{NAMESPACE}.utilities.rank_zero").rank_zero_only, "rank", 0)
    cb = SharpnessAwareMinimization(variant="asam")
    with caplog.at_level(logging.INFO):
        fit(boring_classes.BoringModel(), [cb], max_steps=3)
    assert "SAM active -- ASAM(rho=0.5, eta=0.01, interval=1): 2 forward/backward passes per step" in caplog.text
    assert f"SAM spent -- {cb.n_steps} optimizer steps with a perturbed pass" in caplog.text and cb.n_steps == 3
