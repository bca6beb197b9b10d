"""The Hessian-vector-product operator over a frozen probe set, and the probe loss it is built on.

Every curvature estimate in :mod:`sharpguard.sharpness` is a sequence of products ``H v`` with the
Hessian of the probe loss

    L(w) = sum_b n_b L_b(w) / sum_b n_b,

the batch-size-weighted mean of ``loss_fn(model, batch)`` over the probe batches (so a list of batches
gives the same operator as their concatenation, as in PyHessian's ``dataloader_hv_product``). Under
``torch.distributed`` the per-rank sums ``sum_b n_b H_b v`` and counts are all-reduced, so every rank
holds the product for the union of the ranks' probe shards (a rank-identical probe simply gives the same
operator on every rank).

Products are computed by Pearlmutter's double backward (Pearlmutter, Neural Computation 1994), under
the math attention kernel (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``): PyTorch's fused
attention kernels have no derivative of their backward (pytorch/pytorch#116350), and trying one first
would spend a forward and a backward before it failed. Where double backward is still not implemented
(a ``@once_differentiable`` function, reentrant checkpointing) ``hvp="auto"`` uses the central difference

    H v ~ (g(w + h v) - g(w - h v)) / (2 h),  h = 4 eps_mach^(1/3) * s_v / ||v||,
    s_v = max(sqrt(sum_i w_i^2 v_i^2) / ||v||, 1e-2),

which needs first-order gradients only (the step balances O(h^2) truncation against O(eps/h) rounding).
``s_v`` is the typical size of the weights that ``v`` moves: a step relative to the whole ``||w||`` moves
a direction concentrated on a few small weights - the top Hessian eigenvector of a transformer, on its
head and LayerNorms - by far more than their own size, and the product along it comes out far too low.
The factor 4 balances truncation against rounding in float32, along such eigenvectors and random vectors
alike (docs/sharpness.md gives the errors). The method used is reported as :attr:`HVPOperator.method`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from .._batches import BatchList, LossFn, as_batches, batch_size, checked_loss, default_loss_fn, split_batch
from .._batches import check_default_targets, detach_inference
from .._modules import has_fake_tensors, unwrap_data_parallel
from .._state import side_effect_free, trainable_parameters
from .._validation import positive_int
from ..errors import ConfigurationError, SharpGuardError
from .. import _validation as rules
from .micro import HVP_CHOICES, HVPMethod, ProductPlan, _AttentionCalls, _math_attention_kernel, is_sharded
from .micro import plan_products

_log = logging.getLogger(__name__)
_FD_FACTOR = 4.0  # finite-difference step in units of eps_mach^(1/3) times the weights' size (docstring)

__all__ = ["HVPOperator", "NonDeterministicHVPError", "ProbeLoss"]


class NonDeterministicHVPError(SharpGuardError, RuntimeError):
    """The same vector gave two different Hessian-vector products (dropout or a random loss)."""


class _DoubleBackwardError(RuntimeError):
    """Internal: the second backward pass failed (a kernel without a double-backward formula)."""


@rules.checked()
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def examples_over_ranks(n: int, cost_only: bool, device: torch.device) -> int:
    """The ranks' example counts summed (every rank calls this together). A cost-only run's fake collective
    returns no readable count, so every rank is taken to hold ``n``."""
    if cost_only:
        return n * torch.distributed.get_world_size()
    count = torch.tensor([float(n)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(count)
    return round(float(count[0]))


class ProbeLoss:
    """The probe loss ``L(w)`` and its gradient, on flat vectors over the trainable parameters.

    A context manager: entering it puts the model in eval mode (``train=False``, the default) inside the
    guards of :func:`sharpguard._state.side_effect_free`, so parameters, ``.grad``, ``requires_grad``,
    buffers, per-module modes and the global RNG are restored on exit, even after an exception.
    """

    #: whether this class computes gradients of sharded (FSDP2) parameters (:mod:`.sharded`)
    supports_sharded = False

    @rules.checked()
    def __init__(
        self,
        model: nn.Module,
        batches: Any,
        loss_fn: LossFn | None = None,
        *,
        train: bool = False,
        distributed: bool | None = None,
    ) -> None:
        if not self.supports_sharded and is_sharded(model):
            # autograd.grad returns None for FSDP's sharded parameters: measured here, the curvature would be 0
            raise ConfigurationError(
                "the model is sharded (FSDP2 DTensor parameters): this measure's gradients cannot reach them; "
                "hessian_eigenvalues, eos_ratio, hessian_trace, spectral_density (finite differences of FSDP's own "
                "gradients), directional_curvature, worst_case_sharpness, average_sharpness, first_order_sharpness, "
                "keskar_sharpness, robust_sharpness, relative_flatness (closed form) and the loss slices (and the "
                "SharpnessMonitor's measures of the same names) support sharded models."
            )
        self.batches = [detach_inference(b) for b in as_batches(batches)]
        if loss_fn is None:
            check_default_targets(self.batches)
        self.params = trainable_parameters(model)
        self.model = model
        self.module = unwrap_data_parallel(model)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else default_loss_fn
        self.train = bool(train)
        self.distributed = _distributed() if distributed is None else bool(distributed and _distributed())
        self.device = self.params[0].device
        # Krylov vectors are kept in float32 or wider even for bf16/fp16 weights (rounding in a half
        # precision matvec is ~1e-2 relative).
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        sizes = [batch_size(b) for b in self.batches]
        if any(s <= 0 for s in sizes):
            raise ConfigurationError("a probe batch has no examples; drop empty batches from the probe set.")
        #: fake tensors (FakeTensorMode): the same operations, no value read back (losses, norms and
        #: eigenvalues come out NaN); what such a run costs is what it is for
        self.cost_only = has_fake_tensors(model)
        total = float(examples_over_ranks(sum(sizes), self.cost_only, self.device) if self.distributed else sum(sizes))
        self.n_examples = round(total)
        self.weights = [s / float(total) for s in sizes]
        self._stack: contextlib.ExitStack | None = None
        self._grad_by_backward = False  # set when autograd.grad is refused (reentrant checkpointing)
        self._last_batch: Any = None
        self.n_forward = 0
        self.n_backward = 0
        #: host memory for the vectors a measure keeps off the device (None: the device; see HVPOperator)
        self.host_device: torch.device | None = None

    # -- context --------------------------------------------------------------------------------
    def __enter__(self):
        if self._stack is not None:
            raise ConfigurationError(f"this {type(self).__name__} is already in use; enter it once.")
        self._w0: torch.Tensor | None = None  # captured before the first write (one model-size vector)
        self._at_w0 = True  # the weights are the entry weights
        stack = contextlib.ExitStack()
        # The parameter guard's full copy is replaced by our own lazy one (:attr:`w0`): weights change only
        # through :meth:`set_parameters`, which captures them first, and are copied back on exit - so a
        # measure that never moves the weights (every exact-HVP measure) holds no copy of them at all.
        stack.enter_context(side_effect_free(self.model, train=self.train, parameters=False,
                                             backup_device=self.host_device))
        stack.callback(self._restore_weights)
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        _without_autocast_wrapper(self.module, stack)
        self._stack = stack
        return self

    def _restore_weights(self) -> None:
        """Copy the entry weights back (exact: ``w0`` is at least as wide as every parameter's dtype)."""
        if self._w0 is not None:
            with torch.no_grad():
                for p, chunk in zip(self.params, self.unflatten(self._w0)):
                    p.copy_(chunk)
            self._w0, self._at_w0 = None, True

    @property
    def w0(self) -> torch.Tensor:
        """The weights found on entry, as a flat vector (copied lazily: a curvature measure that never
        moves the weights never pays for the copy)."""
        self._require_entered()
        if self._w0 is None:
            host = self.host_device
            if host is None or host == self.device:
                self._w0 = self.flatten([p.detach() for p in self.params]).clone()
            else:  # copied piece by piece: no full flat copy on the device on its way to the host
                self._w0 = torch.cat([p.detach().reshape(-1).to(device=host, dtype=self.dtype) for p in self.params])
        return self._w0

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(*exc)

    def _require_entered(self) -> None:
        if self._stack is None:
            raise ConfigurationError(
                f"use the {type(self).__name__} inside a `with` block, which restores the model afterwards."
            )

    # -- flat vectors ---------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into one vector of :attr:`dtype` on :attr:`device`."""
        return torch.cat([t.reshape(-1).to(device=self.device, dtype=self.dtype) for t in tensors])

    def _consume_flat(self, tensors: list[torch.Tensor | None], device: torch.device | None = None) -> torch.Tensor:
        """Like :meth:`flatten` (``None`` as zeros) but drops each piece once copied, so a gradient and
        its flat copy never coexist in full (one model-size vector instead of two at the peak); ``device``
        (host memory) takes the flat copy off the model's device altogether."""
        pieces = tensors if isinstance(tensors, list) else list(tensors)  # a list is emptied in place
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device if device is None else device)
        offset = 0
        for i, n in enumerate(self.numels):
            if pieces[i] is not None:
                out[offset : offset + n].copy_(pieces[i].reshape(-1))
            pieces[i] = None
            offset += n
        return out

    def unflatten(self, vector: torch.Tensor, like_params: bool = False) -> list[torch.Tensor]:
        """Split a flat vector into per-parameter views (cast to each parameter's dtype if asked)."""
        chunks = torch.split(vector, self.numels)
        out = [c.view(s) for c, s in zip(chunks, self.shapes)]
        if like_params:
            out = [c.to(p.dtype) for c, p in zip(out, self.params)]
        return out

    def as_vector(self, value: Any, what: str = "vector") -> torch.Tensor:
        """Accept a flat tensor or a per-parameter list and return a flat vector (checked)."""
        if isinstance(value, torch.Tensor):
            if value.numel() != self.size:
                raise ConfigurationError(
                    f"the {what} has {value.numel()} entries but the model has {self.size} trainable parameters."
                )
            # a vector in host memory (:attr:`host_device`) stays there: the products read it a piece at a time
            where = self.host_device if value.device == self.host_device else self.device
            return value.detach().reshape(-1).to(device=where, dtype=self.dtype)
        tensors = list(value)
        if len(tensors) != len(self.params) or any(t.shape != p.shape for t, p in zip(tensors, self.params)):
            raise ConfigurationError(
                f"the {what} must be a flat tensor or one tensor per trainable parameter, shaped like them."
            )
        return self.flatten([t.detach() for t in tensors])

    def set_parameters(self, vector: torch.Tensor) -> None:
        """Copy a flat vector into the trainable parameters (restored when the context exits)."""
        self._require_entered()
        w0 = self.w0  # make sure the entry weights are captured before they change
        with torch.no_grad():
            for p, chunk in zip(self.params, self.unflatten(vector)):
                p.copy_(chunk)
        self._at_w0 = vector is w0

    # -- norms over the whole vector ---------------------------------------------------------------
    def vector_norm(self, vector: torch.Tensor) -> float:
        """The 2-norm of a flat vector of this probe (over every shard for a sharded model)."""
        return float(self._norm_tensor(vector))

    def _norm_tensor(self, vector: torch.Tensor) -> torch.Tensor:
        """:meth:`vector_norm` as a tensor, not read back (a cost-only run computes it all the same)."""
        return torch.linalg.vector_norm(vector)

    def _sum_over_slices(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over a flat vector's entries from this rank's partial sum: the partial sum itself, since every
        rank holds the whole vector (a sharded model's probe sums the ranks' slices)."""
        return partial

    # -- collectives ----------------------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        if tensor.device == self.device:
            torch.distributed.all_reduce(tensor)
            return tensor
        # a vector in host memory: through the device (where the collectives run) a parameter's piece at a time
        for piece in torch.split(tensor, self.numels):
            on_device = piece.to(self.device)
            torch.distributed.all_reduce(on_device)
            piece.copy_(on_device)
        return tensor

    # -- loss and gradient ----------------------------------------------------------------------
    def _batch_loss(self, batch: Any) -> torch.Tensor:
        self.n_forward += 1
        self._last_batch = batch
        return checked_loss(self.loss_fn(self.module, batch), "loss_fn")

    def loss(self) -> float:
        """Probe loss at the current weights (forward passes only)."""
        self._require_entered()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for w, batch in zip(self.weights, self.batches):
                total += w * self._batch_loss(batch).detach().double()
        return self._read(self._all_reduce(total))

    def _read(self, scalar: torch.Tensor) -> float:
        """A scalar's value on the host, or NaN in a cost-only run (a fake tensor has no value)."""
        return math.nan if self.cost_only else float(scalar)

    def loss_and_grad(self, out_device: torch.device | None = None) -> tuple[float, torch.Tensor]:
        """Probe loss and its flat gradient at the current weights (never touches ``.grad``); ``out_device``
        (host memory) receives the gradient a parameter at a time, so no flat copy of it is made on the device."""
        self._require_entered()
        total: torch.Tensor | None = None  # made after the first backward: nothing more than a step's at its peak
        grad: torch.Tensor | None = None
        for w, batch in zip(self.weights, self.batches):
            loss = self._batch_loss(batch)
            flat = self._consume_flat(self._first_order(loss), out_device)  # the per-parameter grads die here
            self.n_backward += 1
            # accumulate into the first batch's vector: one model-size vector besides the current one
            grad = flat.mul_(w) if grad is None else grad.add_(flat, alpha=w)
            del flat
            term = w * loss.detach().double()
            total = term if total is None else total.add_(term)
        assert grad is not None and total is not None  # the probe has at least one batch (checked in __init__)
        return self._read(self._all_reduce(total)), self._all_reduce(grad)

    def _first_order(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """``dL/dw`` without touching ``.grad`` where autograd allows it. Reentrant activation checkpointing
        (``torch.utils.checkpoint(use_reentrant=True)``, Hugging Face's ``gradient_checkpointing`` with its
        default kwargs) refuses ``torch.autograd.grad``; then the gradient is taken by ``backward()`` into
        emptied ``.grad`` slots, which the guards give back (same tensor objects and values) on exit."""
        if not self._grad_by_backward:
            try:
                return list(torch.autograd.grad(loss, self.params, allow_unused=True))
            except RuntimeError as exc:
                if not _is_reentrant_checkpoint_error(exc):
                    raise
                self._grad_by_backward = True
                loss = self._batch_loss(self._last_batch)  # the failed call freed the graph
        for p in self.params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def restricted(self, batch: Any) -> ProbeLoss:
        """The same loss on one of the probe batches, on this rank only (for per-batch m-sharpness)."""
        self._require_entered()
        _ = self.w0  # capture here, so the sub-loss shares our copy and our exit restores its writes
        sub = object.__new__(type(self))
        sub.__dict__.update(self.__dict__)
        sub.batches, sub.weights, sub.distributed = [batch], [1.0], False
        if "_graphs" in sub.__dict__:
            sub._graphs = {}  # cached graphs are per batch of the parent's probe
        sub.n_examples = batch_size(batch)
        return sub


class HVPOperator(ProbeLoss):
    """``v -> H v`` for the Hessian of the probe loss over the trainable parameters (flat vectors).

    Use it as a context manager (the model is restored on exit)::

        with HVPOperator(model, batches) as op:
            hv = op.matvec(v)          # v: flat tensor of op.size entries
            print(op.method, op.n_hvp)

    Args:
        model: the model (a DDP wrapper is unwrapped; products are all-reduced instead).
        batches: one batch or a list of batches, fixed for the operator's lifetime.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross entropy / ``model(**batch).loss``.
        hvp: ``"auto"`` (double backward under the math attention kernel, else finite differences: where
            the model has no double backward, or, with ``micro_batches="auto"``, where its graph would not fit
            in a training step's memory, :attr:`plan`), ``"autograd"`` or ``"finite_difference"``.
        train: run the model in train mode (default: eval mode, so dropout is off and BatchNorm uses its
            running statistics).
        check_determinism: apply ``H`` twice to the first vector and raise
            :class:`NonDeterministicHVPError` if the products differ (the extra product is counted in
            :attr:`n_hvp`).
        fd_eps: step of the finite-difference product relative to the size of the weights it moves
            (default ``4 * eps_mach ** (1/3)``; see the module docstring).
        cache_graph: keep the first-order gradient graph of each probe batch alive between products, so
            every product after the first costs one extra backward instead of a forward, a backward and
            a double backward (as PyHessian does for one batch). It holds that graph's memory for the
            operator's lifetime, so the default (``None``) caches only a single-batch probe.
        micro_batches: run each probe batch as this many consecutive micro-batches
            (:func:`sharpguard._batches.split_batch`), like gradient accumulation: the double-backward
            graph, about 2.4 times a training step's activations (docs/cost_model.md), then holds the
            activations of one micro-batch at a time. The operator is unchanged for a loss that is a
            mean over examples (the micro-batches are weighted by their sizes, as probe batches are);
            a loss averaged over tokens is then weighted by examples, not tokens. More than one
            micro-batch means no cached graph (``cache_graph=None``): each product costs a forward, a
            backward and a double backward per micro-batch instead of one backward. ``"auto"`` chooses
            the number from the probe's activations (:func:`~sharpguard.sharpness.micro.auto_micro_batches`,
            the default of every curvature function and of the ``SharpnessMonitor``): as few as keep a
            check within a training step's memory, 1 where the whole batch's graph fits, up to 8.
            The operator's own default stays 1 (it is a building block; the measures choose).
        host_device: where finite-difference products keep the entry weights' copy and the first of their
            two gradients while the second runs (host memory on an accelerator: two parameter-sized vectors
            fewer on the device at the product's peak, at the price of copying one gradient each way per
            product); default: the model's device. The curvature functions pass their ``basis_device``.
    """

    @rules.checked()
    def __init__(
        self,
        model: nn.Module,
        batches: Any,
        loss_fn: LossFn | None = None,
        *,
        hvp: HVPMethod = "auto",
        train: bool = False,
        check_determinism: bool = True,
        fd_eps: float | None = None,
        distributed: bool | None = None,
        cache_graph: bool | None = None,
        micro_batches: int | Literal["auto"] = 1,
        host_device: torch.device | str | None = None,
    ) -> None:
        if hvp not in HVP_CHOICES:
            raise ConfigurationError(f"hvp must be one of {HVP_CHOICES}, got {hvp!r}.")
        if fd_eps is not None and not (fd_eps > 0 and math.isfinite(fd_eps)):
            raise ConfigurationError(f"fd_eps must be a positive number, got {fd_eps!r}.")
        #: the micro-batches and (under ``hvp="auto"``) the method ``micro_batches="auto"`` chose, or None
        self.plan: ProductPlan | None = None
        requested = hvp
        if micro_batches == "auto":  # as many as the probe's activations need (sharpness/micro.py)
            device = next(p for p in model.parameters()).device
            self.plan = plan_products(model, as_batches(batches), loss_fn, hvp=hvp, distributed=distributed,
                                      basis_on_device=host_device is None or torch.device(host_device) == device)
            micro_batches = self.plan.micro_batches
            if hvp == "auto" and self.plan.hvp == "finite_difference":
                hvp = "finite_difference"  # exact products would not fit in a training step's memory
                _log.info("sharpguard: %s.", self.plan.reason)
        self.micro_batches = positive_int("micro_batches", micro_batches)
        if self.micro_batches > 1:
            batches = BatchList(part for b in as_batches(batches) for part in split_batch(b, self.micro_batches))
        super().__init__(model, batches, loss_fn, train=train, distributed=distributed)
        self.requested = requested
        #: where finite-difference products keep the entry weights' copy and the first gradient (None: the
        #: device); the curvature functions pass their basis device, host memory on an accelerator
        self.host_device = None if host_device is None else torch.device(host_device)
        if self.host_device == self.device:
            self.host_device = None
        self.method: str | None = "finite_difference" if hvp == "finite_difference" else None
        self._kernel: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # a cost-only run takes the determinism check's second product too (its cost is the real check's)
        # and leaves out only the comparison, which reads values
        self._unchecked = bool(check_determinism)
        # The least precise parameter dtype sets both the finite-difference step and the tolerance of
        # the determinism check (sqrt(eps): GPU atomics reorder sums, dropout changes the product O(1)).
        eps_mach = max(torch.finfo(p.dtype).eps for p in self.params)
        self.fd_eps = fd_eps if fd_eps is not None else _FD_FACTOR * eps_mach ** (1.0 / 3.0)
        self._rtol = math.sqrt(eps_mach)
        self.n_hvp = 0
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else bool(cache_graph)
        self._graphs: dict[int, list[tuple[torch.Tensor, int]]] = {}

    def __exit__(self, *exc: object) -> None:
        self._graphs.clear()  # free the cached gradient graphs before the model is restored
        super().__exit__(*exc)

    def set_parameters(self, vector: torch.Tensor) -> None:
        self._graphs.clear()  # the cached graphs belong to the old weights
        super().set_parameters(vector)

    # -- products -------------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (returned as a new flat vector of :attr:`dtype`, on the model's
        device, or in host memory where ``v`` is in :attr:`host_device`: finite differences then read ``v``
        there a parameter at a time, and exact products take it to the device and their result back)."""
        self._require_entered()
        v = self.as_vector(v)
        hv = self._select_method(v) if self.method is None else self._product(v)
        if self._unchecked:
            self._unchecked = False
            # A new forward (a cached graph would hide randomness). The first product's cached graph is
            # dropped first and the new one cached in its place: never two gradient graphs alive at once.
            self._graphs.clear()
            again = self._product(v)
            diff, scale = self._norm_tensor(hv - again), self._norm_tensor(hv)
            if not self.cost_only:
                self._require_deterministic(float(diff), float(scale))
        return hv

    __matmul__ = matvec

    def _require_deterministic(self, diff: float, scale: float) -> None:
        """Raise where the two products of the determinism check differ by more than ``sqrt(eps)``."""
        if not diff <= self._rtol * max(scale, torch.finfo(self.dtype).tiny):
            raise NonDeterministicHVPError(
                f"two Hessian-vector products with the same vector differ (relative difference "
                f"{diff / max(scale, 1e-300):.2e}); the loss is random - measure in eval mode (train=False), "
                f"turn off dropout/augmentation, and pass a fixed probe set."
            )

    def _product(self, v: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        self.n_hvp += 1
        if self.method == "finite_difference":
            return self._hvp_finite_difference(v)
        with self._kernel():
            return self._hvp_autograd(v.to(self.device), fresh=fresh).to(v.device)

    def _select_method(self, v: torch.Tensor) -> torch.Tensor:
        """First product under ``hvp="auto"`` or ``"autograd"``: find the cheapest method that works, remember it.

        Double backward runs under the math attention kernel from the first try: no fused kernel has a
        derivative of its backward, and a first try under one spent a forward, the gradient graph's backward
        and part of the second backward before it failed, a third more than the product itself
        (docs/cost_model.md, "Time"). The kernel changes nothing where a model does not call
        scaled-dot-product attention; the method is reported as ``"autograd+math_sdpa"`` where it does."""
        self.n_hvp += 1
        math_kernel = _math_attention_kernel() or contextlib.nullcontext
        attention = _AttentionCalls()
        try:
            with attention, math_kernel():
                hv = self._hvp_autograd(v.to(self.device)).to(v.device)
        except _DoubleBackwardError as exc:
            self._graphs.clear()
            first_error = exc.__cause__
        else:
            self._kernel = math_kernel
            self.method = "autograd+math_sdpa" if attention.seen else "autograd"
            return hv
        if self.requested == "autograd":
            raise ConfigurationError(
                f"double backward failed through this model ({first_error}); pass hvp='auto' or "
                f"hvp='finite_difference'."
            ) from first_error
        if first_error is not None:  # its traceback's frames hold the failed gradient graph: not through the fallback
            first_error = first_error.with_traceback(None)
        warnings.warn(
            f"double backward is not available for this model ({first_error}); using a finite-difference "
            f"Hessian-vector product (relative error ~{(self.fd_eps / _FD_FACTOR) ** 2:.0e} instead of exact products "
            f"on smooth models; on ReLU/max-pool networks it also counts the kinks it steps across and can differ "
            f"a lot from the exact Hessian - use non-reentrant checkpointing or a double-backward-capable kernel).",
            RuntimeWarning,
            stacklevel=3,
        )
        self.method = "finite_difference"
        return self._hvp_finite_difference(v)

    def _hvp_autograd(self, v: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """Pearlmutter's product by double backward; ``fresh`` rebuilds the gradient graph, bypassing the cache."""
        vs = self.unflatten(v, like_params=True)
        out = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        cache = self.cache_graph and not fresh
        for i, (w, batch) in enumerate(zip(self.weights, self.batches)):
            pairs = self._graphs.get(i) if cache else None
            if pairs is None:
                pairs = self._gradient_graph(batch)
                if cache:
                    self._graphs[i] = pairs
            if not pairs:
                continue
            try:
                # d<g, v>/dw = H v. Through the scalar <g, v> rather than grad_outputs=v, so that without a
                # cached graph the gradient itself is freed before the second backward runs (its graph
                # needs v, not g): on GPT-2 10.2M that is two parameter copies less at the product's peak
                # (docs/cost_model.md).
                gv = _inner(pairs, vs)
                if not cache:
                    pairs = None
                hv = list(torch.autograd.grad(gv, self.params, allow_unused=True, retain_graph=cache))
                del gv
            except (RuntimeError, NotImplementedError) as exc:
                raise _DoubleBackwardError(str(exc)) from exc
            self.n_backward += 1
            self._accumulate(out, hv, w)  # empties hv as it adds
            # this micro-batch's gradient (a parameter-sized copy) must not live on through the next one's
            # forward and backward: that held two extra parameter copies at the peak of every later slice
            del pairs
        return self._all_reduce(out)

    def _accumulate(self, out: torch.Tensor, pieces: list[torch.Tensor | None], weight: float) -> None:
        """``out += weight * flat(pieces)``, dropping each piece once added: no flat copy of the product
        next to the per-parameter one (one model-size vector less at the peak)."""
        offset = 0
        for i, n in enumerate(self.numels):
            if pieces[i] is not None:
                out[offset : offset + n].add_(pieces[i].reshape(-1), alpha=weight)
            pieces[i] = None
            offset += n

    def _gradient_graph(self, batch: Any) -> list[tuple[torch.Tensor, int]]:
        """(gradient with its graph, parameter index) for one batch: the first half of Pearlmutter's product."""
        loss = self._batch_loss(batch)
        try:
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        except RuntimeError as exc:
            if _is_reentrant_checkpoint_error(exc):  # no double backward through it: fall back
                raise _DoubleBackwardError(str(exc)) from exc
            raise
        self.n_backward += 1
        # A gradient with no graph is constant in w: its rows of H are zero.
        pairs = [(g, j) for j, g in enumerate(grads) if g is not None and g.requires_grad]
        if pairs and self.method is None and _has_error_node([g for g, _ in pairs]):
            raise _DoubleBackwardError(
                "a custom autograd.Function marked @once_differentiable has no double backward"
            ) from RuntimeError("once_differentiable")
        return pairs

    def _weighted_norm(self, w0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``||w0 * v||`` (over every shard); with ``w0`` in host memory, a parameter at a time."""
        if w0.device == v.device:
            return self._norm_tensor(w0 * v)
        parts = [torch.linalg.vector_norm(w.to(d.device) * d) for w, d in zip(self.unflatten(w0), self.unflatten(v))]
        return self._norm_tensor(torch.stack(parts))

    def _hvp_finite_difference(self, v: torch.Tensor) -> torch.Tensor:
        # at the entry weights (the usual case) reuse their copy instead of taking another
        w0 = self.w0 if self._at_w0 else self.flatten([p.detach() for p in self.params]).clone()
        if self.cost_only:
            # the same norms are computed (their cost counts) but cannot be read: a stated step of fd_eps
            self._norm_tensor(v), self._weighted_norm(w0, v)
            h = self.fd_eps
        else:
            v_norm = self.vector_norm(v)
            if v_norm == 0.0:
                return torch.zeros_like(v)
            # s_v: the size of the weights v moves, their v-weighted RMS sqrt(sum w_i^2 v_i^2) / ||v|| (an idle
            # large block elsewhere, such as an embedding table, does not enter), floored at 1e-2 so a direction
            # on zero-initialised weights (biases) still takes a step above rounding
            h = self.fd_eps * max(float(self._weighted_norm(w0, v)) / v_norm, 1e-2) / v_norm
        if self.host_device is not None or v.device != self.device:
            return self._central_difference_host(w0, v, h)
        return self._central_difference(w0, v, h)

    def _central_difference(self, w0: torch.Tensor, v: torch.Tensor, h: float) -> torch.Tensor:
        """``(g(w0 + h v) - g(w0 - h v)) / 2h`` with every vector on the device."""
        try:
            self.set_parameters(torch.add(w0, v, alpha=h))
            _, g_plus = self.loss_and_grad()
            self.set_parameters(torch.add(w0, v, alpha=-h))
            _, g_minus = self.loss_and_grad()
        finally:
            self.set_parameters(w0)
        return g_plus.sub_(g_minus).div_(2.0 * h)  # in place: no third gradient-size vector

    def _central_difference_host(self, w0: torch.Tensor, v: torch.Tensor, h: float) -> torch.Tensor:
        """The central difference with every vector in host memory (where ``w0`` is, :attr:`host_device`): the
        device holds only the gradient being taken, parameter by parameter. The weights are set a parameter
        at a time and each gradient is copied off the device as it is flattened, with the same arithmetic as
        the on-device product, so the two give the same numbers. The product comes back where ``v`` is."""
        host = w0.device

        def move(sign: float) -> None:
            with torch.no_grad():
                for p, w, d in zip(self.params, self.unflatten(w0), self.unflatten(v)):
                    p.copy_(torch.add(w.to(p.device), d.to(p.device), alpha=sign * h))
            self._at_w0 = False

        try:
            move(1.0)
            _, g_plus = self.loss_and_grad(out_device=host)
            move(-1.0)
            _, g_minus = self.loss_and_grad(out_device=host)
        finally:
            self.set_parameters(w0)
        return g_plus.sub_(g_minus).div_(2.0 * h).to(v.device)


def _inner(pairs: list[tuple[torch.Tensor, int]], vs: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j <g_j, v_j>`` over (gradient, parameter index) pairs, in the gradients' graph. The product's
    backward saves only ``v`` (which needs no gradient), so the ``g_j`` die with the caller's references."""
    total: torch.Tensor | None = None
    for g, j in pairs:
        term = torch.mul(g, vs[j]).sum()
        total = term if total is None else total + term
    assert total is not None
    return total


def _without_autocast_wrapper(module: nn.Module, stack: contextlib.ExitStack) -> None:
    """Measure the float32 function, not bf16/fp16 products: Accelerate's mixed precision (the HF
    Trainer's ``bf16=True``/``fp16=True``) replaces ``module.forward`` by an ``autocast`` wrapper and keeps
    the original as ``module._original_forward``; for the measurement the original is put back (and the
    wrapper restored on exit): reduced-precision products bias ``lambda_max`` low (docs/sharpness.md)."""
    wrapped = module.__dict__.get("forward")
    original = getattr(module, "_original_forward", None)
    if wrapped is not None and original is not None and wrapped is not original:
        module.forward = original
        stack.callback(setattr, module, "forward", wrapped)


def _is_reentrant_checkpoint_error(exc: BaseException) -> bool:
    """torch's refusal of ``autograd.grad`` through ``checkpoint(use_reentrant=True)``."""
    return "use_reentrant" in str(exc)


def _has_error_node(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a gradient's graph contains autograd's ``Error`` node, which ``@once_differentiable``
    functions leave instead of a derivative: double backward through it silently drops those paths
    (the node has no inputs), so we must detect it rather than wait for an exception."""
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ in ("Error", "DelayedError"):
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False
