"""Hugging Face Trainer integration: SAM and embedding-space adversarial training, and monitors.

::

    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    trainer = SharpGuardTrainer(
        model=model, args=args, train_dataset=train,
        sam={"rho": 0.05, "variant": "asam"},            # any variant of sharpguard.optim.make_sam
        adversarial="freelb",                            # or make_method("smart", ...); both together allowed
        callbacks=[SharpnessMonitorCallback()],              # adaptive: checks within 5% of training time
    )

Why a Trainer subclass for SAM: the Trainer calls ``optimizer.step()`` with no closure after
clipping, and no callback sees the batch or the loss, so the only place that can run a second
forward/backward is ``training_step``. :class:`SharpGuardTrainerMixin` overrides just
``training_step`` (calling ``super()`` with ``*args, **kwargs`` passed through, so the
``num_items_in_batch`` argument and later signature changes survive) and ``compute_loss`` (for
``adversarial=`` only). Per optimizer step:

1. each micro-batch runs the Trainer's own ``training_step`` at ``w`` (loss, GA scaling,
   ``accelerator.backward``) and is kept;
2. on the micro-batch where ``accelerator.sync_gradients`` is true, that clean backward runs under
   ``no_sync`` (per-worker perturbation, as in the SAM paper), the SAM variant moves the weights to
   ``w + e``, and every kept micro-batch is replayed through the Trainer's ``training_step`` at
   ``w + e`` (``no_sync`` on all but the last); the weights are restored by copy.

The Trainer then clips (the final, SAM gradient), steps the base optimizer, runs the scheduler and
zeroes the gradients as usual. The logged ``loss`` is the loss at ``w``. See
:mod:`sharpguard.integrations.accelerate` for fp16, FSDP and DeepSpeed (refused).

The monitor callbacks are plain ``TrainerCallback``\\ s that work with any Trainer. With a plain
``Trainer`` they write their metrics into ``state.log_history`` and their history file and say once
that the ``report_to`` integrations are out of reach; holding the trainer (``set_trainer``:
:class:`SharpGuardTrainer` calls it, or call it before ``train()``) their metrics go through
``Trainer.log``: into ``state.log_history`` and every ``report_to`` integration.
Their probe set is drawn from the training dataset by index with a private generator (the DataLoader
is never iterated), every measurement is side-effect free (a monitored run trains to bitwise the same
weights), and their state goes into ``trainer_state.json`` through transformers' own callback-state
mechanism (``ExportableState``) and comes back on resume.
"""

from __future__ import annotations

from sharpguard.errors import require

require("transformers", "hf")
require("accelerate", "hf")

from ..accelerate import SAMConfig  # noqa: E402
from .monitors import RobustnessMonitorCallback, SharpnessMonitorCallback  # noqa: E402
from .trainer import SharpGuardTrainer, SharpGuardTrainerMixin  # noqa: E402

__all__ = [
    "SAMConfig",
    "SharpGuardTrainer",
    "SharpGuardTrainerMixin",
    "SharpnessMonitorCallback",
    "RobustnessMonitorCallback",
]
