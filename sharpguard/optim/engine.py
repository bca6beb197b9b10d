"""The SAM step engine: one SAM step over an accumulation window, for every front end.

:meth:`SAM.step` (a closure), the Lightning callback, the Hugging Face Trainer and the Accelerate
helper all run the same sequence, and this module is the only place it is written:

1. ``begin_window()`` before the first forward of a window (Momentum-SAM moves ``w`` here);
2. for each micro-batch, ``record(replay, module)`` *before* its clean forward, then the framework's
   own forward/backward at ``w`` -- under ``clean_pass_context(...)`` on the micro-batch that
   steps, which suspends gradient sync when the perturbation is per worker (Foret et al., ICLR 2021,
   Sec. 4: m-sharpness; each worker ascends along its own gradient);
3. ``finish(no_sync=..., unscale=...)`` after the last clean backward: perturb (save ``w``, move to
   ``w + e``, snapshot running statistics), release the gradients (``None``), replay every recorded
   micro-batch at ``w + e`` -- each from the module state its clean pass started from, all but
   the last under ``no_sync`` so only the last backward all-reduces -- unscale the replayed
   gradients if the framework already unscaled the clean ones, restore ``w`` by copy, apply the
   variant's update and the non-finite policy (:meth:`SAM.unperturb`), and put back the module
   state the clean pass left. A variant with more than one perturbed point (GAM) asks for
   another round after the replays (:meth:`SAM.advance`): the gradients are released again and
   every micro-batch is replayed again, from the same module state, at its next point.

An adapter supplies only what its framework knows: how to run one micro-batch forward/backward
(the ``replay`` callables), how to suspend gradient sync (``no_sync``), and where the scaler is
(``unscale``). The algorithm, its defaults and its fault policy stay in :mod:`sharpguard.optim`.

The engine drives any object of the step protocol (:class:`~sharpguard.optim.protocol.SAMStepProtocol`)
and imports no optimizer class, so :mod:`sharpguard.optim.sam` can build on it. It is the only writer
of the current pass (:mod:`sharpguard.optim._phase`); loss terms and adapters read it with
:func:`current_pass`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._state import module_attribute_state, restore_module_attributes
from ..errors import ConfigurationError
from . import _phase
from ._phase import Pass, current_pass
from .protocol import SAMStepProtocol
from .. import _validation as rules

__all__ = ["SAMEngine", "Replay", "Pass", "current_pass", "in_perturbed_pass", "perturbed_pass", "unwrap_optimizer"]

#: runs one micro-batch's forward and backward at the current weights
Replay = Callable[[], Any]


class SAMEngine:
    """Owns one SAM step over an accumulation window (see the module docs for the sequence).

    Args:
        sam: the SAM variant (any :class:`~sharpguard.optim.SAM`, or the sharded form) whose
            step protocol (:class:`~sharpguard.optim.protocol.SAMStepProtocol`) the engine drives.
        sharded: the gradients are shards (FSDP): the clean pass must be synchronised (the norm
            of ``g`` needs every shard's reduced gradient), so the perturbation is never per worker.
    """

    @rules.checked()
    def __init__(self, sam: SAMStepProtocol, *, sharded: bool = False) -> None:
        self.sam = sam
        self.sharded = bool(sharded)
        self._window: list[tuple[Replay, Any]] = []
        self._prepared = False
        self._window_id = 0  # this window's number in sharpguard.optim._phase (0: none begun)
        self.n_steps = 0  # optimizer steps that ran a perturbed pass

    # ------------------------------------------------------------------------------- policy
    @property
    def per_worker(self) -> bool:
        """Whether each worker perturbs along its own (unsynchronised) clean gradient.

        True for SAM/ASAM unless ``sync_perturbation`` was asked for; never for variants whose
        update uses the clean gradient (``per_worker_safe = False``: the replicas would diverge) nor
        for sharded gradients.
        """
        return (
            not self.sharded
            and not getattr(self.sam, "sync_perturbation", False)
            and bool(getattr(self.sam, "per_worker_safe", False))
        )

    def clean_pass_unsynced(self, *, distributed: bool) -> bool:
        """Whether the stepping micro-batch's clean backward may skip the gradient all-reduce.

        Only when a perturbed pass follows (``needs_second_pass()`` is known before the forward):
        on LookSAM's reuse steps, ``interval`` skips and Momentum-SAM the clean gradient *is* the
        update and must be reduced as usual.
        """
        return distributed and self.per_worker and self.sam.needs_second_pass()

    # ------------------------------------------------------------------------------- window
    def begin_window(self) -> None:
        """Before the first forward of an accumulation window (idempotent within a window)."""
        if not self._prepared:
            reserve = getattr(self.sam, "reserve_buffers", None)
            if reserve is not None:
                reserve()
            self.sam.prepare()
            self._prepared = True
            self._window_id = _phase.new_window()

    def record(self, replay: Replay, module: nn.Module | None = None) -> None:
        """Keep one micro-batch for the perturbed pass; call before its clean forward.

        ``module``: the module whose attribute state a ``training_step`` may carry across steps
        (a truncated-BPTT ``self.hidden``); its state now is what the replay at ``w + e`` starts from.
        """
        self.begin_window()
        state = module_attribute_state(module) if module is not None else None
        self._window.append((replay, (module, state)))
        _phase.set_pass(_phase.Pass("clean", self._window_id, len(self._window) - 1))

    @property
    def pending(self) -> int:
        """Micro-batches recorded for the current window."""
        return len(self._window)

    def clean_pass_context(self, no_sync: Callable[[], contextlib.AbstractContextManager] | None, *,
                           distributed: bool) -> contextlib.AbstractContextManager:
        """``no_sync()`` around the stepping micro-batch's clean backward when ``e`` is per worker."""
        if no_sync is not None and self.clean_pass_unsynced(distributed=distributed):
            return no_sync()
        return contextlib.nullcontext()

    def abandon(self) -> None:
        """Drop the window (an exception, or a step the framework skips): ``w`` back by copy."""
        self._window = []
        self._prepared = False
        _phase.set_pass(None)
        self.sam.cancel()

    def summary(self) -> str:
        """What the engine spent, for the console at the end of a run."""
        counts = getattr(self.sam, "nonfinite_counts", None)
        done = "fell back" if getattr(self.sam, "nonfinite", "skip") == "fallback" else "were skipped"
        faults = "" if counts is None else (
            f"; non-finite clean gradients {counts['nonfinite_clean']}, steps with a non-finite gradient at "
            f"w + e that {done} {counts['nonfinite_perturbed']}"
        )
        points = int(getattr(self.sam, "perturbed_points", 1))
        extra = "one extra forward/backward" if points == 1 else f"{points} extra forward/backward passes"
        return f"{self.n_steps} optimizer steps with a perturbed pass ({extra} per micro-batch each){faults}"

    # ------------------------------------------------------------------------------- the step
    def finish(
        self,
        *,
        no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
        unscale: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> bool:
        """After the last clean backward of the window: the perturbed pass and the final gradient.

        ``no_sync``: suspends gradient sync for all replays but the last. ``unscale``: divides the
        replayed gradients by the loss scale in place, for frameworks that unscaled the clean
        gradient before this point (Lightning's ``16-mixed``); frameworks whose scaler unscales at
        ``optimizer.step()`` pass ``None``. Returns whether a perturbed pass ran. On an exception
        the weights are restored by copy before it propagates.
        """
        window, self._window = self._window, []
        self._prepared = False
        window_id = self._window_id
        end_states = [(m, module_attribute_state(m)) for m in {id(m): m for _,
                                                               (m, _) in window if m is not None}.values()]
        replays = [self._from_state(replay, module, state) for replay, (module, state) in window]
        try:
            # unscaled point by point: a multi-point variant reads each point's gradient before the next
            ran = perturbed_pass(self.sam, replays, no_sync=no_sync, window=window_id, unscale=unscale)
            self.sam.unperturb()
        except BaseException:
            self.sam.cancel()
            raise
        finally:
            _phase.set_pass(None)
            for module, state in end_states:
                restore_module_attributes(module, state)  # what the clean pass left
        self.n_steps += int(ran)
        return ran

    @staticmethod
    def _from_state(replay: Replay, module: nn.Module | None, state: Any) -> Replay:
        if module is None:
            return replay

        def run() -> Any:
            restore_module_attributes(module, state)
            return replay()

        return run


def in_perturbed_pass() -> bool:
    """Whether a replay at a perturbed point (``w + e``) is running now: what an adapter needs to
    tell a replayed ``training_step`` from its clean pass (no logging twice, reuse the clean pass's
    adversaries)."""
    now = _phase.current_pass()
    return now is not None and now.kind == "perturbed"


def perturbed_pass(
    sam: SAMStepProtocol,
    replays: Sequence[Callable[[], Any]],
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    *,
    window: int = 0,
    unscale: Callable[[list[torch.Tensor]], None] | None = None,
) -> bool:
    """The perturbed half of a step whose passes a framework adapter runs (adapter protocol).

    After the clean backward: ``sam.perturb()``; if it moved the weights, release the gradients
    (set to ``None``, as ``zero_grad()`` does: the variant copied what it needs from the clean
    gradient, and the perturbed backward allocates them as the activations are freed, so the pass
    peaks where a plain step does) and call every replay -- each runs one micro-batch's forward and
    backward at ``w + e`` -- all but the last under ``no_sync()``, so that only the last backward
    all-reduces the accumulated SAM gradient. Then ``sam.advance()``: while the variant has another
    point (GAM), the gradients are released again and every replay runs again at that point, under
    the same ``no_sync`` rule. ``unscale`` (frameworks that unscaled the clean gradient already)
    divides each point's replayed gradients by the loss scale before the variant reads them. If a
    replay raises, ``sam.cancel()`` restores the weights by copy before the exception propagates.
    Returns whether a perturbed pass ran; the caller finishes the step with ``sam.unperturb()`` (or
    ``sam.cancel()`` to drop it). Each replay runs as ``Pass("perturbed", window, k, point)``
    (:mod:`sharpguard.optim._phase`).
    """
    try:
        if not sam.perturb():
            return False
        advance = getattr(sam, "advance", None)  # a protocol object without it has one point
        last = len(replays) - 1
        point = 0
        while True:
            for group in sam.base_optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            for k, replay in enumerate(replays):
                with no_sync() if no_sync is not None and k < last else contextlib.nullcontext():
                    previous = _phase.set_pass(_phase.Pass("perturbed", window, k, point))
                    try:
                        replay()
                    finally:
                        _phase.set_pass(previous)
            if unscale is not None:
                unscale([p.grad for p in sam._pass_params if p.grad is not None])
            if advance is None or not advance():
                break
            point += 1
    except BaseException:
        sam.cancel()
        raise
    return True


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside framework wrappers, found by their public attributes:
    Accelerate's ``AcceleratedOptimizer.optimizer`` (itself an ``Optimizer`` subclass), Lightning's
    ``LightningOptimizer._optimizer``, a SAM wrapper's ``base_optimizer`` (any object of the step
    protocol). The one place that unwraps."""
    for _ in range(8):
        if isinstance(optimizer, SAMStepProtocol):
            optimizer = optimizer.base_optimizer
            continue
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            optimizer = inner
            continue
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        break
    raise ConfigurationError(
        f"cannot find the torch.optim.Optimizer inside {type(optimizer).__name__}; pass the optimizer itself."
    )
