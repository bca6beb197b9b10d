"""The Lightning callbacks' one sync window: DDP gradient sync is blocked before the stepping micro-batch's
clean forward exactly when the SAM engine says its clean pass may stay local, and released after its backward
or when the batch ends or fails; ``per_worker`` is the engine's answer, before and after the fit builds it."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.integrations.lightning import NAMESPACE, AdversarialTraining, SharpnessAwareMinimization

pl = __import__(NAMESPACE, fromlist=["strategies"])


class _Strategy(pl.strategies.DDPStrategy):
    """A DDP strategy that records when gradient sync is blocked instead of reaching into a process group."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    @contextlib.contextmanager
    def block_backward_sync(self):
        self.events.append("block")
        try:
            yield
        finally:
            self.events.append("release")


def _trainer(n_optimizers: int = 1, *, stepping: bool = True) -> SimpleNamespace:
    net = nn.Linear(3, 2)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for _ in range(n_optimizers)]
    epoch_loop = SimpleNamespace(_should_accumulate=lambda: not stepping)
    return SimpleNamespace(strategy=_Strategy(), optimizers=optimizers, fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
                           accumulate_grad_batches=1), net


@pytest.mark.parametrize("variant,per_worker,blocks",
                         [("sam", None, True), ("sam", False, False), ("gsam", None, False)])
def test_sam_blocks_sync_where_the_engine_says_and_releases_after_the_backward(variant, per_worker, blocks):
    callback = SharpnessAwareMinimization(rho=0.05, variant=variant, per_worker=per_worker)
    before = callback.per_worker
    trainer, net = _trainer()
    callback.on_fit_start(trainer, net)
    assert callback.per_worker is before is callback.engine.per_worker
    callback.on_train_batch_start(trainer, net, (torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)), 0)
    assert trainer.strategy.events == (["block"] if blocks else [])
    callback.on_after_backward(trainer, net)
    assert trainer.strategy.events == (["block", "release"] if blocks else [])
    callback.on_train_batch_end(trainer, net, None, None, 0)  # nothing left to release, the window dropped
    assert trainer.strategy.events == (["block", "release"] if blocks else []) and not callback.engine.pending


def test_a_failing_batch_releases_the_sync_window_and_drops_the_sam_window():
    callback = SharpnessAwareMinimization(rho=0.05)
    trainer, net = _trainer()
    callback.on_fit_start(trainer, net)
    callback.on_train_batch_start(trainer, net, (torch.zeros(1, 3),), 0)
    callback.on_exception(trainer, net, RuntimeError("forward failed"))
    assert trainer.strategy.events == ["block", "release"] and not callback.engine.pending


def test_a_micro_batch_that_does_not_step_keeps_sync():
    callback = SharpnessAwareMinimization(rho=0.05)
    trainer, net = _trainer(stepping=False)
    callback.on_fit_start(trainer, net)
    callback.on_train_batch_start(trainer, net, (torch.zeros(1, 3),), 0)
    assert trainer.strategy.events == []


def test_gradient_replacement_blocks_the_discarded_clean_pass_and_releases_it():
    callback = AdversarialTraining("trades", steps=1)
    trainer, net = _trainer()
    callback.on_fit_start(trainer, net)
    callback.on_train_batch_start(trainer, net, (torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)), 0)
    callback.on_train_batch_end(trainer, net, None, None, 0)
    assert trainer.strategy.events == ["block", "release"]


@pytest.mark.parametrize("make", [lambda: SharpnessAwareMinimization(rho=0.05), lambda: AdversarialTraining("trades")])
def test_both_callbacks_refuse_two_optimizers_with_one_sentence(make):
    trainer, net = _trainer(n_optimizers=2)
    with pytest.raises(ConfigurationError, match="needs exactly one optimizer, found 2"):
        make().on_fit_start(trainer, net)
