"""What the core asks of a model as a whole: the module inside its data-parallel wrapper, and whether its
parameters are fake (a cost-only run)."""

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


def has_fake_tensors(model: nn.Module) -> bool:
    """Whether the model's parameters are fake (built under ``torch._subclasses.fake_tensor.FakeTensorMode``,
    FSDP2 shards of fake tensors included): shapes and devices without values, so nothing may be read back
    to the host. A measure on such a model is a cost-only run."""
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(p) for p in model.parameters())
