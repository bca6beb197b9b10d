"""SAM over sharded parameters (FSDP): the norm of ``g`` is a sum over shards.

Under FSDP every rank holds a disjoint shard of each parameter and of its gradient, so the local
norm is not ``||g||``; :func:`sharded_global_norm` all-reduces the squared local norms.
Framework-free: only ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._state import local_shard as _local
from .._validation import one_of
from . import functional as F

__all__ = ["ShardedSAM", "sharded_global_norm"]


def sharded_global_norm(tensors: Sequence[torch.Tensor], group: Any = None) -> torch.Tensor:
    """L2 norm of tensors sharded across the processes of ``group``: sqrt(all_reduce(sum ||g_i||^2)).

    Under FSDP every rank holds a disjoint shard of each gradient, so the local norm is not the
    norm of ``g``; this is what ``e = rho g / ||g||`` needs.
    """
    local = F.global_norm([_local(t) for t in tensors]) if len(tensors) else torch.zeros(())
    sq = local.double() ** 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
    return sq.sqrt().to(local.dtype)


class ShardedSAM:
    """SAM / ASAM over sharded parameters (FSDP), speaking the engine's protocol.

    Each shard moves by ``rho * g_shard / ||g||`` (ASAM: ``rho * T^2 g_shard / ||T g||``, Kwon et
    al. 2021, eq. 9) with the norm all-reduced across shards (:func:`sharded_global_norm`): ``e``
    is elementwise once the norm is known, so the perturbation equals unsharded SAM's. The knobs and
    their defaults are SAM's / ASAM's own (``SAM.knob_defaults()``); the other variants keep
    unsharded state and are refused by :func:`~sharpguard.optim.factory.build_sam`. The non-finite
    policy is SAM's (``nonfinite``, :class:`~sharpguard.optim.SAM`): ``"skip"`` (default) keeps only
    the weight backup of this rank's shards (1.0x the shard bytes) and makes a faulty step update
    nothing, decided at the base optimizer's step; ``"fallback"`` also keeps the clean gradient's
    shards (2.0x) and steps with them. One perturbed point per step: the multi-point variants (GAM)
    and bSAM are refused for sharded training by :meth:`~sharpguard.optim.SAMConfig.build`, with the
    other unsharded variants.
    """

    per_worker_safe = False  # the norm needs the reduced shards: the clean pass is synchronised
    sync_perturbation = True
    perturbed_points = 1

    def __init__(
        self, optimizer: torch.optim.Optimizer, rho: float, adaptive: bool = False, eta: float = 0.0,
        nonfinite: str = "skip",
    ):
        one_of("nonfinite", nonfinite, ("skip", "fallback"))
        self.base_optimizer = optimizer
        self.rho, self.adaptive, self.eta, self.nonfinite = rho, adaptive, eta, nonfinite
        self._backup: list[torch.Tensor] | None = None
        self._clean: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self._pass_params: list[torch.Tensor] = []
        self._skip_check: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._base_stepping = False
        self._skip_hooks = (
            optimizer.register_step_pre_hook(self._skip_faulty_step),
            optimizer.register_step_post_hook(self._base_step_done),
        )

    def prepare(self) -> None:
        pass

    def needs_second_pass(self) -> bool:
        return True

    def perturb(self) -> bool:
        self._skip_check = None  # the previous step's base step never ran (a GradScaler skip): dropped
        params = [p for g in self.base_optimizer.param_groups for p in g["params"] if p.grad is not None]
        local_p = [_local(p) for p in params]
        local_g = [_local(p.grad) for p in params]
        self._backup = F.save_(self._backup, local_p)
        if self.nonfinite == "fallback":
            self._clean = F.save_(self._clean, local_g)
        self._params, self._pass_params = local_p, params
        direction, norm = F.ascent_direction(
            self._backup, local_g, adaptive=self.adaptive, eta=self.eta, norm=sharded_global_norm
        )
        self._clean_ok = torch.isfinite(norm)
        F.add_scaled_(local_p, direction, F.perturbation_scale(norm, self.rho))
        return True

    def advance(self) -> bool:
        """One perturbed point per step: there is never a next one (the engine's multi-point protocol)."""
        return False

    def unperturb(self) -> None:
        if self._backup is not None and self._params:
            F.restore_(self._params, self._backup)
            grads = [_local(p.grad) for p in self._pass_params]
            ok = torch.isfinite(sharded_global_norm(grads)) & self._clean_ok
            if self.nonfinite == "fallback":
                F.select_(grads, self._clean, ~ok)
            else:
                self._skip_check = (self._pass_params, ok)
                if self._base_stepping:  # the base step's closure ran this SAM step: decided now
                    self._skip_faulty_step(self.base_optimizer, (), {})
        self._params, self._pass_params = [], []

    def _skip_faulty_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Base optimizer step pre-hook of ``nonfinite="skip"`` (as :meth:`SAM._skip_faulty_step`)."""
        self._base_stepping = True
        check, self._skip_check = self._skip_check, None
        if check is None:
            return
        params, ok = check
        if F.host_readable(ok):
            if not bool(ok):
                for p in params:
                    p.grad = None
            return
        F.zero_where_([_local(p.grad) for p in params if p.grad is not None], ~ok)

    def _base_step_done(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._base_stepping = False

    def cancel(self) -> None:
        if self._backup is not None and self._params:
            F.restore_(self._params, self._backup)
        self._params, self._pass_params = [], []
