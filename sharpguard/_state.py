"""Save and restore the pieces of state a measurement must not disturb (docs/design.md, promise 1).

Each guard records what it finds on entry and puts it back *exactly* on exit, including on an
exception: parameter values (by copy, never by subtraction), ``.grad`` (same tensor object and
contents, or ``None``), ``requires_grad`` flags, buffers (BatchNorm running statistics and
``num_batches_tracked``), each module's own train/eval flag, and the global RNG state.
"""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserve_modes(model: nn.Module, train: bool | None = None) -> Iterator[None]:
    """Remember every module's ``training`` flag; optionally set one mode for the body.

    Unlike ``model.train()`` on exit (what torchattacks and PyHessian do), a frozen-BN backbone kept
    in eval inside a training model stays in eval afterwards.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        if train is not None:
            model.train(train)
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def preserve_grads(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Keep each parameter's ``.grad`` (object identity and values) and ``requires_grad`` flag."""
    params = list(params)
    saved = []
    for p in params:
        g = p.grad
        saved.append((g, None if g is None else g.detach().clone(), p.requires_grad))
    try:
        yield
    finally:
        for p, (g, values, flag) in zip(params, saved):
            if g is not None:
                with torch.no_grad():
                    g.copy_(values)
            p.grad = g
            p.requires_grad_(flag)


@contextlib.contextmanager
def preserve_buffers(model: nn.Module, backup_device: torch.device | None = None) -> Iterator[None]:
    """Copy every buffer (running statistics of BatchNorm and any custom module) and copy it back; the
    copies live on ``backup_device`` where given (host memory: none of them on the model's device)."""
    saved = [(b, b.detach().clone() if backup_device is None else b.detach().to(backup_device, copy=True))
             for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, values in saved:
                b.copy_(values)


@contextlib.contextmanager
def preserve_parameters(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Copy parameter values and copy them back bitwise on exit (even after an exception)."""
    params = list(params)
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, values in zip(params, saved):
                p.copy_(values)


@contextlib.contextmanager
def preserve_sharding(model: nn.Module) -> Iterator[None]:
    """FSDP2 modules come back as sharded as they were: a forward without a backward leaves the root's
    parameters gathered (the root does not reshard after its forward), which would hold them between steps.
    FSDP2 registers the gathered parameters in place of the sharded ones, so a module whose registered
    parameters changed in the body is resharded."""
    modules = fsdp2_modules(model)
    registered = [dict(module.named_parameters()) for module in modules]
    try:
        yield
    finally:
        for module, before in zip(modules, registered):
            if any(before.get(name) is not p for name, p in module.named_parameters()):
                module.reshard()


@contextlib.contextmanager
def held_gathered(model: nn.Module) -> Iterator[None]:
    """Every FSDP2 module's parameters gathered on entry and held through the body's forwards and backwards,
    then sharded again as :func:`preserve_sharding` finds them: for a double backward, whose second pass reads
    the weights FSDP2 frees once the first is done (its hooks gather them for a first backward only). Holds
    the whole model's parameters on every rank while the body runs; changes nothing for an unsharded model."""
    modules = fsdp2_modules(model)
    if not modules:
        yield
        return
    states = {id(s): s for s in (module._get_fsdp_state() for module in modules)}.values()
    saved = [(group, group.post_forward_mesh_info, group.reshard_after_backward)
             for state in states for group in state._fsdp_param_groups]
    with preserve_sharding(model):
        try:
            for group, _, _ in saved:  # FSDP2's own switches (set_reshard_after_forward/_backward), set per group
                group.post_forward_mesh_info = None
                group.reshard_after_backward = False
            for module in modules:
                module.unshard()
            yield
        finally:
            for group, mesh_info, after_backward in saved:
                group.post_forward_mesh_info, group.reshard_after_backward = mesh_info, after_backward
            for state in states:  # a root first run in the body: FSDP2 keeps a root gathered after its forward
                if state._is_root and state._auto_reshard_after_forward:
                    for group in state._fsdp_param_groups:
                        group.post_forward_mesh_info = None


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 (``fully_shard``) modules of ``model``, itself included; none where torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Restore the global CPU (and, where initialised, CUDA) RNG state on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def side_effect_free(model: nn.Module, *, train: bool | None = False, parameters: bool = True,
                     backup_device: torch.device | None = None) -> Iterator[None]:
    """All guards at once: what a monitor or measurement wraps its work in (an FSDP2 model sharded on entry
    is resharded on exit).

    ``train=False`` (the default) runs the body in eval mode; ``None`` keeps the current modes.
    ``parameters=False`` skips the parameter copy for code that never writes to weights.
    ``backup_device`` keeps the buffers' copies there (host memory), off the model's device.
    """
    params = list(model.parameters())
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserve_rng())
        stack.enter_context(preserve_buffers(model, backup_device))
        stack.enter_context(preserve_grads(params))
        if parameters:
            stack.enter_context(preserve_parameters(params))
        stack.enter_context(preserve_modes(model, train))
        stack.enter_context(preserve_sharding(model))
        yield


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2's shard of a parameter, its gradient or state), the tensor
    itself otherwise (unsharded, or FSDP1's flat shards)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Parameters with ``requires_grad``; raises if there are none."""
    from .errors import ConfigurationError

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigurationError(
            "the model has no trainable parameters (requires_grad=True); unfreeze at least one before measuring."
        )
    return params


def _is_carried_state(value: Any) -> bool:
    if value is None or isinstance(value, torch.Tensor):
        return True
    if isinstance(value, tuple):
        return all(_is_carried_state(v) for v in value)
    return False


def module_attribute_state(module: nn.Module) -> dict[str, Any]:
    """The state a ``training_step`` may carry across steps in its module's own attributes.

    The public (no leading ``_``) entries of ``module.__dict__`` holding tensors, ``None`` or
    (nested) tuples of them -- a truncated-BPTT ``self.hidden`` -- by reference: attributes the step
    *reassigns* come back; tensors it changes in place do not. Lists are left alone: they are the
    logs a step appends to (``self.training_step_outputs``), not state it starts from. Parameters,
    buffers and submodules live elsewhere and are never touched. Only the module itself is read,
    not its children, so the cost is a few dictionary lookups.
    """
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and _is_carried_state(v)}


def restore_module_attributes(module: nn.Module, state: dict[str, Any]) -> None:
    """Put back :func:`module_attribute_state` output: set those attributes, drop carried ones added since."""
    for k in [k for k, v in vars(module).items() if not k.startswith("_") and _is_carried_state(v) and k not in state]:
        delattr(module, k)
    for k, v in state.items():
        setattr(module, k, v)
