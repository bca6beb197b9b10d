"""Embedding-space adversarial training for transformers (mapping batches: ``input_ids``,
``attention_mask``, ``labels``): FGM, PGD on embeddings, FreeLB, SMART and R3F.

The perturbation enters through a forward hook on ``model.get_input_embeddings()``
(:class:`~sharpguard.attacks.EmbeddingPerturbation`): no ``inputs_embeds`` plumbing, the embedding
matrix (and an output layer tied to it) is never modified, norms are per example, padding is never
perturbed. Parameter gradients of passes that are needed anyway (the clean pass of FGM/PGD, the K
ascent steps of FreeLB) are taken in the same backward as the perturbation's gradient and handed to
the caller's ``backward()`` through :func:`~sharpguard.adversarial.base.gradient_carrier`, so each
method costs what the paper says and the caller still does exactly one ``backward()``. The ascent
loops are the embedding attack's own (:func:`~sharpguard.attacks.embedding.embedding_ascent`, l2 or
SMART's per-token linf step, the projections of :mod:`sharpguard.attacks.geometry`); each method only
says where its loop starts, what loss it climbs and which steps also return parameter gradients.

Dropout during the ascent steps (``dropout=``): ``"train"`` (the model's modes, fresh masks at each
forward: the FGM/PGD snippets, SMART, R3F), ``"fixed"`` (the same masks at every forward of a step,
by replaying the RNG: FreeLB's ``dp_masks`` without a modified model; FreeLB's default) or ``"eval"``
(ascent forwards in eval mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._batches import logits_of
from .._state import preserve_modes
from ..attacks._context import check_steps
from ..attacks.losses import wide
from ..attacks import geometry
from ..attacks.embedding import EmbeddingPerturbation, embedding_ascent, embedding_shape, padding_mask
from ..errors import ConfigurationError
from .base import AdversarialMethod, DropoutReplay, check_positive, gradient_carrier
from .. import _validation as rules

__all__ = ["FGM", "EmbeddingPGD", "FreeLB", "SMART", "R3F", "symmetric_kl"]

_DROPOUT = ("train", "fixed", "eval")


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q) + KL(Q || P)`` averaged over examples (rows), float32 or wider, gradient through both."""
    c = p_logits.shape[-1]
    log_p = F.log_softmax(wide(p_logits.reshape(-1, c)), dim=-1)
    log_q = F.log_softmax(wide(q_logits.reshape(-1, c)), dim=-1)
    n = log_p.shape[0]
    return (
        F.kl_div(log_q, log_p, reduction="sum", log_target=True) + F.kl_div(log_p, log_q, reduction="sum",
                                                                            log_target=True)
    ) / n


def _kl_from(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref || P)`` summed over rows (reference constant): the label-free ascent objective of SMART."""
    c = logits.shape[-1]
    log_ref = F.log_softmax(wide(reference_logits.reshape(-1, c)), dim=-1)
    return F.kl_div(F.log_softmax(wide(logits.reshape(-1, c)), dim=-1), log_ref, reduction="sum", log_target=True)


def _task_loss(output: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None and batch.get("labels") is not None:
        raise ConfigurationError("the model returned no .loss although the batch has labels; return a loss or "
                                 "drop labels.")
    return loss


class _EmbeddingMethod(AdversarialMethod):
    """Shared plumbing: batch checks, the hook, dropout policy, parameters."""

    default_dropout = "train"

    @rules.checked()
    def __init__(self, *, dropout: str | None = None, seed: int | None = None):
        super().__init__(seed=seed)
        dropout = self.default_dropout if dropout is None else dropout
        if dropout not in _DROPOUT:
            raise ConfigurationError(f"dropout must be one of {_DROPOUT}, got {dropout!r}.")
        self.dropout = dropout

    @staticmethod
    def _batch(batch: Any) -> Mapping[str, Any]:
        if not isinstance(batch, Mapping):
            raise ConfigurationError(
                "embedding methods take a mapping batch (input_ids, attention_mask, labels), got "
                f"{type(batch).__name__}."
            )
        return batch

    @staticmethod
    def _params(model: nn.Module) -> list[torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigurationError("the model has no trainable parameters.")
        return params

    def _ascent_modes(self, model: nn.Module):
        return preserve_modes(model, train=False) if self.dropout == "eval" else contextlib.nullcontext()

    @staticmethod
    def _supervised_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        loss = _task_loss(model(**batch), batch)
        if loss is None:
            raise ConfigurationError("this method needs labels in the batch (the model's .loss).")
        return loss

    @staticmethod
    def _loss_at(model: nn.Module, batch: Mapping[str, Any], hook: EmbeddingPerturbation,
                 replay: DropoutReplay | None = None):
        """``delta -> task loss with delta in the embeddings`` (the embedding attack's ``loss_at``)."""

        def loss_at(delta: torch.Tensor) -> torch.Tensor:
            hook.delta = delta
            if replay is not None:
                replay.replay()
            return _EmbeddingMethod._supervised_loss(model, batch)

        return loss_at

    def _clean_step(self, model, batch, shape, dtype, device, hook, params, *, alpha: float, eps: float | None, mask,
                    replay: DropoutReplay | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ascent step from ``delta = 0``: the clean pass, whose one backward gives the step's
        embedding gradient and the clean parameter gradient (carried to the caller's ``backward()``).
        Returns ``(delta_1, carrier of the clean loss and its parameter gradient)``."""
        carried: list[torch.Tensor] = []

        def carry(t: int, loss: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
            carried.append(gradient_carrier(params, grads, loss))

        zero = torch.zeros(shape, device=device, dtype=dtype)
        delta = embedding_ascent(self._loss_at(model, batch, hook, replay), zero, 1, alpha=alpha, eps=eps, mask=mask,
                                 params=params, on_step=carry)
        return delta, carried[0]

    def _pair_objective(self, model: nn.Module, batch: Any, delta: torch.Tensor) -> torch.Tensor:
        """Clean loss + loss at ``delta``, both with graphs (the SAM second pass of FGM/PGD): 2 F, 1 B."""
        batch = self._batch(batch)
        with EmbeddingPerturbation(model, mask=padding_mask(batch)) as hook:
            clean = self._supervised_loss(model, batch)
            hook.delta = delta
            return clean + self._supervised_loss(model, batch)


class FGM(_EmbeddingMethod):
    """Fast gradient method on the input embeddings (Miyato et al., ICLR 2017, eq. 5 / the FGM snippets).

    ``r = eps g / ||g||_2`` per example, ``g`` the gradient of the clean loss w.r.t. the embeddings;
    loss ``L(x) + L(x + r)`` (its gradient is the sum of the two, as in the snippets). The clean
    pass gives ``g`` and the clean parameter gradient in one backward. Cost: 2 F, 2 B.
    """

    name = "fgm"

    @rules.checked()
    def __init__(self, eps: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.eps = check_positive("eps", eps)

    @property
    def cost(self) -> tuple[int, int]:
        return (2, 2)

    @property
    def objective_cost(self) -> tuple[int, int]:
        return (2, 2)  # clean and perturbed forwards; backward() runs through both

    def loss_and_adversary(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(batch)
        shape, dtype, device = embedding_shape(model, batch)
        mask, params = padding_mask(batch), self._params(model)
        with EmbeddingPerturbation(model, mask=mask) as hook:
            # r = eps g / ||g||: one unprojected embedding-attack step of length eps from 0.
            r, carried = self._clean_step(model, batch, shape, dtype, device, hook, params, alpha=self.eps, eps=None,
                                          mask=mask)
            hook.delta = r
            return carried + self._supervised_loss(model, batch), r

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_adversary(model, batch)[1]

    def objective(self, model: nn.Module, batch: Any, delta: torch.Tensor) -> torch.Tensor:
        return self._pair_objective(model, batch, delta)


class EmbeddingPGD(_EmbeddingMethod):
    """PGD on the input embeddings (Madry et al. 2018 in embedding space, as the NLP "PGD" snippets).

    ``steps`` l2 ascent steps of length ``alpha`` (per example, masked), projected on the ball of
    radius ``eps``; the first uses the clean pass's gradient. Loss ``L(x) + L(x + delta_K)``.
    Cost: ``(steps+1)`` F, ``(steps+1)`` B.
    """

    name = "embedding-pgd"

    @rules.checked()
    def __init__(self, eps: float = 1.0, alpha: float = 0.3, steps: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        self.eps = check_positive("eps", eps)
        self.alpha = check_positive("alpha", alpha)
        self.steps = check_steps(steps)

    @property
    def cost(self) -> tuple[int, int]:
        return (self.steps + 1, self.steps + 1)

    @property
    def objective_cost(self) -> tuple[int, int]:
        return (2, 2)  # clean and perturbed forwards; backward() runs through both

    def loss_and_adversary(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(batch)
        shape, dtype, device = embedding_shape(model, batch)
        mask, params = padding_mask(batch), self._params(model)
        replay = DropoutReplay(device, self.dropout == "fixed")
        with EmbeddingPerturbation(model, mask=mask) as hook:
            radius = self.eps if self.eps > 0 else None  # eps = 0: no projection, as project_per_example
            delta, carried = self._clean_step(model, batch, shape, dtype, device, hook, params, alpha=self.alpha,
                                              eps=radius, mask=mask, replay=replay)
            with self._ascent_modes(model):  # the clean pass above trains: it runs in the model's own modes
                delta = embedding_ascent(self._loss_at(model, batch, hook, replay), delta, self.steps - 1,
                                         alpha=self.alpha, eps=radius, mask=mask)
            hook.delta = delta
            replay.replay()
            return carried + self._supervised_loss(model, batch), delta

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_adversary(model, batch)[1]

    def objective(self, model: nn.Module, batch: Any, delta: torch.Tensor) -> torch.Tensor:
        return self._pair_objective(model, batch, delta)


class FreeLB(_EmbeddingMethod):
    """FreeLB (Zhu et al., ICLR 2020, Algorithm 1): K ascent steps whose parameter gradients are averaged.

    ``delta_0 = U(-1, 1) * mask * init_mag / sqrt(L_i * d)``; at each step ``t`` the loss at
    ``delta_t`` gives both the parameter gradient (accumulated with weight ``1/K``) and
    ``g_t = dL/d delta``; ``delta_{t+1} = delta_t + alpha g_t / ||g_t||`` (per example), projected on
    the l2 ball of radius ``max_norm`` when ``max_norm > 0``. The returned loss (the mean of the K
    losses) carries the accumulated gradient: ``backward()`` yields ``(1/K) sum_t grad_theta L(delta_t)``.
    Same dropout masks at every step (``dropout="fixed"``). Cost: K F, K B.
    """

    name = "freelb"
    default_dropout = "fixed"

    @rules.checked()
    def __init__(self, steps: int = 3, alpha: float = 0.1, init_mag: float = 0.02, max_norm: float = 0.0,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.steps = check_steps(steps)
        self.alpha = check_positive("alpha", alpha)
        self.init_mag = check_positive("init_mag", init_mag)
        self.max_norm = check_positive("max_norm", max_norm)

    @property
    def cost(self) -> tuple[int, int]:
        return (self.steps, self.steps)

    @property
    def objective_cost(self) -> tuple[int, int]:
        return (self.steps, self.steps)

    def _init_delta(self, shape, dtype, device, mask) -> torch.Tensor:
        # Uniform in the linf ball of radius init_mag / sqrt(L_i d) over the real tokens (Algorithm 1, line 4).
        lengths = torch.full((shape[0],), float(shape[1]), device=device) if mask is None else mask.float().sum(1)
        magnitude = (self.init_mag / torch.sqrt(lengths.clamp_min(1.0) * shape[2])).reshape(-1, 1, 1)
        delta = geometry.random_in_ball(shape, "linf", magnitude, self.generator(device), device=device,
                                        dtype=torch.float32, mask=mask)
        return delta.to(dtype)

    def loss_and_adversary(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        batch = self._batch(batch)
        shape, dtype, device = embedding_shape(model, batch)
        mask, params = padding_mask(batch), self._params(model)
        replay = DropoutReplay(device, self.dropout == "fixed")
        delta = self._init_delta(shape, dtype, device, mask)
        accumulated: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        used: list[torch.Tensor] = []

        def accumulate(t: int, loss: torch.Tensor, grads: list[torch.Tensor | None]) -> None:
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            if not accumulated:
                accumulated.extend(grads)
            else:
                torch._foreach_add_(accumulated, grads)

        with EmbeddingPerturbation(model, mask=mask) as hook:
            task_loss = self._loss_at(model, batch, hook, replay)

            def scaled_loss_at(d: torch.Tensor) -> torch.Tensor:
                # (loss / K).backward() at every step: the parameter gradients average over the K steps.
                loss = task_loss(d)
                losses.append(loss.detach())
                used.append(d.detach())
                return loss / self.steps

            # K - 1 embedding-attack steps whose backwards also give parameter gradients, then the
            # K-th forward at the last delta for its parameter gradient only.
            delta = embedding_ascent(scaled_loss_at, delta, self.steps - 1, alpha=self.alpha,
                                     eps=self.max_norm if self.max_norm > 0 else None,  # max_norm = 0: unbounded
                                     mask=mask, params=params, on_step=accumulate)
            last = scaled_loss_at(delta)
            accumulate(self.steps - 1, last, list(torch.autograd.grad(last, params, allow_unused=True)))
        return gradient_carrier(params, accumulated, torch.stack(losses).mean()), used

    def generate(self, model: nn.Module, batch: Any) -> list[torch.Tensor]:
        return self.loss_and_adversary(model, batch)[1]

    def objective(self, model: nn.Module, batch: Any, deltas: list[torch.Tensor]) -> torch.Tensor:
        """The mean loss over the stored perturbations, with graphs (K F, K B): FreeLB at ``w + e`` under SAM."""
        batch = self._batch(batch)
        device = deltas[0].device
        replay = DropoutReplay(device, self.dropout == "fixed")
        losses = []
        with EmbeddingPerturbation(model, mask=padding_mask(batch)) as hook:
            for delta in deltas:
                hook.delta = delta
                replay.replay()
                losses.append(self._supervised_loss(model, batch))
        return torch.stack(losses).mean()


class SMART(_EmbeddingMethod):
    """SMART's smoothness-inducing adversarial regularizer (Jiang et al., ACL 2020, eq. 3 and Algorithm 1).

    Loss ``L_task(x) + weight * ls(f(x), f(x + delta))`` with ``ls`` the symmetric KL (label-free).
    ``delta`` starts at ``N(0, noise^2)`` (masked) and takes ``steps`` ascent steps on
    ``KL(f(x) || f(x + delta))`` (clean prediction held constant):
    ``delta <- Proj_{||.||_inf <= eps per token}(delta + step_size * g / ||g||_inf,token)``.
    Without labels in the batch the loss is the regularizer alone. Cost: ``(steps+2)`` F, ``(steps+2)`` B.
    """

    name = "smart"

    @rules.checked()
    def __init__(self, weight: float = 1.0, eps: float = 1e-5, step_size: float = 1e-3, noise: float = 1e-5,
                 steps: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.weight = check_positive("weight", weight)
        self.eps = check_positive("eps", eps)
        self.step_size = check_positive("step_size", step_size)
        self.noise = check_positive("noise", noise)
        self.steps = check_steps(steps)

    @property
    def cost(self) -> tuple[int, int]:
        return (self.steps + 2, self.steps + 2)

    @property
    def objective_cost(self) -> tuple[int, int]:
        return (2, 2)  # clean and perturbed forwards; backward() runs through both

    def _forward(self, model, batch):
        out = model(**batch)
        return logits_of(out), _task_loss(out, batch)

    def loss_and_adversary(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._batch(batch)
        shape, dtype, device = embedding_shape(model, batch)
        mask = padding_mask(batch)
        replay = DropoutReplay(device, self.dropout == "fixed")
        with EmbeddingPerturbation(model, mask=mask) as hook:
            replay.replay()
            clean, task = self._forward(model, batch)
            reference = clean.detach()
            delta = self.noise * torch.randn(shape, generator=self.generator(device), device=device,
                                             dtype=torch.float32)
            delta = delta.to(dtype)

            def kl_at(d: torch.Tensor) -> torch.Tensor:
                hook.delta = d
                replay.replay()
                return _kl_from(reference, self._forward(model, batch)[0])

            with self._ascent_modes(model):  # the embedding attack, linf per token, on the label-free KL
                delta = embedding_ascent(kl_at, delta, self.steps, alpha=self.step_size, eps=self.eps, norm="linf",
                                         mask=mask)
            hook.delta = delta
            replay.replay()
            adv, _ = self._forward(model, batch)
        regularizer = symmetric_kl(clean, adv)
        loss = self.weight * regularizer if task is None else task + self.weight * regularizer
        return loss, delta

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self.loss_and_adversary(model, batch)[1]

    def objective(self, model: nn.Module, batch: Any, delta: torch.Tensor) -> torch.Tensor:
        batch = self._batch(batch)
        with EmbeddingPerturbation(model, mask=padding_mask(batch)) as hook:
            clean, task = self._forward(model, batch)
            hook.delta = delta
            adv, _ = self._forward(model, batch)
        regularizer = symmetric_kl(clean, adv)
        return self.weight * regularizer if task is None else task + self.weight * regularizer


class R3F(SMART):
    """R3F (Aghajanyan et al., ICLR 2021, eq. 3-4): SMART without the ascent.

    Loss ``L_task(x) + weight * KL_sym(f(x), f(x + z))`` with ``z ~ U(-eps, eps)`` (``noise="uniform"``)
    or ``N(0, eps^2)`` (``"normal"``), masked at padding, both sides differentiable, float32. Cost: 2 F, 2 B
    (one ``backward()`` through both forwards).
    """

    name = "r3f"

    @rules.checked()
    def __init__(self, weight: float = 1.0, eps: float = 1e-5, noise: str = "uniform", **kwargs: Any):
        if noise not in ("uniform", "normal"):
            raise ConfigurationError(f"noise must be 'uniform' or 'normal', got {noise!r}.")
        _EmbeddingMethod.__init__(self, **kwargs)
        self.weight = check_positive("weight", weight)
        self.eps = check_positive("eps", eps)
        self.noise_kind = noise

    @property
    def cost(self) -> tuple[int, int]:
        return (2, 2)

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        batch = self._batch(batch)
        shape, dtype, device = embedding_shape(model, batch)
        gen = self.generator(device)
        if self.noise_kind == "uniform":
            z = geometry.random_in_ball(shape, "linf", self.eps, gen, device=device)
        else:
            z = torch.randn(shape, generator=gen, device=device) * self.eps
        return z.to(dtype)

    def loss_and_adversary(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.generate(model, batch)
        return self.objective(model, batch, z), z
