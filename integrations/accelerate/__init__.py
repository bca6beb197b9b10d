"""Sharpness-aware training and monitoring in a hand-written Hugging Face Accelerate loop.

Accelerate's optimizer hands a closure to the GradScaler *after* it has unscaled and inf-checked
only the first gradients (``AcceleratedOptimizer.step`` -> ``scaler.step(optimizer, closure)``), so
a closure-based SAM leaves the second, still scaled, gradient unchecked and steps S times too far.
Here the two passes run in the loop instead, through Accelerate's own calls::

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.05)   # variant="gsam", ...

    for batch in loader:
        with accelerator.accumulate(model):
            loss = sam.backward(batch)        # instead of: loss = model(**batch).loss; accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)   # clips the SAM gradient
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

What :meth:`SharpnessAwareMinimization.backward` does (Foret et al., ICLR 2021, Algorithm 1; the
exact form for gradient accumulation):

1. every micro-batch: loss at ``w`` and ``accelerator.backward`` (gradients accumulate as usual);
   the batch is kept until the end of the accumulation window;
2. on the micro-batch where ``accelerator.sync_gradients`` is true: that backward runs under
   ``accelerator.no_sync(model)`` (per-worker perturbation, as in the SAM paper: each worker's
   ``e`` comes from its own gradient, which also saves one all-reduce), the SAM variant moves the
   weights to ``w + e``, the gradients are zeroed, and **every** buffered micro-batch is replayed at
   ``w + e`` with ``no_sync`` on all but the last, so the synchronised gradient is the average SAM
   gradient of the whole window; then the weights are restored by copy.

Under fp16 both passes are scaled by the same loss scale (no ``scaler.update()`` in between). ``e``
does not depend on that scale, and the gradient left for ``optimizer.step()`` is the *second* one,
which ``scaler.step`` unscales and inf-checks like any other gradient. The fault policy is the core's
(:mod:`sharpguard.optim.sam`, the same in every front end): if the *first* gradient overflowed there
is no perturbation and that non-finite gradient reaches ``scaler.step``, which skips the step and
lowers its scale, exactly as without SAM; if only the *second* overflowed, the clean one is used.

Supported: single process, DDP (``MULTI_CPU``/``MULTI_GPU``; tested on CPU over gloo with two
processes), gradient accumulation, fp32 and bf16; fp16 with a GradScaler (the logic is tested on CPU
with an injected ``torch.amp.GradScaler``; a GPU run is pending). FSDP: SAM and ASAM through the
core's sharded path (the first pass is synchronised and the norm of ``g`` is all-reduced across
shards; FSDP2 parity tested on two CPU processes at the engine level). DeepSpeed is refused: it
steps the optimizer inside ``accelerator.backward``, so nothing can run between the gradient and
the update.
"""

from __future__ import annotations

from .monitors import MonitorStep
from .sam import SAMConfig, SharpnessAwareMinimization, check_distributed_type, sharded_global_norm

__all__ = ["SAMConfig", "SharpnessAwareMinimization", "MonitorStep", "check_distributed_type", "sharded_global_norm"]
