"""Which pass of a SAM step is running now, for loss terms that treat the passes differently.

ESAM's sharpness-sensitive data selection (Du et al., ICLR 2022, Sec. 3.2) keeps the per-example
losses of the clean pass at ``w`` and, in the perturbed pass at ``w + e``, backpropagates only the
examples whose loss rose most. The loss code runs inside the framework's ``training_step`` (or the
user's closure), far from the optimizer, so the step engine says here what it is doing:

* :meth:`SAMEngine.record` (before a micro-batch's clean forward) -> ``Pass("clean", window, k)``;
* :func:`~sharpguard.optim.engine.perturbed_pass`, around each replay -> ``Pass("perturbed", window, k, point)``;
* the end of the step (or its abandonment) -> ``None``.

``window`` numbers the engine's accumulation windows (process-wide, increasing), ``k`` the micro-batch
within it in the order the clean passes ran (replays run in the same order), ``point`` the perturbed
point (0 for every variant with one). A plain global, not a ``ContextVar``: the clean forward runs in the
framework's code after ``record`` has returned, outside any call of ours.

The step engine (:mod:`sharpguard.optim.engine`) is the only writer; everything else reads
:func:`current_pass` (re-exported there).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

__all__ = ["Pass", "current_pass"]


@dataclass(frozen=True)
class Pass:
    """One forward/backward of a SAM step (see the module docs)."""

    kind: Literal["clean", "perturbed"]
    window: int
    micro_batch: int
    point: int = 0


_current: Pass | None = None
_windows = itertools.count(1)


def current_pass() -> Pass | None:
    """The pass of a SAM step that is running now, or ``None`` outside a SAM step."""
    return _current


def new_window() -> int:
    """A fresh accumulation-window number (the engine calls this when a window begins)."""
    return next(_windows)


def set_pass(value: Pass | None) -> Pass | None:
    """Set the current pass; returns the previous one (for restoring). Called by the step engine only."""
    global _current
    previous, _current = _current, value
    return previous
