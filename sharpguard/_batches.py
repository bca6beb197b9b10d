"""The loss protocol and probe sets shared by measurements, attacks and monitors.

``loss_fn(model, batch) -> scalar tensor``. The default understands the two batch shapes users have:
``(inputs, targets, ...)`` -> cross entropy of ``model(inputs)``, and a mapping (a Hugging Face batch)
-> ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigurationError, NonFiniteLossError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def apply_to_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it, nested at any depth (the role of Lightning's
    ``apply_to_collection``): the one walker over user batches.

    Mappings come back as plain dicts (what ``model(**batch)`` and a ``loss_fn`` need of a mapping), namedtuples
    as the same namedtuple, tuples and lists as tuples and lists; anything else is returned as it is.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: apply_to_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple):
        items = [apply_to_tensors(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [apply_to_tensors(v, fn) for v in batch]
    return batch


def tensors_in(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch, in the order :func:`apply_to_tensors` visits them."""
    found: list[torch.Tensor] = []
    apply_to_tensors(batch, found.append)
    return found


def detach_inference(batch: Any) -> Any:
    """``batch`` with its inference-mode tensors cloned (autograd cannot save those for backward); other
    tensors are kept as they are."""
    return apply_to_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, a Hugging Face ``ModelOutput`` or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigurationError(
        f"cannot find logits in a model output of type {type(output).__name__}; pass a loss_fn(model, batch)."
    )


def _cross_entropy(logits: torch.Tensor, targets: Any, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy``, with torch's raw error for a class index out of range turned into one sentence.

    The range is read only after torch has failed (on the CPU an ``IndexError``; a device assert elsewhere),
    so the common path adds no host synchronisation."""
    try:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    except (IndexError, RuntimeError) as exc:
        if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.numel() == 0:
            raise
        n_classes = logits.shape[-1]
        valid = targets[targets != ignore_index]
        if valid.numel() == 0:
            raise
        lo, hi = (int(v) for v in torch.stack([valid.min(), valid.max()]).tolist())
        if lo >= 0 and hi < n_classes:
            raise
        raise ConfigurationError(
            f"the default loss got class indices in [{lo}, {hi}] for a model with {n_classes} outputs; labels must "
            f"be in [0, {n_classes}) (or {ignore_index} to ignore a position): check the label encoding of the "
            "batch (a monitor's probe included) or the model's output size."
        ) from exc


def default_loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross entropy for ``(inputs, targets)``; ``model(**batch).loss`` for a mapping."""
    if isinstance(batch, Mapping):
        try:
            out = model(**batch)
        except TypeError as exc:
            raise ConfigurationError(
                f"the default loss calls model(**batch) for a mapping batch (keys {sorted(map(str, batch))}) and that "
                f"failed ({exc}); pass loss_fn=lambda model, batch: ... that computes the loss of your batch."
            ) from exc
        loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ConfigurationError(
                "the model returned no .loss for a mapping batch; include 'labels' in the batch or pass a loss_fn."
            )
        return loss
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        targets = class_indices(targets)
        logits = logits_of(model(inputs))
        if (
            logits.dim() >= 3
            and isinstance(targets, torch.Tensor)
            and targets.dim() == logits.dim() - 1
            and logits.shape[:-1] == targets.shape
        ):
            # (batch, time, vocab) logits of a language model against (batch, time) targets
            return _cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-100)
        if isinstance(targets, torch.Tensor) and targets.dtype.is_floating_point and targets.shape != logits.shape:
            raise ConfigurationError(
                f"targets of dtype {targets.dtype} and shape {tuple(targets.shape)} are neither class indices nor "
                f"probabilities of shape {tuple(logits.shape)}; pass integer class indices (e.g. y.long())."
            )
        return _cross_entropy(logits, targets)
    raise ConfigurationError(
        f"the default loss needs (inputs, targets) or a mapping with labels, got {type(batch).__name__}; pass a "
        "loss_fn."
    )


def class_indices(targets: Any) -> Any:
    """Integer targets as int64 (what torch's losses take): int32 and uint8 class indices are accepted."""
    if isinstance(targets, torch.Tensor) and not targets.dtype.is_floating_point and not targets.dtype.is_complex:
        if targets.dtype not in (torch.long, torch.bool):
            return targets.long()
    return targets


def check_default_targets(batches: list[Any]) -> None:
    """Refuse what the default cross entropy cannot take: 1-D floating targets (neither class indices
    nor per-class probabilities). A custom loss may take any targets; it is not called here."""
    for i, batch in enumerate(batches):
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
            targets = batch[1]
            if isinstance(targets, torch.Tensor) and targets.dtype.is_floating_point and targets.dim() == 1:
                raise ConfigurationError(
                    f"batch {i} has 1-D targets of dtype {targets.dtype}, which the default cross entropy cannot "
                    "take; pass integer class indices (y.long()) or a loss_fn for other targets."
                )


class BatchList(list):
    """A list that is known to hold batches (a probe set), never one ``[inputs, targets]`` batch.

    Needed for bare-tensor batches: ``[x1, x2]`` from a DataLoader is one batch, a probe of two
    bare-tensor batches is a :class:`BatchList`.
    """


def as_batches(batches: Any) -> list[Any]:
    """One batch or a list of batches -> a non-empty list of batches (a frozen probe set)."""
    if isinstance(batches, BatchList):
        out = list(batches)
    elif isinstance(batches, Mapping):
        out = [batches]
    elif isinstance(batches, tuple) and batches and isinstance(batches[0], torch.Tensor):
        out = [batches]  # (inputs, targets) is one batch
    elif isinstance(batches, list) and batches and isinstance(batches[0], torch.Tensor):
        out = [tuple(batches)]  # [inputs, targets] from a DataLoader is one batch too
    elif isinstance(batches, torch.Tensor):
        raise ConfigurationError(
            "a bare tensor is not a batch; pass (inputs, targets), a mapping, or a list of such batches."
        )
    else:
        try:
            out = list(batches)
        except TypeError:
            raise ConfigurationError(
                f"batches must be a batch or an iterable of batches, got {type(batches).__name__}; "
                "pass (inputs, targets), a mapping, or a list of such batches."
            ) from None
    if not out:
        raise ConfigurationError("the probe set is empty; pass at least one batch.")
    for i, batch in enumerate(out):
        if _first_dim(batch) == 0:
            raise ConfigurationError(f"batch {i} holds no examples; pass batches with at least one example.")
    return out


def _first_dim(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` that has one (``None`` where none has)."""
    return next((int(t.shape[0]) for t in tensors_in(batch) if t.dim() > 0), None)


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of its first tensor (bare, in a tuple, list or
    mapping, nested at any depth)."""
    n = _first_dim(batch)
    if n is None:
        raise ConfigurationError(
            f"cannot tell the size of a batch of type {type(batch).__name__}: it holds no tensor with a batch "
            "dimension; pass probe=[batches] of tensors."
        )
    return n


def checked_loss(loss: Any, where: str = "loss_fn") -> torch.Tensor:
    """Raise a clear error for a non-tensor, non-scalar or non-finite loss; return it otherwise.

    The finiteness check synchronises with the device; measurements call it, the SAM hot path does not.
    A fake tensor (``FakeTensorMode``: a cost-only run) has no value to check and passes on.
    """
    if not isinstance(loss, torch.Tensor):
        raise ConfigurationError(f"{where} must return a tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise ConfigurationError(
            f"{where} must return a scalar loss, got shape {tuple(loss.shape)}; reduce it (e.g. .mean())."
        )
    from torch._subclasses.fake_tensor import is_fake

    if not is_fake(loss) and not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(f"{where} returned a non-finite loss ({loss.item()}); check the model and the batch.")
    return loss.reshape(())


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    return apply_to_tensors(batch, lambda t: t.to(device))


def slice_bounds(n: int, parts: int) -> list[int]:
    """Where :func:`split_batch` cuts ``n`` examples into ``parts`` slices (at most ``n``, at least 1): as even
    as whole examples allow."""
    parts = max(1, min(int(parts), n))
    return [round(i * n / parts) for i in range(parts + 1)]


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` as up to ``parts`` consecutive micro-batches along its example dimension.

    Every tensor whose first dimension is the batch size (:func:`batch_size`) is sliced; 0-dim tensors and
    non-tensors are shared by every micro-batch. A tensor with another first dimension (a flattened
    ``(batch * time,)`` target, say) makes the split ambiguous: that is refused, since slicing it by rows
    would pair inputs with the wrong targets. ``parts`` larger than the batch gives one example per part.
    """
    n = batch_size(batch)
    parts = max(1, min(int(parts), n))
    if parts == 1:
        return [batch]
    bounds = slice_bounds(n, parts)

    for tensor in tensors_in(batch):
        if tensor.dim() > 0 and tensor.shape[0] != n:
            raise ConfigurationError(
                f"cannot split a probe batch of {n} examples into micro-batches: it holds a tensor of shape "
                f"{tuple(tensor.shape)} whose first dimension is not the batch size; keep every per-example tensor "
                "batch-first (targets shaped (batch, ...), not flattened), or pass micro_batches=1."
            )

    def take(lo: int, hi: int) -> Any:
        return apply_to_tensors(batch, lambda t: t[lo:hi] if t.dim() > 0 else t)

    return [take(bounds[i], bounds[i + 1]) for i in range(parts)]
