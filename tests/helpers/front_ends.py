"""One training recipe run through the four front ends: plain PyTorch (``make_sam`` + a closure), the
Lightning callback, the Hugging Face ``SharpGuardTrainer`` and the Accelerate helper.

The parity tests (one configuration, the same weights everywhere) give each runner the same model,
data order, accumulation and loss; what differs between tests is only the recipe: the loss of a
micro-batch (``loss_fn(model, batch, epoch)``, a per-batch mean), the optimizer the model gets, and the
SAM settings. Every runner trains ``model`` in place; the tests compare its weights afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: the loss of one micro-batch: ``loss_fn(model, batch, epoch)``, a mean over the micro-batch
LossFn = Callable[[nn.Module, Any, int], torch.Tensor]
#: the (plain, not yet SAM-wrapped) optimizer of a model
MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


def model_loss(model: nn.Module, batch: dict, epoch: int) -> torch.Tensor:
    """The loss the model computes itself from a dict batch (``model(**batch)["loss"]``)."""
    return model(**batch)["loss"]


def run_plain(optimizer: torch.optim.Optimizer, model: nn.Module, batches: Sequence[Any], accumulation: int, *,
              loss_fn: LossFn = model_loss, steps: int | None = None, epochs: int = 1) -> None:
    """Closure form: each step's closure backpropagates ``loss / accumulation`` of its window of
    ``accumulation`` micro-batches; ``steps`` windows per epoch (all of ``batches`` when None)."""
    n_steps = len(batches) // accumulation if steps is None else steps
    for epoch in range(epochs):
        for s in range(n_steps):
            window = batches[s * accumulation : (s + 1) * accumulation]

            def closure(window=window, epoch=epoch) -> torch.Tensor:
                total = 0.0
                for mb in window:
                    loss = loss_fn(model, mb, epoch) / accumulation
                    loss.backward()
                    total = total + loss.detach()
                return total

            optimizer.zero_grad()
            optimizer.step(closure)


def run_lightning(model: nn.Module, make_optimizer: MakeOptimizer, loader: torch.utils.data.DataLoader,
                  callback: Any, accumulation: int = 1, *, loss_fn: LossFn = model_loss, max_steps: int = -1,
                  max_epochs: int | None = None, plugins: list | None = None) -> Any:
    """A LightningModule whose ``training_step`` is ``loss_fn`` (Lightning divides by the accumulation);
    returns the Trainer once it is done."""
    from sharpguard.integrations._lightning_namespace import pl

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return loss_fn(self.net, batch, self.current_epoch)

        def configure_optimizers(self):
            return make_optimizer(self.net)

    trainer = pl.Trainer(
        max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=accumulation, accelerator="cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback], plugins=plugins,
    )
    trainer.fit(Lit(), loader)
    return trainer


def run_hf(model: nn.Module, optimizer: torch.optim.Optimizer, dataset: torch.utils.data.Dataset, tmp_path: Path,
           sam: dict, *, micro_batch: int, lr: float, accumulation: int = 1, max_steps: int = -1,
           epochs: float = 3.0, loss_fn: LossFn | None = None, scaler: Any = None,
           model_accepts_loss_kwargs: bool | None = None) -> None:
    """``SharpGuardTrainer(sam=...)`` over ``dataset`` in order, at a constant learning rate without
    clipping or weight decay. ``loss_fn`` None: the Trainer's own loss (the model's ``loss`` output);
    else ``compute_loss`` is ``loss_fn`` (a per-batch mean, which the Trainer divides by the accumulation).
    ``model_accepts_loss_kwargs=False`` keeps the model's own mean loss instead of the Trainer's sum over
    ``num_items_in_batch``."""
    from transformers import TrainingArguments

    from sharpguard.integrations.huggingface import SharpGuardTrainer

    class InOrder(SharpGuardTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the same data order as the other front ends
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class OwnLoss(InOrder):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            # state.epoch is epoch + (steps done) / steps per epoch: its floor is the epoch running
            loss = loss_fn(model, inputs, math.floor(self.state.epoch))
            return (loss, {}) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
        max_steps=max_steps, num_train_epochs=epochs, learning_rate=lr, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=0, remove_unused_columns=False,
    )
    trainer_class = InOrder if loss_fn is None else OwnLoss
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, optimizers=(optimizer, None), sam=sam)
    if scaler is not None:
        trainer.accelerator.scaler = scaler
    if model_accepts_loss_kwargs is not None:
        trainer.model_accepts_loss_kwargs = model_accepts_loss_kwargs
    trainer.train()


def run_accelerate(model: nn.Module, optimizer: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                   sam: dict, accumulation: int = 1, *, loss_fn: LossFn = model_loss, epochs: int = 1,
                   scaler: Any = None) -> None:
    """The Accelerate ``SharpnessAwareMinimization`` (``sam`` its keywords) in a user's accumulate loop."""
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import SharpnessAwareMinimization

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    if scaler is not None:
        accelerator.scaler = scaler
    prepared, opt, data = accelerator.prepare(model, optimizer, loader)
    running = {"epoch": 0}  # the loss_fn reads the loop's epoch
    helper = SharpnessAwareMinimization(accelerator, prepared, opt,
                                        loss_fn=lambda m, batch: loss_fn(m, batch, running["epoch"]), **sam)
    for epoch in range(epochs):
        running["epoch"] = epoch
        for batch in data:
            with accelerator.accumulate(prepared):
                helper.backward(batch)
                opt.step()
                opt.zero_grad()
