"""The non-finite policy of a SAM step: what a step does when a gradient (or loss) is not finite.

A SAM step takes two gradients, so it can meet a non-finite value where a plain step would not (the
perturbed point ``w + e`` of Foret et al., ICLR 2021, eq. 2, lies away from ``w``). The policy keeps
the promise that the base optimizer never gets more non-finite values than it would without SAM
(docs/reliability.md):

* ``"skip"`` (default): a step whose clean or perturbed gradient is not finite updates nothing. It is
  decided in a step pre-hook of the base optimizer, so a ``GradScaler`` sees the non-finite gradient
  first and skips and backs off as it would without SAM.
* ``"fallback"``: a non-finite clean gradient gives no perturbation (the base optimizer gets that
  gradient, as without SAM); a non-finite perturbed gradient is replaced by the kept clean one.

Both are decided on the device (no host sync on an accelerator), counted in device counters copied
to the host without blocking, and warned once per kind (:class:`SAMFallbackWarning`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.optim import Optimizer

from . import functional as F

__all__ = ["NONFINITE_POLICIES", "NonfinitePolicyMixin", "SAMFallbackWarning"]

#: what a step does when the clean or the perturbed gradient (or loss) is not finite; see
#: :meth:`SAM.unperturb` and docs/reliability.md
NONFINITE_POLICIES = ("skip", "fallback")


class SAMFallbackWarning(UserWarning):
    """A SAM step met a non-finite gradient and skipped the update or fell back (said once per kind and
    optimizer)."""


class NonfinitePolicyMixin:
    """The fault policy of :class:`~sharpguard.optim.SAM` (see the module docs).

    The host class provides ``nonfinite`` (one of :data:`NONFINITE_POLICIES`), ``base_optimizer``,
    the step's ``_clean_ok`` / ``_points_ok`` flags and ``_pass_groups``, and ``_buffers(name, like)``
    (where the clean-gradient copy is kept); it calls :meth:`_attach_fault_policy` once the base
    optimizer is known and :meth:`_apply_nonfinite_policy` after a perturbed pass.
    """

    nonfinite: str
    base_optimizer: Optimizer

    def _attach_fault_policy(self, base: Optimizer) -> None:
        """The counters and the base optimizer's step hooks of the policy (once, when attaching)."""
        # device-side fault counters [non-finite clean gradient, non-finite perturbed gradient],
        # copied to the host without blocking and read one step later (no host sync in the step)
        self._faults: torch.Tensor | None = None
        self._faults_host = torch.zeros(2, dtype=torch.int64)
        self._faults_warned = [0, 0]
        # nonfinite="skip": (params, ok) of the last step, read by the base optimizer's step pre-hook
        self._skip_check: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._base_stepping = False  # inside base_optimizer.step() (a closure that runs the SAM step)
        self._skip_hooks = (
            base.register_step_pre_hook(self._skip_faulty_step),
            base.register_step_post_hook(self._base_step_done),
        )

    def _apply_nonfinite_policy(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Never more non-finite values than the base optimizer would get (docs/reliability.md).

        ``ok`` = clean and final gradients both finite. When it is not: under ``"skip"`` every
        gradient is set to ``None`` (the base optimizer skips the update) where the flag is free to
        read (CPU), and zeroed on the device otherwise (:func:`.functional.zero_where_`, no host sync,
        no temporary); under ``"fallback"`` the final gradient becomes the kept clean one. The check
        is one fused pass over the gradients (:func:`.functional.all_finite`).
        """
        groups = self.__dict__.get("_pass_groups")
        clean_ok = self._clean_ok
        final_ok = F.all_finite(grads, groups=groups) & clean_ok
        if self._points_ok is not None:  # a multi-point variant: the gradients at its earlier points
            final_ok = final_ok & self._points_ok
        if self.nonfinite == "fallback":
            if F.host_readable(final_ok):
                if not bool(final_ok):
                    torch._foreach_copy_(grads, self._buffers("clean_grad", params))
            else:
                F.select_(grads, self._buffers("clean_grad", params), ~final_ok, groups=groups)
        else:
            # decided when the base optimizer steps (_skip_faulty_step): a GradScaler that finds the
            # non-finite gradient first skips the step and lowers its scale, as without SAM. When the
            # base step is already running (its closure ran this SAM step: Lightning), decided now.
            self._skip_check = (params, final_ok)
            if self._base_stepping:
                self._skip_faulty_step(self.base_optimizer, (), {})
        self._count_faults(clean_ok, final_ok)

    def _skip_faulty_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Base optimizer step pre-hook of ``nonfinite="skip"``: a faulty step updates nothing.

        Where the flag is free to read (CPU) every gradient of the step is set to ``None``, so the
        base optimizer leaves weights and state alone; otherwise they are zeroed on the device
        (:func:`.functional.zero_where_`, no host sync, no temporary).
        """
        self._base_stepping = True
        check, self._skip_check = self._skip_check, None
        if check is None:
            return
        F.skip_step_(*check)

    def _base_step_done(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._base_stepping = False

    def _count_faults(self, clean_ok: torch.Tensor, final_ok: torch.Tensor | None) -> None:
        """Add this step's faults to the device counters (``final_ok=None``: a step with one pass)."""
        if isinstance(clean_ok, FakeTensor):  # a simulated step: there are no values to count
            return
        if F.host_readable(clean_ok):  # host flags: nothing to wait for, no tensor arithmetic needed
            clean_bad = not bool(clean_ok)
            perturbed_bad = final_ok is not None and not clean_bad and not bool(final_ok)
            if clean_bad or perturbed_bad:
                self._faults_host += torch.tensor([int(clean_bad), int(perturbed_bad)])
                self._faults = self._faults_host.clone()
                self._warn_about_faults()
            return
        perturbed_bad = torch.zeros_like(clean_ok) if final_ok is None else clean_ok & ~final_ok
        faults = torch.stack([~clean_ok, perturbed_bad]).to(torch.int64)
        self._faults = faults if self._faults is None else self._faults + faults
        if self._faults.is_cuda and not self._faults_host.is_pinned():
            self._faults_host = self._faults_host.pin_memory()  # a non-blocking copy needs pinned memory
        self._faults_host.copy_(self._faults, non_blocking=True)
        self._warn_about_faults()  # on CPU the copy is done; on a GPU it is read when it has landed

    @property
    def nonfinite_counts(self) -> dict[str, int]:
        """Steps whose clean gradient was not finite, and steps whose perturbed one was not (skipped, or
        fell back under ``nonfinite="fallback"``); a host sync."""
        counts = [0, 0] if self._faults is None else self._faults.tolist()
        return {"nonfinite_clean": int(counts[0]), "nonfinite_perturbed": int(counts[1])}

    def _warn_about_faults(self) -> None:
        """Warn once per kind, from the counters copied to the host by an earlier step (no sync)."""
        if self._faults is None or isinstance(self._faults_host, FakeTensor):
            return
        seen = self._faults_host.tolist()
        what = ("a non-finite clean gradient (or loss)", "a non-finite gradient at w + e")
        done = ("it did not perturb and gave that gradient to the base optimizer, as without SAM",
                "it stepped with the clean gradient instead")
        for kind in (0, 1):
            if seen[kind] > 0 and not self._faults_warned[kind]:
                self._faults_warned[kind] = 1
                action = "it skipped the update" if self.nonfinite == "skip" else done[kind]
                warnings.warn(
                    f"{type(self).__name__}: a step met {what[kind]}; {action} (counted in opt.nonfinite_counts; "
                    "said once). Lower the learning rate or rho if it repeats.",
                    SAMFallbackWarning,
                    stacklevel=3,
                )

    def _warn_once(self, key: str, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if key not in warned:
            warned.add(key)
            warnings.warn(f"{type(self).__name__}: {message}.", SAMFallbackWarning, stacklevel=4)

