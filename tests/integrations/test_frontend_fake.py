"""The SAM step of every front end on fake tensors (issue 21): a small GPT-2 built under ``FakeTensorMode``
trains two optimizer steps through plain PyTorch, the Lightning callback in ``Trainer.fit``, the Hugging
Face ``SharpGuardTrainer.train`` and the Accelerate helper, and none of sharpguard's code reads a value (any
read raises ``DataDependentOutputException``). Each step runs SAM's two forward passes (counted by a hook:
no silent fallback to the plain step) and the weights stay fake tensors.

What the harness does for the frameworks, not for sharpguard, each the user-side equivalent of a
simulation set-up:
- ``Module.to``/``Module.cpu`` are no-ops: the model already sits on the CPU, and torch's ``Module._apply``
  cannot swap a fake parameter for itself ("Cannot swap t1 because it has weakref associated with it");
- the batches come as an iterable of fake batches, not a ``DataLoader``, whose iterator draws its base seed
  with a host read;
- the HF Trainer runs with ``logging_nan_inf_filter=False`` (that filter tests each step's loss on the host),
  and its own ``_finalize_training`` reads the summed loss after the last step: the run must get that far.
"""

from __future__ import annotations

import tempfile
import traceback
import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

from sharpguard.simulate import fake_tensors
from tests.helpers import front_ends

pytestmark = pytest.mark.usefixtures("_fresh_accelerate_state")

STEPS = 2


class _Batches:
    """An iterable of ready batches with a length (Lightning and the Trainer size their epochs by it)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _plain(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    from sharpguard.optim import make_sam

    front_ends.run_plain(make_sam(opt, "sam", rho=0.05), model, batches, accumulation=1)


def _lightning(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    trainer = front_ends.run_lightning(model, lambda net: opt, _Batches(batches),
                                       SharpnessAwareMinimization(rho=0.05), max_steps=STEPS)
    assert trainer.global_step == STEPS


def _huggingface(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    from transformers import TrainingArguments

    from sharpguard.integrations.huggingface import SharpGuardTrainer

    class OnFakeBatches(SharpGuardTrainer):
        def get_train_dataloader(self):
            return _Batches(batches)

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(batches[0]["input_ids"]), max_steps=STEPS,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, logging_nan_inf_filter=False,
        max_grad_norm=0.0, lr_scheduler_type="constant", disable_tqdm=True,
    )
    trainer = OnFakeBatches(model=model, args=args, optimizers=(opt, None), sam={"rho": 0.05})
    with pytest.raises(DataDependentOutputException) as raised:
        trainer.train()
    # the only read: the Trainer's summed loss, after the last step
    assert traceback.extract_tb(raised.tb)[-1 - _frames_into_torch(raised.tb)].name == "_finalize_training"
    assert trainer.state.global_step == STEPS


def _frames_into_torch(tb) -> int:
    """How many of the innermost frames are torch's own (the fake tensor's dispatch of ``.item()``)."""
    frames = traceback.extract_tb(tb)
    n = 0
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            break
        n += 1
    return n


def _accelerate(model: nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    front_ends.run_accelerate(model, opt, _Batches(batches), {"rho": 0.05})  # prepare() passes the iterable on


FRONT_ENDS = {"plain": _plain, "lightning": _lightning, "huggingface": _huggingface, "accelerate": _accelerate}


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_every_front_ends_sam_step_runs_on_fake_tensors_without_reading_a_value(monkeypatch, front_end):
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(nn.Module, "cpu", lambda self, *args, **kwargs: self)
    with warnings.catch_warnings(), fake_tensors():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=16, n_embd=32, n_layer=1, n_head=2))
        forwards = []
        model.register_forward_pre_hook(lambda module, args: forwards.append(1))
        shapes = [p.shape for p in model.parameters()]
        batches = []
        for _ in range(STEPS):
            ids = torch.randint(0, 256, (4, 16))
            batches.append({"input_ids": ids, "labels": ids})
        FRONT_ENDS[front_end](model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches)
    assert len(forwards) == 2 * STEPS  # SAM's clean pass and its pass at w + e, at each step
    assert all(isinstance(p, FakeTensor) for p in model.parameters())
    assert [p.shape for p in model.parameters()] == shapes
