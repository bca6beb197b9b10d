"""Curvature of sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``) models.

Under FSDP2 every parameter is a ``DTensor`` of which each rank holds one slice; the forward all-gathers
the full weights outside autograd and the backward reduce-scatters the gradient into the slices. So
``torch.autograd.grad`` cannot reach the sharded parameters (it returns ``None`` for them) and double
backward is out of reach; what FSDP does compute is the gradient, slice by slice. The product is
therefore the central difference of FSDP's own gradients (:mod:`.operator`'s finite-difference
product), with every vector of the solver held as the concatenation of this rank's slices:

* the weights move by writing into the local slices (``DTensor.to_local()`` shares their storage);
* ``loss.backward()`` fills each slice of ``.grad`` with the rank average of the ranks' gradients
  (FSDP2's default reduce-scatter divides by the world size), so each rank scales its loss by the world
  size times its batches' share of the probe's examples: the slices are then those of the gradient of
  the probe loss over the union of the ranks' probe batches (:class:`~.operator.ProbeLoss`'s operator);
* every inner product and norm of Lanczos sums its slices' partial results over the ranks (one
  all-reduce per dot product or per Gram-Schmidt pass), so each rank holds ``1/world`` of every
  Krylov vector and the same scalars.

Every rank must run the same number of probe batches (the backward passes are collectives); that is
checked first. The finite-difference product's accuracy is that of the unsharded one (docs/sharpness.md):
exact up to ~1e-7 relative in float64 on smooth models, less across ReLU kinks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._batches import LossFn
from ..errors import ConfigurationError
from .operator import HVPOperator, is_sharded
from .. import _validation as rules

__all__ = ["ShardedHVPOperator", "is_sharded"]


def slice_generator(seed: int) -> torch.Generator:
    """The CPU generator this rank draws its slice of a random vector from: seeded by ``seed`` and the rank, so
    the ranks' slices are independent draws and the whole vector one draw over the union of the parameters."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + torch.distributed.get_rank())


class ShardedHVPOperator(HVPOperator):
    """``v -> H v`` on an FSDP2 model, ``v`` and ``H v`` as this rank's slices (see the module docs).

    The same constructor as :class:`~.operator.HVPOperator`; ``hvp`` must be ``"auto"`` or
    ``"finite_difference"`` (double backward does not reach FSDP's sharded parameters).
    :meth:`reduce_sum` sums per-slice partial results over the ranks (give it to Lanczos).
    """

    supports_sharded = True

    @rules.checked()
    def __init__(self, model: nn.Module, batches: Any, loss_fn: LossFn | None = None, *, hvp: str = "auto",
                 **kwargs: Any) -> None:
        if hvp not in ("auto", "finite_difference"):
            raise ConfigurationError(
                f"hvp={hvp!r} cannot run on a sharded (FSDP2) model: FSDP gathers its weights outside autograd, so "
                "double backward never reaches the sharded parameters; use hvp='finite_difference' (or 'auto')."
            )
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigurationError("the model has sharded (DTensor) parameters but no process group is initialised.")
        kwargs["distributed"] = True
        super().__init__(model, batches, loss_fn, hvp="finite_difference", **kwargs)
        self.sharded_params = self.params
        self.world = torch.distributed.get_world_size()
        counts = torch.tensor([float(len(self.batches))], dtype=torch.float64, device=self.device)
        lowest, highest = counts.clone(), counts.clone()
        torch.distributed.all_reduce(lowest, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
        # a cost-only run (fake tensors, a fake process group) cannot read the counts: the ranks are alike
        if not self.cost_only and float(lowest[0]) != float(highest[0]):
            raise ConfigurationError(
                f"the ranks hold {int(lowest[0])} to {int(highest[0])} probe batches (after micro-batches); FSDP's "
                "backward is a collective, so give every rank the same number of probe batches."
            )
        # the local slices share the DTensors' storage: writing them moves the weights FSDP gathers
        self.params = [p.to_local() for p in self.sharded_params]
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = sum(self.numels)
        self.method = "finite_difference"

    # -- reductions over the slices -------------------------------------------------------------------
    def reduce_sum(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum per-slice partial results over the ranks (in place; returned)."""
        torch.distributed.all_reduce(partial)
        return partial

    def _sum_over_slices(self, partial: torch.Tensor) -> torch.Tensor:
        return self.reduce_sum(partial.to(device=self.device, dtype=torch.float64).reshape(1))[0]

    def _norm_tensor(self, vector: torch.Tensor) -> torch.Tensor:
        # a vector in host memory sums its slices' partial result on the device, where the collectives run
        local = torch.dot(vector, vector).to(device=self.device, dtype=torch.float64).reshape(1)
        return self.reduce_sum(local)[0].sqrt()

    # -- FSDP's gradient, slice by slice ----------------------------------------------------------------
    def loss_and_grad(self, out_device: torch.device | None = None) -> tuple[float, torch.Tensor]:
        """Probe loss (over every rank's batches) and this rank's slice of its gradient (on ``out_device``,
        a parameter at a time, where given: see :meth:`~.operator.ProbeLoss.loss_and_grad`)."""
        self._require_entered()
        total: torch.Tensor | None = None  # made after the first backward, as in ProbeLoss.loss_and_grad
        grad: torch.Tensor | None = None
        for w, batch in zip(self.weights, self.batches):
            loss = self._batch_loss(batch)
            # FSDP averages over the ranks: scaled by the world size, the average is the sum of the
            # ranks' weighted gradients, i.e. the gradient of the union's probe loss
            flat = self._consume_flat(self._sharded_gradient(loss * (w * self.world)), out_device)
            self.n_backward += 1
            grad = flat if grad is None else grad.add_(flat)
            term = w * loss.detach().double()
            total = term if total is None else total.add_(term)
        assert grad is not None and total is not None
        return self._read(self._all_reduce(total)), grad

    def _sharded_gradient(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        for p in self.sharded_params:
            p.grad = None
        loss.backward()
        grads = [None if p.grad is None else p.grad.to_local() for p in self.sharded_params]
        for p in self.sharded_params:
            p.grad = None
        return grads

    def _first_order(self, loss: torch.Tensor) -> list[torch.Tensor | None]:  # pragma: no cover - not reached
        raise ConfigurationError("a sharded model's gradient comes from loss_and_grad (FSDP's reduce-scatter).")
