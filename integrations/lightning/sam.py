"""The SAM callback: Lightning runs the clean pass, the step engine runs the rest."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from sharpguard.errors import ConfigurationError


from sharpguard.optim.sam import perturbed_pass

from ._hooks import _GradientReplay, _all_finite, _grads, _is_parallel, _loss_of, _sam_replay, _step_args

# --------------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------------
class SharpnessAwareMinimization(_GradientReplay):
    """Sharpness-aware minimization (Foret et al., ICLR 2021) for any LightningModule, as one callback.

    Args:
        rho: radius of the weight perturbation (SAM's ``rho``; 0.05 in the paper, ~2.0 for ASAM).
        variant: ``"sam"``, ``"asam"``, ``"gsam"``, ``"looksam"``, ``"momentum_sam"``, ``"friendly_sam"``
            (see :func:`sharpguard.optim.make_sam`); paper knobs go in ``**variant_kwargs``.
        adaptive: shorthand for ASAM's scale-invariant perturbation with ``variant="sam"``.
        per_worker: under DDP, compute the perturbation from each worker's local gradient (the SAM paper's
            m-sharpness; saves one all-reduce per step). ``None``: on for ``sam``/``asam``, off for the
            variants that reuse the clean gradient in the update (``per_worker_safe = False``: GSAM,
            LookSAM, Friendly-SAM), for which ``per_worker=True`` is refused (the replicas would diverge).
        keep_bn_stats: keep BatchNorm running statistics from the clean pass only (``model=`` of the wrapper).

    Semantics:
        * gradient accumulation over ``k`` micro-batches: the perturbation comes from the accumulated
          clean gradient ``g = (1/k) sum_i grad L_i(w)``; every micro-batch is replayed at ``w + e`` and
          the update uses ``(1/k) sum_i grad L_i(w + e)`` -- exact SAM on the whole accumulated batch
          (cost: 2 forward/backward per micro-batch; the micro-batches are held until the step);
        * gradient clipping (``gradient_clip_val``) acts on the final SAM gradient;
        * ``16-mixed``: the replayed losses are scaled by the GradScaler's scale and unscaled after; if the
          perturbed gradient overflows the step falls back to the clean gradient (``n_fallback``); if the
          clean one overflows the scaler skips the step as usual;
        * ``training_step`` runs twice per micro-batch; ``self.log`` is silenced in the replay, but other
          side effects of ``training_step`` (e.g. a torchmetrics ``update``) happen twice;
          ``on_before_backward``/``on_after_backward`` hooks are not called for the replay.
    """

    _who = "SharpnessAwareMinimization"

    def __init__(
        self,
        rho: float = 0.05,
        variant: str = "sam",
        *,
        adaptive: bool = False,
        per_worker: bool | None = None,
        keep_bn_stats: bool = True,
        **variant_kwargs: Any,
    ) -> None:
        super().__init__()
        if not (isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho)):
            raise ConfigurationError(f"rho must be a positive number, got {rho!r}; the SAM default is 0.05.")
        from sharpguard.optim.factory import VARIANTS, canonical_variant

        key = canonical_variant(variant)
        safe = VARIANTS[key].per_worker_safe
        if per_worker and not safe:
            raise ConfigurationError(
                f"per_worker=True is not possible with variant {variant!r}: its update uses the clean gradient, "
                "which must be all-reduced or the replicas diverge; leave per_worker=None."
            )
        self.rho = float(rho)
        self.variant = variant
        self.adaptive = adaptive
        self.per_worker = safe if per_worker is None else bool(per_worker)
        self.keep_bn_stats = keep_bn_stats
        self.variant_kwargs = dict(variant_kwargs)
        self.sam: Any | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(variant=self.variant, rho=self.rho)

    def _block_clean_sync(self) -> bool:
        # only when a perturbed pass follows: on a step without one (interval skips, LookSAM reuse,
        # Momentum-SAM) the clean gradient is the update and must be all-reduced
        return self.per_worker and self.sam is not None and self.sam.needs_second_pass()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        from sharpguard.optim import make_sam

        knobs = dict(self.variant_kwargs)
        if self.adaptive:
            knobs["adaptive"] = True
        self.sam = make_sam(
            trainer.optimizers[0], self.variant, rho=self.rho, model=pl_module if self.keep_bn_stats else None, **knobs
        )
        if self._pending_state is not None:
            self._load_sam_state(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._buffer and self.sam is not None:
            self.sam.prepare()  # before the first forward of the window (Momentum-SAM moves w here)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._release_sync()
        batches, self._buffer = self._buffer, []
        sam = self.sam
        if sam is None:
            return
        params, grads = _grads(optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if not params or not batches or (scaler is not None and not _all_finite(grads)):
            # nothing to perturb, or an fp16 overflow that scaler.step will skip: abandon the SAM step
            # (weights back by copy if prepare() moved them; the variant's counters do not advance)
            sam.cancel()
            return
        clean = [g.clone() for g in grads] if scaler is not None else None
        fallback = False
        with torch.enable_grad(), _sam_replay(pl_module):
            perturbed = perturbed_pass(sam, self._replays(trainer, pl_module, batches, scaler), self._replay_no_sync(trainer))
        if perturbed:
            try:
                _, perturbed_grads = _grads(optimizer)
                self._unscale(perturbed_grads, scaler)
                fallback = scaler is not None and not _all_finite(perturbed_grads)
            except BaseException:
                sam.cancel()  # weights back to w by copy before the error propagates
                raise
        if fallback:
            sam.cancel()
            torch._foreach_copy_([p.grad for p in params], clean)
            self.n_fallback += 1
            return
        sam.unperturb()
        self.n_steps += 1

    @staticmethod
    def _replay_no_sync(trainer: Any) -> Any:
        # only the last replayed backward all-reduces (DDP's sync is decided at forward time)
        return trainer.strategy.block_backward_sync if _is_parallel(trainer.strategy) else None

    def _replays(self, trainer: Any, pl_module: Any, batches: list[tuple[Any, int]], scaler: Any) -> list[Any]:
        """One callable per micro-batch: ``training_step`` through the strategy (autocast, DDP), backward."""
        strategy = trainer.strategy
        accumulate = trainer.accumulate_grad_batches

        def replay(batch: Any, batch_idx: int) -> None:
            loss = _loss_of(strategy.training_step(*_step_args(pl_module, batch, batch_idx)))
            if loss is not None:
                self._backward(loss / accumulate, scaler)

        return [functools.partial(replay, batch, batch_idx) for batch, batch_idx in batches]

    # -- checkpoint state. Lightning saves the user's optimizer (the base) itself, so a checkpoint loads
    # without sharpguard; the wrapper's own entry (step counter, variant buffers) lives here.
    def _sam_extra_state(self) -> dict[str, Any]:
        return {} if self.sam is None else self.sam.sharpguard_state_dict()

    def _load_sam_state(self, extra: dict[str, Any]) -> None:
        if extra:
            self.sam.load_sharpguard_state_dict(extra)

    def state_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "rho": self.rho,
            "n_steps": self.n_steps,
            "n_fallback": self.n_fallback,
            "sam": self._sam_extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_steps = int(state_dict["n_steps"])
        self.n_fallback = int(state_dict["n_fallback"])
        if self.sam is not None:
            self._load_sam_state(state_dict.get("sam") or {})
        else:  # callbacks are restored before on_fit_start builds the wrapper
            self._pending_state = state_dict.get("sam") or {}


