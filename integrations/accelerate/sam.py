"""SAM in an Accelerate loop."""


from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sharpguard._batches import LossFn, default_loss_fn
from sharpguard.errors import ConfigurationError, require
from sharpguard.optim import functional as F_sam
from sharpguard.optim.sam import perturbed_pass

require("accelerate", "accelerate")
from accelerate.utils import DistributedType  # noqa: E402


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class SAMConfig:
    """Which SAM variant to run and how.

    ``variant``: one of ``"sam"``, ``"asam"``, ``"gsam"``, ``"looksam"``, ``"momentum_sam"``,
    ``"friendly_sam"`` (built by :func:`sharpguard.optim.make_sam` around the loop's optimizer).
    ``rho``: perturbation radius (``None``: the variant's default, 0.05 for SAM). ``sync_perturbation``: compute ``e`` from the all-reduced gradient
    (one more all-reduce per step) instead of each worker's own gradient (the default, as in the SAM
    paper). ``knobs``: the variant's own keywords (``adaptive``, ``alpha``, ``k``, ...).
    """

    variant: str = "sam"
    rho: float | None = None
    sync_perturbation: bool = False
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import inspect

        from sharpguard.optim import factory

        key = self.variant = factory.canonical_variant(self.variant)
        if self.rho is not None and (isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not self.rho >= 0):
            raise ConfigurationError(f"rho must be a non-negative number, got {self.rho!r}.")
        # Check the knobs now, not at the first training step (the variant is built lazily).
        allowed = set(inspect.signature(factory.VARIANTS[key]._configure).parameters) - {"rho"}
        unknown = sorted(set(self.knobs) - allowed - {"model"})
        if unknown:
            raise ConfigurationError(
                f"SAM variant {key!r} has no setting {', '.join(map(repr, unknown))}; its settings are "
                f"rho, {', '.join(sorted(allowed))}."
            )

    @classmethod
    def coerce(cls, value: SAMConfig | Mapping[str, Any] | bool | float) -> SAMConfig:
        """Accept a :class:`SAMConfig`, a mapping of keywords (``variant`` included), ``True``
        (defaults) or a number (``rho``)."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(rho=float(value))
        if isinstance(value, Mapping):
            kw = dict(value)
            known = {k: kw.pop(k) for k in ("variant", "rho", "sync_perturbation") if k in kw}
            return cls(**known, knobs={**kw.pop("knobs", {}), **kw})
        raise ConfigurationError(
            f"sam= must be a mapping of SAM keywords (e.g. {{'rho': 0.05, 'variant': 'asam'}}) or a SAMConfig, "
            f"got {type(value).__name__}."
        )


def check_distributed_type(accelerator: Any) -> None:
    """Raise a clear error for a distributed setup in which SAM cannot run between backward and step."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigurationError(
            "SAM cannot run under DeepSpeed: it steps the optimizer inside accelerator.backward(), leaving no "
            "point between the gradient and the update; use DDP or FSDP instead."
        )
    if accelerator.distributed_type in (DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ConfigurationError(
            f"SAM is not supported under {accelerator.distributed_type.value}; use DDP or FSDP instead."
        )


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside an ``AcceleratedOptimizer`` (which has no ``__getattr__``)."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


# --------------------------------------------------------------------------------------------------
# FSDP: the norm of g is a sum over shards
# --------------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise (FSDP1 flat shards)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def sharded_global_norm(tensors: Sequence[torch.Tensor], group: Any = None) -> torch.Tensor:
    """L2 norm of tensors sharded across the processes of ``group``: sqrt(all_reduce(sum ||g_i||^2)).

    Under FSDP every rank holds a disjoint shard of each gradient, so the local norm is not the
    norm of ``g``; this is what ``e = rho g / ||g||`` needs.
    """
    local = F_sam.global_norm([_local(t) for t in tensors]) if len(tensors) else torch.zeros(())
    sq = local.double() ** 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sq, op=torch.distributed.ReduceOp.SUM, group=group)
    return sq.sqrt().to(local.dtype)


class _ShardedSAM:
    """SAM / ASAM over sharded parameters, speaking the adapter protocol (prepare/perturb/unperturb).

    Each shard moves by ``rho * g_shard / ||g||`` (ASAM: ``rho * T^2 g_shard / ||T g||``) with the
    norm all-reduced across shards: ``e`` is elementwise once the norm is known.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float, adaptive: bool = False, eta: float = 0.0):
        self.base_optimizer = optimizer
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self._backup: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []

    def prepare(self) -> None:
        pass

    def needs_second_pass(self) -> bool:
        return True

    def perturb(self) -> bool:
        params = [p for g in self.base_optimizer.param_groups for p in g["params"] if p.grad is not None]
        local_p = [_local(p) for p in params]
        local_g = [_local(p.grad) for p in params]
        self._backup = F_sam.save_(self._backup, local_p)
        self._params = local_p
        direction, norm = F_sam.ascent_direction(
            self._backup, local_g, adaptive=self.adaptive, eta=self.eta, norm=sharded_global_norm
        )
        F_sam.add_scaled_(local_p, direction, F_sam.perturbation_scale(norm, self.rho))
        return True

    def unperturb(self) -> None:
        if self._backup is not None and self._params:
            F_sam.restore_(self._params, self._backup)
        self._params = []

    cancel = unperturb


def _build_sam(config: SAMConfig, optimizer: torch.optim.Optimizer, model: nn.Module, accelerator: Any) -> Any:
    if accelerator.distributed_type == DistributedType.FSDP:
        if config.variant not in ("sam", "asam"):
            raise ConfigurationError(
                f"under FSDP only variant='sam' or 'asam' is supported, got {config.variant!r}; "
                "the other variants keep unsharded state."
            )
        asam = config.variant == "asam"
        adaptive = asam or bool(config.knobs.get("adaptive", False))
        rho = config.rho if config.rho is not None else (0.5 if asam else 0.05)
        eta = float(config.knobs.get("eta", 0.01 if asam else 0.0))
        return _ShardedSAM(optimizer, rho, adaptive=adaptive, eta=eta)
    from sharpguard.optim import make_sam

    knobs = dict(config.knobs)
    if config.rho is not None:
        knobs["rho"] = config.rho
    return make_sam(optimizer, config.variant, model=model, **knobs)


# --------------------------------------------------------------------------------------------------
# the two-pass engine shared by this module and the Hugging Face Trainer mixin
# --------------------------------------------------------------------------------------------------
class _PerturbedReplay:
    """Runs the perturbed pass of one accumulation window through the adapter protocol.

    ``clean_context(model)`` wraps the *sync* micro-batch's clean backward (``no_sync`` for the
    per-worker perturbation); ``finish(model, replays)`` perturbs, replays every micro-batch at
    ``w + e`` (``no_sync`` on all but the last) and restores. ``replays`` are zero-argument
    callables that each run one micro-batch's forward and ``accelerator.backward``.
    """

    def __init__(self, accelerator: Any, sam: Any, config: SAMConfig):
        self.accelerator = accelerator
        self.sam = sam
        self.config = config
        # FSDP reduce-scatters: the norm needs the synced shards, so the first pass syncs there.
        # Variants whose update mixes in the clean gradient (GSAM, LookSAM, Friendly-SAM) need it synced.
        self.per_worker = (
            not config.sync_perturbation
            and accelerator.distributed_type != DistributedType.FSDP
            and getattr(sam, "per_worker_safe", False)
        )
        self._prepared = False

    def begin_window(self) -> None:
        """Before the first forward of an accumulation window (Momentum-SAM perturbs here)."""
        if not self._prepared:
            self.sam.prepare()
            self._prepared = True

    def clean_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """``no_sync`` for the clean backward of the sync micro-batch when ``e`` is per worker.

        Only when this step runs a perturbed pass (``needs_second_pass()``, known before the
        forward): on LookSAM's reuse steps or Momentum-SAM's single pass the clean gradient *is*
        the update and must be all-reduced as usual.
        """
        if (
            self.accelerator.sync_gradients
            and self.per_worker
            and self.accelerator.num_processes > 1
            and self.sam.needs_second_pass()
        ):
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def finish(self, model: nn.Module, replays: Sequence[Callable[[], Any]]) -> None:
        """After the clean backward of the sync micro-batch: the perturbed pass, then restore.

        On an exception in the perturbed pass the weights are restored (``cancel()``) before it
        propagates; the gradients are then those of an unfinished pass and must not be stepped with.
        """
        self._prepared = False
        base = self.sam.base_optimizer
        scaler = getattr(self.accelerator, "scaler", None)
        found_inf = self._overflow(base) if scaler is not None else None
        perturbed_pass(self.sam, replays, no_sync=lambda: self.accelerator.no_sync(model))
        self.sam.unperturb()
        if found_inf is not None:
            self._poison(base, found_inf)

    @staticmethod
    def _overflow(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """1.0 if the clean (scaled) gradient holds an inf/NaN, as a device tensor (no host sync)."""
        grads = _grads(optimizer)
        if not grads:
            return None
        return (~torch.isfinite(F_sam.global_norm(grads))).float()

    @staticmethod
    def _poison(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
        """Put a NaN into the final gradient when the clean one overflowed, so ``scaler.step`` skips
        the step and lowers the scale (otherwise e = 0 and an SGD step at w would slip through)."""
        grads = _grads(optimizer)
        if not grads:
            return
        first = grads[0].view(-1)[:1]
        nan = torch.full_like(first, float("nan"))
        with torch.no_grad():
            first.copy_(torch.where(found_inf.to(first.device) > 0, nan, first))


# --------------------------------------------------------------------------------------------------
# public: SAM in a hand-written Accelerate loop
# --------------------------------------------------------------------------------------------------
class SharpnessAwareMinimization:
    """SAM (or any variant) for a loop prepared by Accelerate: replaces ``accelerator.backward``.

    Args:
        accelerator: the loop's ``Accelerator``.
        model: the prepared model (DDP-wrapped under multi-process).
        optimizer: the prepared optimizer; you keep calling ``optimizer.step()`` yourself.
        variant, rho, sync_perturbation, **knobs: see :class:`SAMConfig`; or pass ``config=``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default: ``model(**batch).loss`` for a mapping,
            cross entropy for ``(inputs, targets)``.

    Raises :class:`~sharpguard.errors.ConfigurationError` under DeepSpeed (before anything runs).
    Cost per optimizer step: twice the forward/backward passes of the window (LookSAM less).
    """

    def __init__(
        self,
        accelerator: Any,
        model: nn.Module,
        optimizer: Any,
        *,
        variant: str = "sam",
        rho: float | None = None,
        sync_perturbation: bool = False,
        loss_fn: LossFn | None = None,
        config: SAMConfig | Mapping[str, Any] | None = None,
        **knobs: Any,
    ):
        check_distributed_type(accelerator)
        self.config = (
            SAMConfig.coerce(config)
            if config is not None
            else SAMConfig(variant=variant, rho=rho, sync_perturbation=sync_perturbation, knobs=knobs)
        )
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn or default_loss_fn
        unwrapped = accelerator.unwrap_model(model)
        self.sam = _build_sam(self.config, _unwrap_optimizer(optimizer), unwrapped, accelerator)
        self._engine = _PerturbedReplay(accelerator, self.sam, self.config)
        self._window: list[Any] = []

    def backward(self, batch: Any) -> torch.Tensor:
        """Forward and backward of one micro-batch at ``w``; on the sync micro-batch, the SAM pass.

        Returns the loss at the unperturbed weights (detached), the number to log.
        """
        self._engine.begin_window()
        self._window.append(batch)
        with self._engine.clean_context(self.model):
            loss = self.loss_fn(self.model, batch)
            self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            window, self._window = self._window, []
            self._engine.finish(self.model, [self._replay_fn(b) for b in window])
        return loss.detach()

    def _replay_fn(self, batch: Any) -> Callable[[], None]:
        def replay() -> None:
            self.accelerator.backward(self.loss_fn(self.model, batch))

        return replay

    def state_dict(self) -> dict[str, Any]:
        """The variant's own state (step counter, LookSAM's ``g_v``, Friendly-SAM's EMA): what the
        prepared optimizer's state dict lacks. Plain containers and tensors (``weights_only`` loads);
        ``accelerator.register_for_checkpointing(sam)`` puts it into ``save_state``/``load_state``."""
        own = getattr(self.sam, "sharpguard_state_dict", None)
        return {"sam": own() if own is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; load the optimizer's own state dict as usual beside it."""
        if state.get("sam"):
            self.sam.load_sharpguard_state_dict(state["sam"])

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches buffered for the perturbed pass of the current window."""
        return len(self._window)


