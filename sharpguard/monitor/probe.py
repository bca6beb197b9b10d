"""A frozen, seeded probe set: the fixed examples every monitor check is measured on.

Three sources, none of which iterates the training DataLoader again (its sampler draws from the global
RNG, so a second pass would change which batches training sees):

* given by the user: ``ProbeSet(batches)``;
* captured from batches training already drew: :meth:`ProbeSet.capture` copies (``clone().detach()``)
  the first examples it is shown until ``size`` are held;
* taken from a dataset by index with the probe's own ``torch.Generator``: :meth:`ProbeSet.from_dataset`.

A fixed probe is what makes consecutive checks comparable (the EoS papers use the first 5,000 training
examples, GradAlign 256 fixed ones); the hash in :attr:`ProbeSet.fingerprint` is recorded with every
metric so results from different probes are never compared silently.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .._batches import apply_to_tensors, as_batches, batch_size, move_to, tensors_in
from .._state import preserve_rng
from .._validation import positive_int
from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = ["ProbeSet"]


def _take(batch: Any, n: int) -> Any:
    """The first ``n`` examples of a batch, copied and detached (outside inference mode)."""
    return apply_to_tensors(batch, lambda t: (t[:n] if t.dim() > 0 else t).detach().clone())


class ProbeSet:
    """A list of batches that stays fixed for the whole run.

    Args:
        batches: the probe batches, or ``None`` to fill the set later with :meth:`capture`.
        size: number of examples to capture (ignored when ``batches`` is given).
        batch_size: examples per probe batch when capturing; default: the size of the batches seen.
        seed: recorded with the metrics (and used by :meth:`from_dataset`).
    """

    @rules.checked()
    def __init__(
        self,
        batches: Any | None = None,
        *,
        size: int = 256,
        batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        positive_int("probe size", size)
        if batch_size is not None:
            positive_int("probe batch_size", batch_size)
        self.size = int(size)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.source = "captured"
        self._batches: list[Any] = []
        self._held = 0
        self._frozen = False
        if batches is not None:
            self._batches = [_take(b, batch_size_of(b)) for b in as_batches(batches)]
            sizes = [batch_size_of(b) for b in self._batches]
            if 0 in sizes:
                raise ConfigurationError(
                    f"probe batch {sizes.index(0)} holds no examples (size 0); every probe batch needs at least one."
                )
            self._held = sum(sizes)
            self.size = self._held
            self._frozen = True
            self.source = "given"

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dataset(
        cls,
        dataset: Sequence[Any],
        size: int = 256,
        *,
        seed: int = 0,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> ProbeSet:
        """Pick ``size`` examples of a map-style dataset by index with a private generator.

        The global RNG is saved and restored around ``dataset[i]`` (a random augmentation there must not
        move training's random stream).
        """
        n = len(dataset)
        if n == 0:
            raise ConfigurationError("the dataset is empty; a probe set needs at least one example.")
        if collate_fn is None:
            from torch.utils.data import default_collate as collate_fn
        generator = torch.Generator().manual_seed(int(seed))
        index = torch.randperm(n, generator=generator)[: min(size, n)].tolist()
        with preserve_rng():
            batches = [
                collate_fn([dataset[i] for i in index[k : k + batch_size]]) for k in range(0, len(index), batch_size)
            ]
        probe = cls(batches, seed=seed)
        probe.source = "dataset"
        return probe

    def capture(self, batch: Any) -> bool:
        """Copy examples of ``batch`` until ``size`` are held; return True once the set is complete.

        Called with batches training already drew; a no-op once complete. Works on inference tensors
        (validation under ``torch.inference_mode``): the copies are ordinary tensors.
        """
        if self._frozen:
            return True
        need = self.size - self._held
        n = min(need, batch_size_of(batch))
        if n == 0:
            return self._frozen  # an empty batch adds nothing
        if self.batch_size is not None:
            n = min(n, self.batch_size)
        with torch.inference_mode(False):
            part = _take(batch, n)
        self._batches.append(part)
        self._held += n
        if self._held >= self.size:
            self._frozen = True
        elif self.batch_size is not None and n < batch_size_of(batch):
            # the rest of this batch fills the next probe batches
            rest = _drop(batch, n)
            return self.capture(rest)
        return self._frozen

    def freeze(self) -> None:
        """Stop capturing and measure with what is held (a source smaller than ``size``)."""
        if not self._batches:
            raise ConfigurationError("the probe set is empty; nothing to freeze. Pass probe=[batches].")
        self._frozen = True
        self.size = self._held
        self._fingerprint = None

    # -- access ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when the probe set holds ``size`` examples (or was given)."""
        return self._frozen

    @property
    def batches(self) -> list[Any]:
        """The probe batches (raises if the set is still being captured)."""
        if not self._batches:
            raise ConfigurationError(
                "the probe set is empty; pass probe=..., or let the monitor capture training batches first."
            )
        return self._batches

    def __len__(self) -> int:
        return self._held

    def to(self, device: torch.device) -> ProbeSet:
        """Move the probe batches to ``device`` in place (no-op when already there); return self."""
        self._batches = [move_to(b, device) for b in self._batches]
        return self

    @property
    def fingerprint(self) -> str:
        """A short hash of the probe tensors, recorded with every metric (cached once frozen); of their
        shapes and dtypes alone for fake tensors (``FakeTensorMode``), which have no values."""
        from torch._subclasses.fake_tensor import is_fake

        if self._frozen and getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.sha1()
        for b in self._batches:
            for t in tensors_in(b):
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                if not is_fake(t):
                    h.update(t.detach().cpu().contiguous().view(-1).to(torch.float64).sum().numpy().tobytes())
        self._fingerprint = h.hexdigest()[:12]
        return self._fingerprint

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._batches for t in tensors_in(b))

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self, max_bytes: int = 4 << 20) -> dict[str, Any]:
        """Settings always; the tensors themselves only when they take at most ``max_bytes`` (CPU copies)."""
        state: dict[str, Any] = {
            "size": self.size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "source": self.source,
            "held": self._held,
            "frozen": self._frozen,
            "fingerprint": self.fingerprint if self._batches else None,
            "batches": None,
        }
        if self._batches and self.nbytes <= max_bytes:
            state["batches"] = [_loadable(move_to(b, torch.device("cpu"))) for b in self._batches]
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | None = None) -> bool:
        """Restore; returns False when the tensors were not stored (the set must be captured again)."""
        self.size, self.batch_size, self.seed = int(state["size"]), state["batch_size"], int(state["seed"])
        self.source = state["source"]
        if state.get("batches") is None:
            if self.source != "given":  # a given probe stays; a captured one is captured again
                self._batches, self._held, self._frozen = [], 0, False
            return False
        classes = _namedtuple_classes(self._batches)  # a given probe's own classes, where it was given again
        batches = [_restored(b, classes) for b in state["batches"]]
        self._batches = [move_to(b, device) for b in batches] if device is not None else batches
        self._held, self._frozen = int(state["held"]), bool(state["frozen"])
        return True


#: the key a stored namedtuple batch is kept under: ``torch.load(weights_only=True)`` refuses the class itself
_NAMEDTUPLE = "__sharpguard_namedtuple__"


def _loadable(batch: Any) -> Any:
    """``batch`` with every namedtuple as a plain mapping naming its class and fields, so that a checkpoint
    holding the probe loads with ``weights_only=True`` (a namedtuple's class is not an allowed global)."""
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return {_NAMEDTUPLE: [type(batch).__name__, *batch._fields], "values": [_loadable(v) for v in batch]}
    if isinstance(batch, Mapping):
        return {k: _loadable(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_loadable(v) for v in batch)
    return batch


def _namedtuple_classes(batches: Sequence[Any]) -> dict[tuple[str, ...], type]:
    """The namedtuple classes in ``batches``, by name and fields."""
    found: dict[tuple[str, ...], type] = {}

    def walk(item: Any) -> None:
        if isinstance(item, tuple) and hasattr(item, "_fields"):
            found[(type(item).__name__, *item._fields)] = type(item)
        if isinstance(item, Mapping):
            item = list(item.values())
        if isinstance(item, (tuple, list)):
            for v in item:
                walk(v)

    walk(list(batches))
    return found


def _restored(batch: Any, classes: Mapping[tuple[str, ...], type]) -> Any:
    """:func:`_loadable` undone: each stored namedtuple comes back as the class of that name and those fields
    among ``classes`` (the probe given to the new monitor), else as a namedtuple class made to match it, whose
    fields a ``loss_fn`` reads the same way."""
    if isinstance(batch, Mapping) and _NAMEDTUPLE in batch:
        key = tuple(str(k) for k in batch[_NAMEDTUPLE])
        cls = classes.get(key) or collections.namedtuple(key[0], key[1:])
        return cls(*(_restored(v, classes) for v in batch["values"]))
    if isinstance(batch, Mapping):
        return {k: _restored(v, classes) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_restored(v, classes) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    return batch_size(batch)


def _drop(batch: Any, n: int) -> Any:
    """A batch without its first ``n`` examples (views, not copies)."""
    return apply_to_tensors(batch, lambda t: t[n:] if t.dim() > 0 else t)
