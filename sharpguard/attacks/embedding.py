"""Embedding-space perturbation for transformers, through a forward hook on ``get_input_embeddings()``.

The hook adds a perturbation ``delta`` of shape ``(batch, seq_len, hidden)`` to the output of the
input-embedding module: the hook point Hugging Face itself uses for NEFTune
(``transformers/integrations/neftune.py``). So any model with ``get_input_embeddings()`` (or a
plain ``nn.Embedding`` given directly) works without ``inputs_embeds`` plumbing; position and
token-type embeddings are still added inside the model, and the embedding *weights* (tied to the
output layer in GPT-2, T5, BERT-MLM) are never touched, unlike the FGM snippets that edit the matrix.

Norms are per example (l2 over ``seq_len x hidden``) or per token (linf over ``hidden``), and the
perturbation is zero at padding (``attention_mask == 0``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._batches import default_loss_fn
from ..errors import ConfigurationError
from ._context import attack_context, check_steps
from . import geometry
from .threat import default_generator
from .. import _validation as rules

__all__ = [
    "EmbeddingPerturbation",
    "input_embeddings",
    "embedding_shape",
    "padding_mask",
    "per_example_norm",
    "normalize_per_example",
    "project_per_example",
    "normalize_per_token",
    "embedding_pgd",
    "embedding_ascent",
    "embedding_step",
]


def input_embeddings(model: nn.Module) -> nn.Module:
    """The input-embedding module of a Hugging Face model (unwrapping DDP/``.module``), or an ``nn.Embedding``."""
    seen = model
    while True:
        getter = getattr(seen, "get_input_embeddings", None)
        if callable(getter):
            module = getter()
            if isinstance(module, nn.Module):
                return module
        if isinstance(seen, nn.Embedding):
            return seen
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            break
        seen = inner
    raise ConfigurationError(
        f"{type(model).__name__} has no get_input_embeddings(); embedding-space methods need a Hugging Face "
        "model or a model that defines get_input_embeddings() returning its token embedding module."
    )


class EmbeddingPerturbation:
    """Context manager: while active, ``delta`` is added to the input embeddings of each forward of ``model``.

    Only the first call of the embedding module per forward of ``model`` is perturbed (encoder-decoder
    models call a shared embedding again for the decoder). Set ``.delta`` between forwards to change
    the perturbation; ``None`` disables it. ``mask`` (``(batch, seq_len)``, 1 = real token) zeroes it
    at padding.
    """

    @rules.checked()
    def __init__(self, model: nn.Module, delta: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        self.model = model
        self.module = input_embeddings(model)
        self.delta = delta
        self.mask = mask
        self._handles: list[Any] = []
        self._applied = False

    def _reset(self, *_: Any) -> None:
        self._applied = False

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.delta is None or self._applied:
            return None
        self._applied = True
        if output.shape != self.delta.shape:
            raise ConfigurationError(
                f"the embedding perturbation has shape {tuple(self.delta.shape)} but the input embeddings have "
                f"shape {tuple(output.shape)}; build it with embedding_shape(model, batch)."
            )
        delta = self.delta if self.mask is None else self.delta * self.mask[..., None].to(self.delta.dtype)
        return output + delta.to(output.dtype)

    def __enter__(self) -> EmbeddingPerturbation:
        self._applied = False
        self._handles = [
            self.model.register_forward_pre_hook(self._reset),
            self.module.register_forward_hook(self._hook),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _input_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ConfigurationError(
            "embedding-space methods need a mapping batch with input_ids of shape (batch, seq_len)."
        )
    return ids


def embedding_shape(model: nn.Module, batch: Mapping[str, Any]) -> tuple[tuple[int, int, int], torch.dtype,
                                                                         torch.device]:
    """``((batch, seq_len, hidden), dtype, device)`` of the input embeddings for ``batch``."""
    ids = _input_ids(batch)
    module = input_embeddings(model)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigurationError("the input-embedding module has no 2-D weight; cannot infer the hidden size.")
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return (ids.shape[0], ids.shape[1], weight.shape[1]), dtype, ids.device


def padding_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """``attention_mask`` as ``(batch, seq_len)`` (1 = token, 0 = padding), or ``None`` when absent."""
    if not isinstance(batch, Mapping):
        raise ConfigurationError("batch must be a mapping of tensors (input_ids, attention_mask, ...), got "
                                 f"{rules.shown(batch)}.")
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return None
    ids = _input_ids(batch)
    if mask.shape != ids.shape:
        raise ConfigurationError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; "
                                 "they must match.")
    return mask


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return geometry.apply_mask(t, mask)


def per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """l2 norm over everything but the batch dimension, shape ``(B, 1, 1)``; half precision is
    widened to float32 first (FreeLB #8: fp16 norms overflow). :func:`.geometry.per_example_norm`."""
    return geometry.per_example_norm(t)


def normalize_per_example(g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``g / ||g||_2`` per example (zero stays zero), masked at padding. :func:`.geometry.normalize_l2`."""
    return geometry.normalize_l2(g, mask)


@rules.checked()
def project_per_example(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each example's ``delta`` into the l2 ball of radius ``eps`` (``eps <= 0``: no projection,
    FreeLB's ``max_norm=0`` convention). :func:`.geometry.project_l2`."""
    if eps <= 0:
        return delta
    return geometry.project_l2(delta, eps)


normalize_per_token = geometry.normalize_per_token

_EMBEDDING_NORMS = ("l2", "linf")


def embedding_step(delta: torch.Tensor, grad: torch.Tensor, alpha: float, eps: float | None, norm: str = "l2",
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """One projected ascent step in embedding space: ``Proj_eps(delta + alpha * d(grad))``.

    ``norm="l2"``: ``d = g / ||g||_2`` per example (masked), projection onto the l2 ball (``eps=None``:
    no projection). ``norm="linf"``: SMART's per-token step ``d = g / (||g||_inf,token +
    1e-6)`` (Jiang et al., ACL 2020, Alg. 1), projection by clipping to ``[-eps, eps]``.
    """
    if norm == "l2":
        moved = delta + alpha * geometry.normalize_l2(grad, mask)
        return moved if eps is None else geometry.project_l2(moved, eps)
    moved = delta + alpha * geometry.normalize_per_token(grad, mask)
    return moved if eps is None else geometry.project_linf(moved, eps)


def embedding_ascent(
    loss_at: Callable[[torch.Tensor], torch.Tensor],
    delta: torch.Tensor,
    steps: int,
    *,
    alpha: float,
    eps: float | None,
    norm: str = "l2",
    mask: torch.Tensor | None = None,
    params: Sequence[torch.Tensor] = (),
    on_step: Callable[[int, torch.Tensor, list[torch.Tensor | None]], None] | None = None,
) -> torch.Tensor:
    """The embedding attack's loop: ``steps`` times, ``g = d loss_at(delta) / d delta`` and
    ``delta <- embedding_step(delta, g, alpha, eps, norm, mask)``; returns the last ``delta`` (detached).

    ``loss_at(delta)`` runs the forward with ``delta`` in the embeddings (it sets the hook). With
    ``params``, the same backward also returns their gradients, handed with the step index and the
    loss to ``on_step(t, loss, param_grads)``: FGM/PGD take the clean pass's parameter gradient from
    it and FreeLB accumulates its K ascent gradients, without a second backward. Each step costs one
    forward and one backward; ``steps=0`` returns ``delta`` unchanged.
    """
    if norm not in _EMBEDDING_NORMS:
        raise ConfigurationError(f"embedding attacks take norm 'l2' or 'linf', got {norm!r}.")
    params = list(params)
    for t in range(steps):
        delta = delta.detach().requires_grad_(True)
        loss = loss_at(delta)
        grads = torch.autograd.grad(loss, [delta, *params], allow_unused=True)
        g = torch.zeros_like(delta) if grads[0] is None else grads[0]
        if on_step is not None:
            on_step(t, loss, list(grads[1:]))
        delta = embedding_step(delta.detach(), g, alpha, eps, norm, mask)
    return delta.detach()


@rules.checked()
def embedding_pgd(
    model: nn.Module,
    batch: Mapping[str, Any],
    eps: float = 1.0,
    alpha: float = 0.3,
    steps: int = 3,
    *,
    norm: str = "l2",
    random_start: bool = False,
    loss_fn=None,
    generator: torch.Generator | None = None,
    model_mode: str = "eval",
) -> torch.Tensor:
    """PGD on the input embeddings (per example, masked at padding); returns ``delta`` ``(B, L, D)``.

    ``norm="l2"`` (default): l2 ball of radius ``eps`` per example, normalized-gradient steps;
    ``"linf"``: clipping to ``[-eps, eps]`` with SMART's per-token steps (:func:`embedding_step`).
    ``random_start=True`` draws uniformly from the ball over the real tokens
    (:func:`.geometry.random_in_ball`), from ``generator``.

    Maximises ``loss_fn(model, batch)`` (default ``model(**batch).loss``). Evaluate the model under
    it with ``with EmbeddingPerturbation(model, delta, mask): model(**batch)``. Side-effect free like
    the input-space attacks. Cost: ``steps`` forwards and input-only backwards.
    """
    if not eps >= 0 or not alpha >= 0:
        raise ConfigurationError(f"eps and alpha must be >= 0, got eps={eps}, alpha={alpha}.")
    if norm not in _EMBEDDING_NORMS:
        raise ConfigurationError(f"embedding_pgd takes norm 'l2' or 'linf', got {norm!r}.")
    steps = check_steps(steps)
    loss_fn = loss_fn or default_loss_fn
    shape, dtype, device = embedding_shape(model, batch)
    mask = padding_mask(batch)
    with attack_context(model, model_mode):
        if random_start:
            gen = generator if generator is not None else default_generator(device)
            delta = geometry.random_in_ball(shape, norm, eps, gen, device=device, dtype=dtype, mask=mask)
        else:
            delta = torch.zeros(shape, device=device, dtype=dtype)
        with EmbeddingPerturbation(model, mask=mask) as hook:

            def loss_at(d: torch.Tensor) -> torch.Tensor:
                hook.delta = d
                return loss_fn(model, batch)

            delta = embedding_ascent(loss_at, delta, steps, alpha=alpha, eps=eps, norm=norm, mask=mask)
        return _masked(delta, mask).detach()
