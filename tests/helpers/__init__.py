"""Code the tests share, imported one way: ``from tests.helpers.X import ...`` (the repository root is on
sys.path through pytest's ``pythonpath``; the torchrun scripts here get it through ``PYTHONPATH``).

- ``front_ends``: one recipe trained through plain PyTorch, Lightning, the HF Trainer and Accelerate.
- ``lit_digits``: the digits data and the LightningModule the Lightning tests train on it.
- ``tiny_text``: a one-layer BERT, a learnable text task, TrainingArguments, hand-written SAM references.
- ``optim_lsq``: float64 least squares with a hand-written gradient (the optimizer tests' reference).
- ``distributed``: gloo process groups for ``mp.spawn`` tests and the exit of torchrun workers.
- ``dist_launch``: ``torchrun`` of a script here on two CPU processes, and the per-worker SAM check.
- ``lightning_dist``: the callback that lets Lightning's ``ddp_spawn`` ranks leave gloo together.
- ``mixed_precision``: the GPU check's correctness part (every adapter in fp32/fp16/bf16, forced overflows).
- ``fsdp_case`` and ``dist_*.py``: the model, batches and scripts of the two-process runs.
"""
