"""SAF (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free", arXiv:2205.14083) as a loss term.

SAF replaces SAM's sharpness term with a *trajectory loss* that costs no extra forward or backward:
the KL divergence between the model's softened outputs on a training example now and those it gave
the same example :math:`\\tilde E` epochs earlier (the paper's eq. 5),

.. math:: L_{\\mathrm{tra}} = \\lambda\\,\\tau^2\\,\\frac{1}{|B|}\\sum_{i\\in B}
          \\mathrm{KL}\\Big(\\sigma\\big(\\hat y_i^{(e-\\tilde
          E)}/\\tau\\big)\\,\\Big\\Vert\\,\\sigma\\big(f_\\theta(x_i)/\\tau\\big)\\Big),

switched on from epoch :math:`E_{\\mathrm{start}}`. The past outputs are stored per example, so the
data pipeline must hand over each example's index in the training set::

    saf = SAF(num_examples=len(train_set))
    logits = model(x)
    loss = F.cross_entropy(logits, y) + saf(logits, indices, epoch)

Usage in each front end, and what it saves: ``docs/cheap_sam.md``. MESA (the same paper's
memory-light form, an EMA teacher in place of stored outputs) is :class:`~sharpguard.regularizers.mesa.MESA`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._validation import non_negative, non_negative_int, positive, positive_int
from ..errors import ConfigurationError
from ..optim import _phase
from .mesa import _logits
from .. import _validation as rules

__all__ = ["SAF"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SAF:
    r"""SAF's trajectory loss on outputs stored per training example (Du et al., NeurIPS 2022, eq. 5).

    Each call stores the detached logits of the batch's examples for this epoch and returns
    :math:`\lambda\,\tau^2\,\frac1B\sum_i \mathrm{KL}(\sigma(\hat y_i/\tau)\,\Vert\,\sigma(z_i/\tau))`
    with :math:`\hat y_i` the logits stored for example ``indices[i]`` in epoch
    ``epoch - epochs_ago``: the KL summed over the classes, averaged over the batch and multiplied by
    :math:`\tau^2`, as the official ``SAF_train.py`` (AngusDujw/SAF) does. It stores logits (not
    probabilities) in a ring of ``epochs_ago + 1`` slots, as the official code does; the extra slot
    lets a step read epoch ``e - epochs_ago`` after writing epoch ``e`` (several calls per epoch, a
    SAM replay, all read the same past). The term is 0 outside ``start_epoch <= epoch < end_epoch``.

    An example with no output stored ``epochs_ago`` epochs earlier (a sampler that does not visit
    every example every epoch, e.g. ``DistributedSampler`` giving each rank another shard; a resume
    without this object's state) contributes 0, still counted in the batch mean; such examples are
    counted (:attr:`missing`) and said once, at the next epoch, without a host sync per step. The
    official code reads zeros there (a uniform target). Inside a SAM step the perturbed pass reads
    but does not store (the outputs kept are those at ``w``).

    Defaults (the official repository): ``weight`` :math:`\lambda = 0.3` (README, ``run.sh``; the script's
    argparse default is 0.16), ``temperature`` :math:`\tau = 5`, ``epochs_ago`` :math:`\tilde E = 3`
    (argparse; ``run.sh`` uses 2), ``start_epoch = 6`` (0-based: ``kl_start_epoch = 5`` with the
    official strict ``epoch > kl_start_epoch``).

    Args:
        num_examples: size :math:`N` of the training set; ``indices`` lie in ``[0, N)``.
        weight: :math:`\lambda`.
        temperature: :math:`\tau`.
        epochs_ago: :math:`\tilde E \ge 1`.
        start_epoch: the first epoch (0-based) with the term on; at least ``epochs_ago``.
        end_epoch: the first epoch with the term off again (``None``: never).
        dtype: storage dtype of the past logits (float32 as the official code; float16/bfloat16
            halve the memory at a relative rounding of 2^-11 / 2^-8 of each logit).
        device: where the past logits live (default: the device of the first ``logits``); ``"cpu"``
            keeps a large memory off the accelerator at the cost of a copy of ``B x C`` values per step.
        output_fn: model output -> logits (default: the tensor, ``.logits`` or ``["logits"]``).

    Cost: no extra forward or backward. Memory: ``(epochs_ago + 1) * N * C`` values of ``dtype``
    (ImageNet, float32, :math:`\tilde E = 3`: 20 GB; see ``docs/cheap_sam.md``) plus ``(epochs_ago + 1) * N``
    int64 epoch stamps. One host sync per call: the check that ``indices`` lie in ``[0, N)``.
    Logits of shape ``[batch, classes]`` only (one output per example).
    """

    @rules.checked()
    def __init__(
        self,
        num_examples: int,
        *,
        weight: float = 0.3,
        temperature: float = 5.0,
        epochs_ago: int = 3,
        start_epoch: int = 6,
        end_epoch: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.num_examples = positive_int("num_examples", num_examples)
        self.weight = non_negative("weight", weight)
        self.temperature = positive("temperature", temperature)
        self.epochs_ago = positive_int("epochs_ago", epochs_ago)
        self.start_epoch = non_negative_int("start_epoch", start_epoch)
        if self.start_epoch < self.epochs_ago:
            raise ConfigurationError(
                f"start_epoch ({self.start_epoch}) must be >= epochs_ago ({self.epochs_ago}): before that no output "
                "from epochs_ago epochs earlier exists; raise start_epoch or lower epochs_ago."
            )
        self.end_epoch = None if end_epoch is None else positive_int("end_epoch", end_epoch)
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise ConfigurationError(f"end_epoch ({self.end_epoch}) must be > start_epoch "
                                     f"({self.start_epoch}), or None.")
        if dtype not in _DTYPES:
            raise ConfigurationError(f"dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype!r}.")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.output_fn = output_fn or (lambda output: _logits(output, "SAF"))
        self.memory: torch.Tensor | None = None  # (epochs_ago + 1, N, C) past logits
        self.stamps: torch.Tensor | None = None  # (epochs_ago + 1, N) the epoch each row was written in (-1: never)
        self._missing: torch.Tensor | None = None  # examples read with no past output (a device counter)
        self._missing_said = 0
        self._last_epoch: int | None = None

    @property
    def slots(self) -> int:
        return self.epochs_ago + 1

    @property
    def num_classes(self) -> int | None:
        return None if self.memory is None else self.memory.shape[-1]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the stored outputs and their stamps (0 before the first call)."""
        if self.memory is None or self.stamps is None:
            return 0
        return self.memory.numel() * self.memory.element_size() + self.stamps.numel() * self.stamps.element_size()

    @property
    def missing(self) -> int:
        """Examples read, while the term was on, with no output stored ``epochs_ago`` epochs earlier."""
        return 0 if self._missing is None else int(self._missing)

    def active(self, epoch: int) -> bool:
        """Whether the term is on in ``epoch``."""
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch) and self.weight > 0

    # ------------------------------------------------------------------------------------ the call
    def __call__(self, output: Any, indices: torch.Tensor | Sequence[int], epoch: int) -> torch.Tensor:
        """The weighted trajectory loss for the model ``output`` (logits ``[B, C]``) on the examples
        ``indices`` (their positions in the training set) in ``epoch`` (0-based)."""
        logits = self.output_fn(output)
        epoch = non_negative_int("epoch", epoch)
        idx = self._check(logits, indices)
        self._allocate(logits)
        assert self.memory is not None and self.stamps is not None and self._missing is not None
        self._new_epoch(epoch)
        at = idx.to(self.memory.device)
        term = logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        if self.active(epoch):
            # the KL in float32 at least: fp16/bf16 logits (autocast off) would lose the small differences
            work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
            read = (epoch - self.epochs_ago) % self.slots
            past = self.memory[read].index_select(0, at).to(device=logits.device, dtype=work.dtype)
            found = (self.stamps[read].index_select(0, at) == epoch - self.epochs_ago)
            self._missing += (~found).sum()
            tau = self.temperature
            log_q = torch.log_softmax(work / tau, dim=-1)
            log_p = torch.log_softmax(past / tau, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            kl = torch.where(found.to(logits.device), kl, kl.new_zeros(()))  # no past output: no term
            term = self.weight * tau * tau * kl.mean()
        pass_now = _phase.current_pass()
        needed = self.weight > 0 and epoch + self.epochs_ago >= self.start_epoch and (
            self.end_epoch is None or epoch + self.epochs_ago < self.end_epoch
        )
        if needed and (pass_now is None or pass_now.kind != "perturbed"):
            write = epoch % self.slots
            self.memory[write].index_copy_(0, at, logits.detach().to(device=self.memory.device, dtype=self.dtype))
            self.stamps[write].index_fill_(0, at, epoch)
        return term

    def _check(self, logits: Any, indices: Any) -> torch.Tensor:
        if (not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point()
                or logits.shape[0] == 0):
            got = f"shape {tuple(logits.shape)}, {logits.dtype}" if isinstance(logits,
                                                                               torch.Tensor) else type(logits).__name__
            raise ConfigurationError(
                f"SAF needs floating-point logits of shape [batch, classes] (one output per example), got {got}."
            )
        idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices)
        if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool or idx.shape[0] != logits.shape[0]:
            raise ConfigurationError(
                f"SAF needs one integer index per example (shape [{logits.shape[0]}]), got a {idx.dtype} tensor of "
                f"shape {tuple(idx.shape)}; have the dataset return each example's position in the training set."
            )
        low, high = (int(v) for v in torch.aminmax(idx))  # the one host sync of a call
        if low < 0 or high >= self.num_examples:
            raise ConfigurationError(
                f"SAF got example index {low if low < 0 else high}, outside [0, {self.num_examples}) (num_examples); "
                "pass the examples' positions in the training set and its size."
            )
        num_classes = self.num_classes
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ConfigurationError(
                f"SAF stores outputs of {num_classes} classes but got logits of {logits.shape[1]}; the number of "
                "classes cannot change during training (start a new SAF for a new head)."
            )
        return idx.long()

    def _allocate(self, logits: torch.Tensor) -> None:
        device = self.device or logits.device
        if self.memory is None:
            self.memory = torch.zeros(self.slots, self.num_examples, logits.shape[1], dtype=self.dtype, device=device)
            self.stamps = torch.full((self.slots, self.num_examples), -1, dtype=torch.long, device=device)
            self._missing = torch.zeros((), dtype=torch.long, device=device)
        elif self.memory.device != device:  # loaded from a checkpoint mapped elsewhere
            self.memory = self.memory.to(device)
            self.stamps = self.stamps.to(device)  # type: ignore[union-attr]
            self._missing = self._missing.to(device)  # type: ignore[union-attr]

    def _new_epoch(self, epoch: int) -> None:
        """Once per epoch (one host sync): say that examples had no past output, if any did."""
        if epoch == self._last_epoch:
            return
        self._last_epoch = epoch
        missing = self.missing
        if missing > self._missing_said:
            if self._missing_said == 0:
                warnings.warn(
                    f"SAF: {missing} examples had no output stored {self.epochs_ago} epochs earlier and got no "
                    "trajectory term (a sampler that does not visit every example each epoch, e.g. DistributedSampler "
                    "across ranks, a resume without SAF's state, or an epoch argument that is not the epoch).",
                    UserWarning,
                    stacklevel=3,
                )
            self._missing_said = missing

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The stored outputs, their epoch stamps and the counters (tensors and ints: ``weights_only`` loads)."""
        return {
            "num_examples": self.num_examples,
            "epochs_ago": self.epochs_ago,
            "memory": None if self.memory is None else self.memory.clone(),
            "stamps": None if self.stamps is None else self.stamps.clone(),
            "missing": self.missing,
            "missing_said": self._missing_said,
            "last_epoch": self._last_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; everything is checked before anything changes."""
        keys = {"num_examples", "epochs_ago", "memory", "stamps", "missing", "missing_said", "last_epoch"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ConfigurationError("SAF.load_state_dict needs the dict from SAF.state_dict().")
        if state["num_examples"] != self.num_examples or state["epochs_ago"] != self.epochs_ago:
            raise ConfigurationError(
                f"the checkpoint's SAF has num_examples={state['num_examples']}, epochs_ago={state['epochs_ago']}; "
                f"this one {self.num_examples}, {self.epochs_ago}: build SAF with the checkpoint's settings."
            )
        memory, stamps = state["memory"], state["stamps"]
        if (memory is None) != (stamps is None):
            raise ConfigurationError("SAF.load_state_dict: the checkpoint has outputs without stamps (or stamps "
                                     "without outputs).")
        if memory is not None:
            if (not isinstance(memory, torch.Tensor) or memory.dim() != 3
                    or memory.shape[:2] != (self.slots, self.num_examples)):
                raise ConfigurationError("SAF.load_state_dict: the checkpoint's stored outputs have the wrong shape.")
            if memory.dtype != self.dtype:
                raise ConfigurationError(
                    f"the checkpoint's SAF stores {memory.dtype}, this one {self.dtype}: build SAF with "
                    f"dtype={memory.dtype}."
                )
            if not isinstance(stamps, torch.Tensor) or stamps.shape != (self.slots, self.num_examples):
                raise ConfigurationError("SAF.load_state_dict: the checkpoint's epoch stamps have the wrong shape.")
        missing = non_negative_int("missing", state["missing"])
        said = non_negative_int("missing_said", state["missing_said"])
        last = state["last_epoch"]
        if last is not None:
            last = non_negative_int("last_epoch", last)
        device = self.device or (memory.device if memory is not None else None)
        self.memory = None if memory is None else memory.to(device, copy=True)
        self.stamps = None if stamps is None else stamps.to(device=device, dtype=torch.long, copy=True)
        self._missing = None if memory is None else torch.tensor(missing, dtype=torch.long, device=device)
        self._missing_said, self._last_epoch = said, last
