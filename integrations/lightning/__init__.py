"""PyTorch Lightning callbacks: sharpness-aware minimization, adversarial training and monitors.

::

    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor, RobustnessMonitor

    trainer = Trainer(callbacks=[SharpnessAwareMinimization(rho=0.05),
                                 SharpnessMonitor(every_n_steps=50), RobustnessMonitor(eps=0.1)])

**How SAM runs (no closure needed).** Lightning's automatic optimization hands a closure to the
optimizer at 32-bit/bf16 but calls ``scaler.step`` without one under fp16, and does not zero gradients
between two closure calls under gradient accumulation (docs/lightning.md, "How it works"). So the
callback never relies on the closure: Lightning runs the clean pass as usual; in
``on_before_optimizer_step`` (gradients complete, already unscaled under ``16-mixed``) the callback moves
the weights to ``w + e`` through the optimizer adapter protocol of :func:`sharpguard.optim.make_sam`
(``prepare / perturb / unperturb``), replays every micro-batch of the accumulation window through
``trainer.strategy.training_step`` (so DDP all-reduces the perturbed gradient and autocast applies),
with ``self.log`` silenced (the perturbed loss never reaches the logs), restores ``w`` by copy and leaves
the SAM gradient in ``.grad``. Lightning then clips that gradient and steps the user's own optimizer, so
LR schedulers, checkpoints and ``LearningRateMonitor`` see exactly the optimizer the user configured.

**Adversarial training.** :class:`AdversarialTraining` writes ``x_adv`` into the batch for methods
whose loss is the task loss on adversarial inputs (PGD-AT, fast AT: the method's own cost, and SAM's
replay reuses ``x_adv``), and replaces the gradient for the methods that change the loss;
:class:`AdversarialTrainingMixin` gives ``self.adversarial_loss(batch)`` for a ``training_step`` that
returns the method's loss itself (no wasted pass; SAM reuses the adversary).

One file per concern: ``sam.py``, ``adversarial.py``, ``monitors.py``; ``_hooks.py`` holds the
small helpers over Lightning's objects. The namespace (``pytorch_lightning`` or ``lightning.pytorch``)
is chosen by :mod:`sharpguard.integrations._lightning_namespace`.
"""

from __future__ import annotations

from .._lightning_namespace import NAMESPACE
from .adversarial import AdversarialTraining, AdversarialTrainingMixin
from .monitors import RobustnessMonitor, SharpnessMonitor
from .sam import SharpnessAwareMinimization

__all__ = [
    "SharpnessAwareMinimization",
    "AdversarialTraining",
    "AdversarialTrainingMixin",
    "SharpnessMonitor",
    "RobustnessMonitor",
    "NAMESPACE",
]
