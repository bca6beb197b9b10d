"""The SAM callback: Lightning runs the clean pass, :class:`sharpguard.optim.SAMEngine` the rest.

This file only translates Lightning's hooks: where the batch is (``on_train_batch_start``), how one
micro-batch runs forward/backward (``trainer.strategy.training_step``, so DDP and autocast apply),
how gradient sync is suspended (``strategy.block_backward_sync``), and that under ``16-mixed`` the
clean gradient was already unscaled when ``on_before_optimizer_step`` fires (so the replayed one
is unscaled here too). The algorithm, its defaults and its fault policy live in the core.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from sharpguard._validation import check_keywords, one_of
from sharpguard.errors import CheckpointError, ConfigurationError
from sharpguard.optim import SAMConfig, SAMEngine
from sharpguard.optim.factory import VARIANTS
from sharpguard.optim.sam import RESUME_POLICIES

from ._hooks import (
    _SyncWindowCallback,
    _is_parallel,
    _loss_of,
    _refuse_unsupported,
    is_resuming_fit,
    refuse_missing_callback_state,
    _sharded,
    _sam_replay,
    _step_args,
    _stepping,
    _unscale,
)
from sharpguard import _validation as rules

__all__ = ["SharpnessAwareMinimization"]


def _engine_per_worker(variant: str, *, sync_perturbation: bool) -> bool:
    """:attr:`SAMEngine.per_worker` for a variant before the fit has built it: the engine's own rule, read
    off the variant class's declaration (``per_worker_safe``) and the setting, with unsharded gradients."""
    planned = SimpleNamespace(
        sharded=False,
        sam=SimpleNamespace(sync_perturbation=sync_perturbation, per_worker_safe=VARIANTS[variant].per_worker_safe),
    )
    return bool(SAMEngine.per_worker.fget(planned))


class SharpnessAwareMinimization(_SyncWindowCallback):
    """Sharpness-aware minimization (Foret et al., ICLR 2021) for any LightningModule, as one callback.

    Args:
        rho: radius of the weight perturbation; ``None`` (default) takes the variant's own default
            (SAM 0.05, ASAM 0.5, Momentum-SAM 0.3); ``0`` reproduces the plain optimizer.
        variant: the name of any registered SAM variant (:data:`sharpguard.optim.VARIANTS`: ``"sam"``,
            ``"asam"``, ``"gsam"``, ``"looksam"``, ..., aliases accepted; see :class:`sharpguard.optim.SAMConfig`);
            the variant's knobs go in ``**variant_kwargs``.
        adaptive: shorthand for ASAM's scale-invariant perturbation with ``variant="sam"``.
        per_worker: under DDP, compute the perturbation from each worker's local gradient (the SAM paper's
            m-sharpness; saves one all-reduce per step). ``None``: on for ``sam``/``asam``, off for the
            variants that reuse the clean gradient in the update or their state (``per_worker_safe = False``:
            GSAM, LookSAM, Friendly-SAM, ...), for which ``per_worker=True`` is refused (the replicas would diverge).
            The rule is the engine's (:attr:`sharpguard.optim.SAMEngine.per_worker`); the property :attr:`per_worker`
            reads it.
        keep_bn_stats: keep BatchNorm running statistics from the clean pass only (``model=`` of the wrapper).
        nonfinite: ``"skip"`` (default) or ``"fallback"``, the core's policy for non-finite gradients
        (docs/reliability.md).
        resume: when a checkpoint's SAM settings differ from this callback's: ``"error"`` (default),
            ``"checkpoint"`` (take the checkpoint's) or ``"current"`` (keep these). Resume is all or
            nothing: a ``ckpt_path`` without this callback's state (absent, emptied, or without its
            ``sam`` part) is refused naming the file, unless ``"current"`` (SAM's state starts afresh,
            said once).

    Every argument is checked here, when the callback is built (a misspelled knob names the fix).

    Semantics:
        * gradient accumulation over ``k`` micro-batches: the perturbation comes from the accumulated
          clean gradient; every micro-batch is replayed at ``w + e`` from the module state its clean
          pass started from (a truncated-BPTT ``self.hidden`` included) -- exact SAM on the whole
          accumulated batch (2 forward/backward per micro-batch; the micro-batches are held until the step);
        * gradient clipping (``gradient_clip_val``) acts on the final SAM gradient;
        * ``16-mixed``: the replayed losses are scaled by the GradScaler's scale and unscaled after; a
          non-finite clean gradient is left for ``scaler.step`` to skip, a non-finite perturbed one falls
          back to the clean gradient -- the same policy as every other front end;
        * FSDP (``FSDPStrategy``, or FSDP2: ``fully_shard`` in ``configure_model`` under
          ``ModelParallelStrategy``): SAM and ASAM with the norm all-reduced across shards, the other
          variants refused when the fit starts; DeepSpeed is refused;
        * ``training_step`` runs twice per micro-batch; ``self.log`` is silenced in the replay, but other
          side effects of ``training_step`` (e.g. a torchmetrics ``update``) happen twice;
          ``on_before_backward``/``on_after_backward`` hooks are not called for the replay.
    """

    _who = "SharpnessAwareMinimization"

    @rules.checked()
    def __init__(
        self,
        rho: float | None = None,
        variant: str = "sam",
        *,
        adaptive: bool = False,
        per_worker: bool | None = None,
        keep_bn_stats: bool = True,
        nonfinite: str = "skip",
        resume: str = "error",
        **variant_kwargs: Any,
    ) -> None:
        super().__init__()
        knobs = dict(variant_kwargs)
        if adaptive:
            knobs["adaptive"] = True
        from sharpguard.optim.factory import canonical_variant

        if per_worker and not _engine_per_worker(canonical_variant(variant), sync_perturbation=False):
            raise ConfigurationError(
                f"per_worker=True is not possible with variant {variant!r}: its update uses the clean gradient, "
                "which must be all-reduced or the replicas diverge; leave per_worker=None."
            )
        self.config = SAMConfig(
            variant=variant, rho=rho, sync_perturbation=per_worker is False, nonfinite=nonfinite, knobs=knobs
        )
        self.resume = one_of("resume", resume, RESUME_POLICIES)
        self.keep_bn_stats = bool(keep_bn_stats)
        self.engine: SAMEngine | None = None
        self._pending_state: dict[str, Any] | None = None
        self._pending_n_steps = 0

    # ------------------------------------------------------------------------------ properties
    @property
    def per_worker(self) -> bool:
        """Whether each worker perturbs along its own clean gradient: the engine's rule
        (:attr:`SAMEngine.per_worker`), asked of the engine once the fit has built it and, before, of the
        variant and settings it will be built from (taken as unsharded until the strategy is known)."""
        if self.engine is not None:
            return self.engine.per_worker
        return _engine_per_worker(self.config.variant, sync_perturbation=self.config.sync_perturbation)

    @property
    def sam(self) -> Any:
        """The SAM variant around the user's optimizer (built at fit start)."""
        return None if self.engine is None else self.engine.sam

    @property
    def n_steps(self) -> int:
        """Optimizer steps that ran a perturbed pass."""
        return 0 if self.engine is None else self.engine.n_steps

    @property
    def n_fallback(self) -> int:
        """Steps whose perturbed gradient was not finite and fell back to the clean one."""
        counts = getattr(self.sam, "nonfinite_counts", None)
        return 0 if counts is None else counts["nonfinite_perturbed"]

    @property
    def state_key(self) -> str:
        # One key whatever the settings: a resumed run with other settings finds the saved state and
        # is told what differs (a key built from rho/variant would drop the state silently).
        return self._generate_state_key()

    # ------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            _refuse_unsupported(trainer, pl_module, self._who, allow_fsdp=True)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)  # exactly one optimizer
        sharded = _sharded(trainer, pl_module)
        sam = self.config.build(trainer.optimizers[0], model=pl_module if self.keep_bn_stats else None, sharded=sharded)
        self.engine = SAMEngine(sam, sharded=sharded)
        if self._pending_state is not None:
            self._load_sam_state(self._pending_state)
            self.engine.n_steps = self._pending_n_steps
            self._pending_state = None
        from ._hooks import rank_zero_info

        rank_zero_info(f"sharpguard: SAM active -- {self.config.describe()}.")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        from ._hooks import rank_zero_info

        if self.engine is not None:
            rank_zero_info(f"sharpguard: SAM spent -- {self.engine.summary()}.")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        engine = self.engine
        if engine is None:
            return
        engine.record(self._replay(trainer, pl_module, batch, batch_idx), pl_module)
        parallel = _is_parallel(trainer.strategy)
        if _stepping(trainer) and engine.clean_pass_unsynced(distributed=parallel):
            self._block_sync(trainer)  # left after the backward (on_after_backward)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._release_sync()
        engine = self.engine
        if engine is None or not engine.pending:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        no_sync = trainer.strategy.block_backward_sync if _is_parallel(trainer.strategy) else None
        with torch.enable_grad(), _sam_replay(pl_module):
            engine.finish(no_sync=no_sync, unscale=self._unscaler(scaler))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if _stepping(trainer) and self.engine is not None and self.engine.pending:
            self.engine.abandon()  # the optimizer step was skipped: drop the window, w back by copy

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self.engine is not None and self.engine.pending:
            self.engine.abandon()

    # ---------------------------------------------------------------------------- translation
    @staticmethod
    def _replay(trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> Any:
        """One micro-batch at the current weights: ``training_step`` through the strategy, backward."""

        def replay() -> None:
            loss = _loss_of(trainer.strategy.training_step(*_step_args(pl_module, batch, batch_idx)))
            if loss is None:
                return
            loss = loss / trainer.accumulate_grad_batches
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            (scaler.scale(loss) if scaler is not None else loss).backward()

        return replay

    @staticmethod
    def _unscaler(scaler: Any) -> Any:
        """Lightning unscaled the clean gradient before this hook: unscale the replayed one the same way."""
        if scaler is None:
            return None
        return lambda grads: _unscale(grads, scaler)

    # -- checkpoint state. Lightning saves the user's optimizer (the base) itself, so a checkpoint loads
    # without sharpguard; the wrapper's own entry (step counter, knobs, variant buffers) lives here.
    def _load_sam_state(self, extra: dict[str, Any]) -> None:
        if extra:
            self.sam.load_sharpguard_state_dict(extra, resume=self.resume)

    def state_dict(self) -> dict[str, Any]:
        sam = self.sam
        own = sam.sharpguard_state_dict() if hasattr(sam, "sharpguard_state_dict") else {}
        return {"variant": self.config.variant, "n_steps": self.n_steps, "sam": own}

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Resume is all or nothing: a checkpoint without this callback's state is refused (Lightning
        itself skips a callback whose entry is absent or empty), unless ``resume="current"``."""
        self._ckpt_path = getattr(trainer, "ckpt_path", None)
        if is_resuming_fit(trainer) and not (checkpoint.get("callbacks") or {}).get(self.state_key):
            refuse_missing_callback_state(self._who, self.state_key, self.resume, self._what, self._ckpt_path)

    _what = "the SAM variant's own state (step counter, knobs, buffers)"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"{self._who} checkpoint state must be the dict state_dict() saved, got "
                                  f"{type(state_dict).__name__}; the checkpoint is corrupt, nothing was loaded.")
        check_keywords(f"{self._who} checkpoint state", state_dict, ("variant", "n_steps", "sam", "rho", "n_fallback"))
        if "sam" not in state_dict:
            refuse_missing_callback_state(self._who, self.state_key, self.resume, self._what,
                                          getattr(self, "_ckpt_path", None))
            return
        n_steps = state_dict.get("n_steps", 0)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ConfigurationError(f"{self._who} checkpoint state: n_steps must be an integer >= 0, got {n_steps!r}.")
        saved_variant = state_dict.get("variant", self.config.variant)
        if saved_variant != self.config.variant and self.resume != "current":
            raise ConfigurationError(
                f"this checkpoint was trained with SAM variant {saved_variant!r}, this callback runs "
                f"{self.config.variant!r}; build SharpnessAwareMinimization(variant={saved_variant!r}) to resume "
                "it, or pass resume='current' to start the variant's state afresh."
            )
        extra = state_dict["sam"]
        if not isinstance(extra, dict):  # (no truth test: a corrupted entry may be a tensor)
            raise ConfigurationError(
                f"{self._who} checkpoint state: 'sam' must be the dict SAM saved, got {type(extra).__name__}; "
                "nothing was loaded."
            )
        if saved_variant != self.config.variant:
            extra = {}
        if self.engine is not None:
            self._load_sam_state(extra)
            self.engine.n_steps = n_steps
        else:  # callbacks are restored before on_fit_start builds the wrapper
            self._pending_state = extra
            self._pending_n_steps = n_steps
