"""Cheap adversarial training for images: Free-AT (Shafahi et al., NeurIPS 2019) and GradAlign
(Andriushchenko & Flammarion, NeurIPS 2020), in the method protocol of :mod:`.base`.

Both take ``(inputs, labels)`` batches; ``eps`` and ``alpha`` are in pixel units and inputs normalized
outside the model are declared with ``mean``/``std`` (:class:`~sharpguard.attacks.ThreatModel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._batches import logits_of
from ..attacks import geometry
from ..attacks.embedding import EmbeddingPerturbation, embedding_shape, padding_mask
from ..attacks.gradient import pgd
from ..attacks.threat import ThreatModel
from ..errors import ConfigurationError
from .base import AdversarialMethod, check_positive, image_batch, threat_from
from .. import _validation as rules

__all__ = ["FreeAT", "GradAlign", "grad_align_cosine"]


class FreeAT(AdversarialMethod):
    """Free adversarial training (Shafahi et al., NeurIPS 2019, Algorithm 1), one pass per step.

    Algorithm 1 replays each minibatch ``m`` times; every replay is one forward/backward at ``x + delta``
    whose backward gives both the parameter gradient (an optimizer step) and the input gradient ``g``,
    and the perturbation is carried on: ``delta <- clip_[-eps, eps](delta + eps * sign(g))`` (line 9,
    step ``alpha = eps`` by default), then clipped so that ``x + delta`` stays in ``bounds``.

    In the method protocol the caller owns the backward and the optimizer step, so the replay is up to
    the loop: the adapters (the Lightning :class:`AdversarialTraining` callback, the Hugging Face
    trainer) feed each batch once, and the method then runs the standard *perturbation carried across
    consecutive batches* form (the authors' ``train_free.py`` also carries ``delta`` from one minibatch
    to the next): each call reads the input gradient that the caller's ``backward()`` left on the
    previous call's ``delta``, takes the signed step, and trains on ``x + delta`` for the new batch.
    A plain loop that calls the method ``m`` times on the same batch (with a ``backward()`` and an
    optimizer step after each call) runs Algorithm 1 exactly; train for ``epochs / m`` then, as the paper.
    ``delta`` starts at zero, is cut or zero-padded to the batch size, and a non-finite input gradient
    (an fp16 overflow step) moves it by nothing. Loss ``CE(f(x + delta), y)``. Cost: 1 forward,
    1 backward: the price of plain training.

    Mapping (Hugging Face) batches: the same update on the input embeddings through the forward hook
    of :class:`~sharpguard.attacks.EmbeddingPerturbation` (``eps``/``alpha`` then in embedding units,
    linf per coordinate; ``delta`` of shape ``(batch, seq_len, hidden)`` is cut or zero-padded in the
    first two dimensions, zero at padding), loss ``model(**batch).loss``: how
    ``SharpGuardTrainer(adversarial="free-at")`` drives it.
    """

    name = "free-at"

    @rules.checked()
    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        *,
        norm: str = "linf",
        bounds: tuple[float, float] | None = (0.0, 1.0),
        mean=None,
        std=None,
        threat: ThreatModel | None = None,
    ):
        super().__init__()
        self.threat = threat_from(threat, norm, eps, bounds, mean, std)
        self.threat.require_norm("free-at", ("linf",))
        self.alpha = check_positive("alpha", self.threat.eps if alpha is None else alpha)
        self._delta: torch.Tensor | None = None

    @property
    def attack_cost(self) -> tuple[int, int]:
        return (0, 0)  # the input gradient comes free with the caller's backward

    def reset(self) -> None:
        """Forget the carried perturbation (the next call starts from ``delta = 0``)."""
        self._delta = None

    def _carried_any(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                     resizable: int) -> torch.Tensor:
        """The previous delta moved one signed step along the gradient the caller's backward left on it
        (``delta + alpha sign(g)``, clipped to the linf ball), fitted to ``shape`` (its first ``resizable``
        dimensions may change between batches; anything else starts again from zero)."""
        previous = self._delta
        like = torch.zeros(shape, dtype=dtype, device=device)
        if previous is None or previous.shape[resizable:] != like.shape[resizable:] or previous.device != device:
            return like
        step = previous.detach()
        if previous.grad is not None:
            g = torch.nan_to_num(previous.grad, nan=0.0, posinf=0.0, neginf=0.0)
            step = geometry.project_linf(step + self.alpha * g.sign(), self.threat.eps)
        return _fit(step.to(dtype), shape)

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``delta`` for this batch (pixel space, or embedding space for a mapping batch), a leaf whose
        ``.grad`` the caller's backward fills."""
        if isinstance(batch, Mapping):
            shape, dtype, device = embedding_shape(model, batch)
            delta = geometry.apply_mask(self._carried_any(shape, dtype, device, 2), padding_mask(batch))
            self._delta = delta.detach().requires_grad_(True)
            return self._delta
        x, _ = image_batch(batch)
        u = self.threat.to_pixel(x.detach(), check=self._delta is None)
        delta = self._carried_any(u.shape, u.dtype, u.device, 1)
        delta = self.threat.clamp(u + delta) - u  # x + delta stays in bounds, as in the authors' train_free.py
        self._delta = delta.detach().requires_grad_(True)
        return self._delta

    def objective(self, model: nn.Module, batch: Any, delta: torch.Tensor) -> torch.Tensor:
        if isinstance(batch, Mapping):
            with EmbeddingPerturbation(model, delta, padding_mask(batch)):
                out = model(**batch)
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
            if loss is None:
                raise ConfigurationError("free-at on a mapping batch needs labels in it (the model's .loss).")
            return loss
        x, y = image_batch(batch)
        u = self.threat.to_pixel(x.detach(), check=False)
        return F.cross_entropy(self.checked_logits(model, self.threat.from_pixel(u + delta), y), y)


def _fit(t: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``t`` cut or zero-padded to ``shape`` (which agrees with it beyond the dimensions that differ)."""
    for dim, size in enumerate(shape):
        if t.shape[dim] > size:
            t = t.narrow(dim, 0, size)
        elif t.shape[dim] < size:
            pad_shape = list(t.shape)
            pad_shape[dim] = size - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad_shape)], dim)
    return t


def grad_align_cosine(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Mean over examples of ``cos(g1_i, g2_i)``, over the examples where neither gradient is zero
    (the authors' ``grads_nnz_idx``); 1 when there is none (no penalty)."""
    a, b = g1.flatten(1), g2.flatten(1)
    keep = (a.norm(dim=1) != 0) & (b.norm(dim=1) != 0)
    cos = F.cosine_similarity(a, b, dim=1)
    kept = keep.to(cos.dtype)
    return torch.where(kept.sum() > 0, (cos * kept).sum() / kept.sum().clamp_min(1), torch.ones_like(cos[0]))


class GradAlign(AdversarialMethod):
    """FGSM training with the GradAlign regularizer (Andriushchenko & Flammarion, NeurIPS 2020, eq. 6).

    Loss ``CE(f(x + delta_FGSM), y) + lambda * (1 - E_i cos(grad_x l(x_i, y_i), grad_x l(x_i + eta_i, y_i)))``
    with ``eta ~ U([-eps, eps]^d)`` (clamped into ``bounds``) and the FGSM step from ``x`` of length
    ``alpha`` (the authors' GradAlign setting: zero init, ``alpha = eps``; ``random_start=True`` for
    FGSM-RS's start). The two input gradients are taken with ``create_graph=True``, so the caller's
    ``backward()`` differentiates through them (double backpropagation, the reason the paper puts
    GradAlign at about 3x the cost of FGSM-AT; under fp16 the second-order pass can overflow, use
    bf16 or fp32). Examples with a zero gradient are left out of the mean, as in the authors' code.
    The attack runs in eval mode (``attack_mode``), the two gradient forwards in the model's own modes
    with BatchNorm statistics frozen (only the training forward updates them). ``lam`` (0.2 at
    eps = 8/255 on CIFAR-10 in the paper, larger for larger eps). Cost: 4 forwards, 6 backwards:
    FGSM (1 F, 1 B), the training forward, the two gradient forwards, each with its first-order
    backward, and the caller's backward through the three forwards (two of them double-backward).
    """

    name = "grad-align"

    @rules.checked()
    def __init__(
        self,
        eps: float = 8 / 255,
        lam: float = 0.2,
        alpha: float | None = None,
        *,
        random_start: bool = False,
        norm: str = "linf",
        bounds: tuple[float, float] | None = (0.0, 1.0),
        mean=None,
        std=None,
        threat: ThreatModel | None = None,
        attack_mode: str = "eval",
        seed: int | None = None,
    ):
        super().__init__(seed=seed)
        self.threat = threat_from(threat, norm, eps, bounds, mean, std)
        self.threat.require_norm("grad-align", ("linf",))
        self.lam = check_positive("lam", lam)
        self.alpha = check_positive("alpha", self.threat.eps if alpha is None else alpha)
        self.random_start = bool(random_start)
        if attack_mode not in ("eval", "train", "keep"):
            raise ConfigurationError(f"attack_mode must be 'eval', 'train' or 'keep', got {attack_mode!r}.")
        self.attack_mode = attack_mode
        self._range_checked = False

    @property
    def attack_cost(self) -> tuple[int, int]:
        return (1, 1)

    @property
    def objective_cost(self) -> tuple[int, int]:
        if self.lam == 0:
            return (1, 1)
        return (3, 5)  # training forward + two gradient forwards; 2 first-order + 3 in the caller's backward

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = image_batch(batch)
        x_adv = pgd(
            model, x, y, alpha=self.alpha, steps=1, random_start=self.random_start, threat=self.threat,
            generator=self.generator(x.device), model_mode=self.attack_mode, check_range=not self._range_checked,
        )
        self._range_checked = True
        return x_adv

    def input_gradients(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad_x l(x), grad_x l(x + eta))`` in pixel space, both with graphs (``create_graph=True``)."""
        x, y = image_batch(batch)
        u0 = self.threat.to_pixel(x.detach(), check=False)
        eta = geometry.random_in_ball(u0.shape, "linf", self.threat.eps, self.generator(x.device), device=u0.device,
                                      dtype=u0.dtype)
        grads = []
        for u in (u0, self.threat.clamp(u0 + eta)):
            # Copies of the buffers stand in for them: BatchNorm updates the copies, and the originals stay
            # untouched without an in-place restore (BatchNorm's double backward reads the saved buffers).
            frozen = {name: b.detach().clone() for name, b in model.named_buffers()}
            u = u.detach().requires_grad_(True)
            out = torch.func.functional_call(model, frozen, (self.threat.from_pixel(u),), strict=False)
            loss = F.cross_entropy(logits_of(out), y)
            grads.append(torch.autograd.grad(loss, u, create_graph=True)[0])
        return grads[0], grads[1]

    def objective(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> torch.Tensor:
        _, y = image_batch(batch)
        loss = F.cross_entropy(logits_of(model(x_adv)), y)  # labels were checked by the FGSM attack
        if self.lam == 0:
            return loss
        g1, g2 = self.input_gradients(model, batch)
        return loss + self.lam * (1.0 - grad_align_cosine(g1, g2))
