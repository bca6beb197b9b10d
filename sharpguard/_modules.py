"""The one place that looks through a model's data-parallel wrapper."""

from __future__ import annotations

from torch import nn


def unwrap_data_parallel(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model``.

    The wrapper's forward arms gradient all-reduce hooks that a ``torch.autograd.grad`` call never fires and
    that a SAM pass must control itself, so measurements and perturbed passes run the inner module. FSDP and
    ``torch.compile`` wrappers are not looked through: their forward is what shards or compiles the model.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_data_parallel(model: nn.Module | None) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` wrapper (whose gradient sync SAM must steer)."""
    return model is not None and isinstance(model, nn.parallel.DistributedDataParallel)
