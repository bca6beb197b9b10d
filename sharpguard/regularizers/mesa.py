"""MESA (Du et al., NeurIPS 2022, "Sharpness-Aware Training for Free", arXiv:2205.14083) as a loss term.

MESA replaces SAM's sharpness term with a *trajectory loss*: the KL divergence between the outputs
of an exponential moving average of the model (the teacher) and the model itself. It costs one extra
forward of the teacher per step and no extra backward, so it works with any optimizer and in any
front end: add the term to the loss you already compute, and let it update the teacher after every
optimizer step (a step post-hook on the optimizer, so a step a GradScaler skips does not move it)::

    mesa = MESA(model, optimizer)                       # or MESA(model) and mesa.attach(optimizer) later
    out = model(x)
    loss = F.cross_entropy(out, y) + mesa(out, x)       # mesa(student_logits, *inputs of the forward)

SAF, the other method of the paper, keeps the outputs of every training example from earlier
epochs instead of a teacher (no extra forward; memory ``(epochs_ago + 1) x N x C``) and needs example
indices from the data pipeline: :class:`~sharpguard.regularizers.saf.SAF`, used the same way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .._validation import in_unit_interval, non_negative, non_negative_int, positive
from .._modules import unwrap_data_parallel
from ..errors import ConfigurationError
from .. import _validation as rules

__all__ = ["MESA"]


def _logits(output: Any, owner: str = "MESA") -> torch.Tensor:
    """The logits of a model output: a tensor, ``output.logits`` (transformers) or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise ConfigurationError(
            f"{owner} cannot find the logits in a {type(output).__name__}; pass output_fn= (model output -> logits)."
        )
    return logits


class MESA:
    r"""MESA's trajectory loss:
    :math:`\lambda\,\tau^2\,\mathrm{KL}\big(\sigma(f_{\bar\theta}(x)/\tau)\,\Vert\,\sigma(f_\theta(x)/\tau)\big)`.

    :math:`\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta` after every optimizer step (the EMA
    teacher: the paper's trajectory loss with the EMA in place of stored past outputs); the KL is summed over
    the classes (last dimension) and averaged over the rest, as in the official ``MESA_train.py``
    (``reinforce=0.3``, ``temperature=5``). The term is 0 before ``start_step`` optimizer steps (the
    paper starts it after a few epochs, when the teacher has something to teach).

    Args:
        model: the model being trained (unwrapped from DDP internally); the teacher is a deep copy in
            eval mode, without gradients.
        optimizer: the optimizer whose steps update the teacher (or call :meth:`attach` later, e.g. in
            Lightning's ``on_fit_start``); any wrapper with a ``.optimizer`` / ``.base_optimizer`` works.
        weight: :math:`\lambda` (``reinforce`` in the official code).
        temperature: :math:`\tau`.
        decay: EMA decay :math:`d` of the teacher.
        start_step: optimizer steps before the term is switched on.
        output_fn: model output -> logits (default: the tensor, ``.logits`` or ``["logits"]``).

    Cost: one teacher forward per call (no backward) and one copy of the model's parameters and buffers.
    """

    @rules.checked()
    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        *,
        weight: float = 0.3,
        temperature: float = 5.0,
        decay: float = 0.9998,
        start_step: int = 0,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"MESA needs the torch.nn.Module being trained, got {type(model).__name__}.")
        self.weight = non_negative("weight", weight)
        self.temperature = positive("temperature", temperature)
        self.decay = in_unit_interval("decay", decay)
        self.start_step = non_negative_int("start_step", start_step)
        self.output_fn = output_fn or _logits
        self.model = unwrap_data_parallel(model)
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.steps = 0
        self._hook: Any = None
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer: Any) -> None:
        """Update the teacher after every ``step()`` of ``optimizer`` (the innermost torch optimizer)."""
        from ..optim.engine import unwrap_optimizer

        if self._hook is not None:
            self._hook.remove()
        self._hook = unwrap_optimizer(optimizer).register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step of the teacher toward the model (parameters; floating buffers too, the rest copied)."""
        student = [p for p in self.model.parameters()]
        teacher = [p for p in self.teacher.parameters()]
        if teacher:
            torch._foreach_lerp_(teacher, student, 1.0 - self.decay)
        for t_buf, s_buf in zip(self.teacher.buffers(), self.model.buffers()):
            if t_buf.is_floating_point():
                t_buf.lerp_(s_buf, 1.0 - self.decay)
            else:
                t_buf.copy_(s_buf)
        self.steps += 1

    def __call__(self, logits: torch.Tensor, *inputs: Any, **kw_inputs: Any) -> torch.Tensor:
        """The weighted KL term for the student ``logits`` of ``model(*inputs, **kw_inputs)``."""
        if self.steps < self.start_step or self.weight == 0:
            return logits.new_zeros(())
        with torch.no_grad():
            target = self.output_fn(self.teacher(*inputs, **kw_inputs)).to(logits.dtype)
        tau = self.temperature
        log_q = torch.log_softmax(logits / tau, dim=-1)
        log_p = torch.log_softmax(target / tau, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        return self.weight * tau * tau * kl

    def state_dict(self) -> dict[str, Any]:
        """The teacher's weights and the step count (save beside the model's checkpoint)."""
        return {"teacher": self.teacher.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"teacher", "steps"}:
            raise ConfigurationError("MESA.load_state_dict needs the dict from MESA.state_dict().")
        steps = non_negative_int("steps", state["steps"])
        self.teacher.load_state_dict(state["teacher"])
        self.steps = steps
