"""Checkpoints of a SAM optimizer: the base optimizer's state dict plus one entry of sharpguard's own.

A variant's persistent state (its step counter, its knobs, buffers such as LookSAM's ``g_v`` or
Momentum-SAM's velocity) lives beside the base optimizer's, under :data:`STATE_KEY`, so that the
base optimizer can load the same dict and a framework that saves the base optimizer itself can
store the entry beside its checkpoint. Loading is all-or-nothing: the entry is checked in full
(variant, step, knobs, every buffer's type, shape and finiteness) before anything changes, and a
base optimizer that refuses its part gets its previous state back.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_keywords
from .._validation import one_of as _one_of
from ..errors import ConfigurationError

__all__ = ["CheckpointMixin", "RESUME_POLICIES", "STATE_KEY"]

#: Key of sharpguard's own entry in a state dict; the rest is exactly the base optimizer's.
STATE_KEY = "sharpguard"

#: how :meth:`SAM.load_sharpguard_state_dict` treats knobs that differ from the checkpoint's
RESUME_POLICIES = ("error", "checkpoint", "current")


class CheckpointMixin:
    """``state_dict`` / ``load_state_dict`` of :class:`~sharpguard.optim.SAM` (see the module docs).

    The host class provides ``base_optimizer``, ``variant``, ``state_buffers``, ``sam_state``,
    ``_step``, ``_all_params()``, ``_knobs()``, ``knob_defaults()``, the constructor's validation of
    the knobs, ``_apply_knobs(**knobs)`` and ``_reset_step()``.
    """

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus ``"sharpguard"``: variant, step, knobs, buffers.

        Buffers are indexed like the base optimizer's state (parameters numbered across groups);
        the transient ``w`` backup is never saved.
        """
        state = self.base_optimizer.state_dict()
        state[STATE_KEY] = self.sharpguard_state_dict()
        return state

    def load_state_dict(  # type: ignore[override]
        self, state_dict: dict[str, Any], *, resume: str = "error"
    ) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain base-optimizer one: counters reset).

        Everything is checked before anything changes (variant, step, knobs, every buffer's type,
        shape and finiteness); if the base optimizer then refuses its part, its previous state is put
        back. ``resume`` says what to do when the checkpoint's knobs differ from this optimizer's:
        ``"error"`` (default) raises naming them, ``"checkpoint"`` takes the checkpoint's,
        ``"current"`` keeps this optimizer's.
        """
        if not isinstance(state_dict, dict):
            raise ConfigurationError("load_state_dict needs the dict from state_dict(), got "
                                     f"{type(state_dict).__name__}.")
        state_dict = dict(state_dict)
        present = STATE_KEY in state_dict  # absent: a plain base-optimizer state dict (counters reset)
        ours = state_dict.pop(STATE_KEY, None)
        checked = self._checked_own_state(ours, resume) if present else None
        previous = self.base_optimizer.state_dict()
        try:
            self.base_optimizer.load_state_dict(state_dict)
        except Exception:
            self.base_optimizer.load_state_dict(previous)
            raise
        self._load_own(checked)

    def sharpguard_state_dict(self) -> dict[str, Any]:
        """Only the wrapper's own state (the ``"sharpguard"`` entry of :meth:`state_dict`).

        For frameworks that save the base optimizer themselves (Lightning, the Hugging Face
        Trainer): store this beside their checkpoint; plain containers and tensors, so it loads
        with ``torch.load(weights_only=True)``.
        """
        index = {p: i for i, p in enumerate(self._all_params())}
        buffers: dict[str, dict[int, torch.Tensor]] = {}
        for name in self.state_buffers:
            buffers[name] = {
                index[p]: s[name].detach().clone() for p, s in self.sam_state.items() if name in s and p in index
            }
        return {"variant": self.variant, "step": self._step, "knobs": self._knobs(), "buffers": buffers}

    def load_sharpguard_state_dict(self, state: dict[str, Any], *, resume: str = "error") -> None:
        """Load :meth:`sharpguard_state_dict` output, leaving the base optimizer as it is (see
        :meth:`load_state_dict` for the checks and ``resume``)."""
        self._load_own(self._checked_own_state(state, resume))

    def _load_own(self, ours: dict[str, Any] | None) -> None:
        params = self._all_params()
        self.sam_state.clear()
        self._reset_step()
        if ours is None:
            self._step = 0
            return
        self._apply_knobs(**ours["knobs"])
        self._step = ours["step"]
        for name, entries in ours["buffers"].items():
            for i, tensor in entries.items():
                p = params[i]
                self.sam_state[p][name] = tensor.detach().to(device=p.device, dtype=p.dtype, copy=True)

    def _checked_own_state(self, ours: Any, resume: str) -> dict[str, Any]:
        """A validated, normalised copy of a ``"sharpguard"`` entry, or one ConfigurationError."""
        name = type(self).__name__
        _one_of("resume", resume, RESUME_POLICIES)
        bad = f"the {STATE_KEY!r} entry of this state dict is malformed"
        if not isinstance(ours, dict) or not {"variant", "step", "knobs", "buffers"} <= set(ours):
            raise ConfigurationError(f"{bad}; save it with {name}.state_dict().")
        if ours["variant"] != self.variant:
            raise ConfigurationError(
                f"this state dict was saved by variant {ours['variant']!r}, not {self.variant!r}; build the same "
                "variant, or load only the base state with opt.base_optimizer.load_state_dict()."
            )
        step = ours["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigurationError(f"{bad}: its step must be an integer >= 0, got {step!r}.")
        knobs = ours["knobs"]
        if not isinstance(knobs, dict):
            raise ConfigurationError(f"{bad}: its knobs must be a dict, got {type(knobs).__name__}.")
        check_keywords(f"{name} (in this checkpoint)", knobs, self.knob_defaults())
        saved = type(self).validate_knobs(**knobs)  # by the constructor's rules, without touching self
        current = self._knobs()
        differ = sorted(k for k in current if saved[k] != current[k])
        if differ and resume == "error":
            pairs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {current[k]!r}" for k in differ)
            raise ConfigurationError(
                f"this checkpoint was saved with other {name} settings ({pairs}); build the optimizer with the "
                "checkpoint's settings, or pass resume='checkpoint' (take them) or resume='current' (keep yours)."
            )
        params = self._all_params()
        buffers = ours["buffers"]
        if not isinstance(buffers, dict):
            raise ConfigurationError(f"{bad}: its buffers must be a dict, got {type(buffers).__name__}.")
        clean: dict[str, dict[int, torch.Tensor]] = {}
        for buf, entries in buffers.items():
            if buf not in self.state_buffers or not isinstance(entries, dict):
                raise ConfigurationError(
                    f"{bad}: buffer {buf!r} is not one {name} keeps ({', '.join(self.state_buffers) or 'none'})."
                )
            clean[buf] = {}
            for i, tensor in entries.items():
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                    raise ConfigurationError(
                        f"this state dict holds buffers for parameter {i!r}, but {name} has {len(params)} parameters; "
                        "build the optimizer over the same parameters before loading."
                    )
                p = params[i]
                if not isinstance(tensor, torch.Tensor) or tensor.shape != p.shape or not tensor.is_floating_point():
                    got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ConfigurationError(
                        f"{bad}: buffer {buf!r} of parameter {i} must be a floating tensor of shape {tuple(p.shape)}, "
                        f"got {got}."
                    )
                if not bool(torch.isfinite(tensor).all()):
                    raise ConfigurationError(f"{bad}: buffer {buf!r} of parameter {i} holds NaN or inf values.")
                clean[buf][i] = tensor
        return {"step": step, "knobs": saved if resume != "current" else current, "buffers": clean}

