"""ESAM's sharpness-sensitive data selection (SDS) as a loss reducer, for any SAM variant and front end.

Du et al., ICLR 2022, "Efficient Sharpness-aware Minimization for Improved Training of Neural
Networks" (arXiv:2110.03141), Sec. 3.2 and Algorithm 1: the perturbed pass at ``w + e`` uses only
the examples whose loss rose most between ``w`` and ``w + e``,

.. math:: B^+ = \\text{the } \\lfloor\\gamma |B|\\rfloor \\text{ examples of } B \\text{ with the largest }
          h_i = \\ell_i(w + e) - \\ell_i(w), \\qquad
          g = \\nabla_w \\frac{1}{|B^+|} \\sum_{i \\in B^+} \\ell_i(w)\\Big|_{w + e}.

The loss code runs in the framework's ``training_step`` (or the user's closure), far from the
optimizer, so the selection is a *loss reducer* that the user's code calls on the per-example
losses; the step engine says which pass is running (:mod:`sharpguard.optim._phase`)::

    sds = SharpnessDataSelection(gamma=0.5)
    loss = sds(F.cross_entropy(logits, y, reduction="none"))    # instead of .mean()

Usage in each front end, and what it saves: ``docs/cheap_sam.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from .._validation import positive
from ..errors import ConfigurationError
from ..optim import _phase
from .. import _validation as rules

__all__ = ["DEFAULT_GAMMA", "SharpnessDataSelection"]

#: ESAM's gamma (the fraction of the batch kept in the perturbed pass): the official ``run.sh``
#: (dydjw9/Efficient_SAM) uses 0.5 in every experiment; the one place this default lives.
DEFAULT_GAMMA = 0.5

#: SAM steps seen with a clean pass and never a perturbed one before the reducer says it selects
#: nothing (LookSAM / ``interval`` skip some steps, but every variant runs a perturbed pass on its first).
_PATIENCE = 8


class SharpnessDataSelection:
    r"""ESAM's SDS (Du et al., ICLR 2022, Sec. 3.2, Algorithm 1) as a reducer of per-example losses.

    Call it on the per-example losses (shape ``[batch]``, ``reduction="none"``) where the loss is
    reduced, in the code that both passes of a SAM step run:

    * clean pass at ``w`` (micro-batch ``k`` of a step): keeps the detached losses and returns their mean;
    * perturbed pass at ``w + e`` (the replay of micro-batch ``k``): returns the mean over the
      :math:`\lfloor\gamma B\rfloor` examples (at least one) with the largest
      :math:`\ell_i(w + e) - \ell_i(w)`, so the backward flows from them only; ties go to the
      earlier example. ``gamma=1`` returns the plain mean (plain SAM, bitwise);
    * outside a SAM step (a plain optimizer; the two-step ``first_step/second_step`` form, which does
      not say which pass runs), without gradients (evaluation, even inside an open step) and on
      steps without a perturbed pass (LookSAM's reuse steps, ``interval``): the plain mean. When it is called while
      training and never sees a perturbed pass it says so once.

    The official code (``utils/Esam.py``) keeps the examples *strictly above* the
    :math:`\lfloor\gamma B\rfloor`-th largest :math:`h_i` (one fewer than asked without ties, fewer with
    ties) and every example when :math:`\gamma \ge 0.99`; this keeps exactly
    :math:`\lfloor\gamma B\rfloor`, the paper's :math:`|B^+| = \gamma |B|`. Selection is per call: with
    gradient accumulation each micro-batch keeps its own top fraction. Several calls in one pass
    (a closure that loops over micro-batches) are paired with the clean pass's calls in order. A
    variant with several perturbed points (GAM) selects at each point by that point's rise from ``w``.
    Nothing outlives a step, so there is nothing to checkpoint.

    Cost, plainly: the selection masks the loss of an ordinary replay, so the perturbed pass still
    runs its forward and backward on the whole batch: **nothing is saved** in compute or memory.
    The paper's saving (about :math:`(1-\gamma)` of the second pass) needs a forward/backward on the
    subset only, which a framework-agnostic replay of ``training_step`` cannot do. What SDS changes
    here is the gradient (the paper's accuracy effect), not the time. Extra memory: one float per
    example of the current step; no host synchronisation.

    Args:
        gamma: the fraction :math:`\gamma \in (0, 1]` of each batch kept in the perturbed pass
            (default :data:`DEFAULT_GAMMA`, the official 0.5).
    """

    @rules.checked(gamma=rules.probability)
    def __init__(self, gamma: float = DEFAULT_GAMMA) -> None:
        gamma = positive("gamma", gamma)
        if gamma > 1.0:
            raise ConfigurationError("gamma must lie in (0, 1] (the fraction of the batch kept at w + e), "
                                     f"got {gamma!r}.")
        self.gamma = gamma
        self._window = 0  # the engine's window whose clean losses _records holds (0: none)
        self._records: dict[tuple[int, int], torch.Tensor] = {}
        self._window_replayed = False
        self._last_pass: _phase.Pass | None = None
        self._call = 0  # calls so far in _last_pass
        self._without_replay = 0  # windows that ended with clean losses and no perturbed pass
        self._warned: set[str] = set()
        #: calls per kind: ``clean`` (recorded), ``selected`` (perturbed, reduced over B+), ``plain``
        #: (outside a SAM step: the plain mean)
        self.counts = {"clean": 0, "selected": 0, "plain": 0}
        #: indices (into the batch) kept by the last perturbed call, for inspection
        self.last_selected: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"SharpnessDataSelection(gamma={self.gamma})"

    def kept(self, batch_size: int) -> int:
        """How many of ``batch_size`` examples the perturbed pass keeps: :math:`\\max(1, \\lfloor\\gamma B\\rfloor)`."""
        return max(1, math.floor(self.gamma * batch_size + 1e-9))  # 1e-9: 0.5 * 10 is 5, not 4.999...

    # ------------------------------------------------------------------------------------ the call
    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        """The reduced loss of per-example ``losses`` (shape ``[batch]``) for the pass now running."""
        self._check(losses)
        now = _phase.current_pass()
        if now is None or not torch.is_grad_enabled():
            # outside a SAM step, or an evaluation that runs while one is open (Lightning may validate
            # between the micro-batches of a window): the plain mean, and this step's records stay
            return self._plain(losses, outside=now is None)
        if now.window != self._window:
            self._end_window()
            self._window, self._records, self._window_replayed = now.window, {}, False
        if now != self._last_pass:
            self._last_pass, self._call = now, 0
        else:
            self._call += 1
        key = (now.micro_batch, self._call)
        if now.kind == "clean":
            self._records[key] = losses.detach()
            self.counts["clean"] += 1
            return losses.mean()
        clean = self._records.get(key)
        if clean is None:
            raise ConfigurationError(
                f"SharpnessDataSelection was called in the perturbed pass of micro-batch {now.micro_batch} (call "
                f"{self._call + 1}) with no matching call in its clean pass; call it at the same places in both passes "
                "(the replay runs the same training code) and create it before training starts."
            )
        if clean.shape != losses.shape:
            raise ConfigurationError(
                f"SharpnessDataSelection got {losses.shape[0]} per-example losses at w + e but {clean.shape[0]} at w "
                "for the same micro-batch; the replay must see the same batch (no random cropping of the batch size)."
            )
        self._window_replayed = True
        self.counts["selected"] += 1
        return self._select(losses, clean)

    def _select(self, losses: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        n = losses.shape[0]
        k = self.kept(n)
        if k >= n:
            self.last_selected = torch.arange(n, device=losses.device)
            return losses.mean()  # gamma = 1: plain SAM, bitwise
        rise = losses.detach() - clean  # h_i = l_i(w + e) - l_i(w)
        # a stable descending sort: ties go to the earlier example (torch.topk does not promise an order)
        order = torch.sort(rise, descending=True, stable=True).indices[:k]
        self.last_selected = order
        return losses.index_select(0, order).mean()

    # ------------------------------------------------------------------------------- bookkeeping
    def _plain(self, losses: torch.Tensor, *, outside: bool) -> torch.Tensor:
        self.counts["plain"] += 1
        if outside and torch.is_grad_enabled() and losses.requires_grad and self.counts["selected"] == 0:
            self._warn_once(
                "outside",
                "it was called while training outside any SAM step, so it returned the plain mean and selected "
                "nothing; call it inside SAM.step(closure), the Lightning callback, the HF SharpGuardTrainer or the "
                "Accelerate helper (the two-step first_step()/second_step() form does not say which pass runs)",
            )
        return losses.mean()

    def _end_window(self) -> None:
        """The window ``_records`` belongs to is over: count it if no perturbed pass came."""
        if self._window and self._records and not self._window_replayed:
            self._without_replay += 1
            if self.counts["selected"] == 0 and self._without_replay >= _PATIENCE:
                self._warn_once(
                    "no_replay",
                    f"{self._without_replay} SAM steps ran a clean pass and no perturbed pass, so it has selected "
                    "nothing yet (LookSAM's reuse steps and interval > 1 skip some perturbed passes, but not all: "
                    "check that the optimizer is a SAM variant driven by one of the four front ends)",
                )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"SharpnessDataSelection: {message}.", UserWarning, stacklevel=4)

    @staticmethod
    def _check(losses: Any) -> None:
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] == 0:
            got = f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigurationError(
                f"SharpnessDataSelection needs the per-example losses, a 1-D tensor of shape [batch] (e.g. "
                f"F.cross_entropy(logits, y, reduction='none')), got {got}."
            )
        if not losses.is_floating_point():
            raise ConfigurationError(f"SharpnessDataSelection needs floating-point losses, got {losses.dtype}.")
