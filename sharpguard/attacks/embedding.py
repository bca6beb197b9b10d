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

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._batches import default_loss_fn
from ..errors import ConfigurationError
from ._context import attack_context, check_steps
from .losses import wide
from .threat import default_generator

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


def embedding_shape(model: nn.Module, batch: Mapping[str, Any]) -> tuple[tuple[int, int, int], torch.dtype, torch.device]:
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
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return None
    ids = _input_ids(batch)
    if mask.shape != ids.shape:
        raise ConfigurationError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; they must match.")
    return mask


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return t if mask is None else t * mask[..., None].to(t.dtype)


def per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """l2 norm over everything but the batch dimension, shape ``(B, 1, 1)``; half precision is
    widened to float32 first (FreeLB #8: fp16 norms overflow)."""
    return torch.linalg.vector_norm(wide(t.flatten(1)), dim=1).reshape(-1, 1, 1)


def normalize_per_example(g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``g / ||g||_2`` per example (zero stays zero), masked at padding."""
    g = _masked(g, mask)
    return (wide(g) / per_example_norm(g).clamp_min(1e-12)).to(g.dtype)


def project_per_example(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Scale each example's ``delta`` into the l2 ball of radius ``eps`` (``eps <= 0``: no projection)."""
    if eps <= 0:
        return delta
    norm = per_example_norm(delta)
    return delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0).to(delta.dtype)


def normalize_per_token(g: torch.Tensor, mask: torch.Tensor | None = None, tiny: float = 1e-6) -> torch.Tensor:
    """``g / (||g||_inf + tiny)`` per token over the hidden dimension (SMART's per-token normalization)."""
    g = _masked(g, mask)
    return g / (g.abs().amax(dim=-1, keepdim=True) + tiny)


def embedding_pgd(
    model: nn.Module,
    batch: Mapping[str, Any],
    eps: float = 1.0,
    alpha: float = 0.3,
    steps: int = 3,
    *,
    random_start: bool = False,
    loss_fn=None,
    generator: torch.Generator | None = None,
    model_mode: str = "eval",
) -> torch.Tensor:
    """l2 PGD on the input embeddings (per example, masked at padding); returns ``delta`` ``(B, L, D)``.

    Maximises ``loss_fn(model, batch)`` (default ``model(**batch).loss``). Evaluate the model under
    it with ``with EmbeddingPerturbation(model, delta, mask): model(**batch)``. Side-effect free like
    the input-space attacks. Cost: ``steps`` forwards and input-only backwards.
    """
    if not eps >= 0 or not alpha >= 0:
        raise ConfigurationError(f"eps and alpha must be >= 0, got eps={eps}, alpha={alpha}.")
    steps = check_steps(steps)
    loss_fn = loss_fn or default_loss_fn
    shape, dtype, device = embedding_shape(model, batch)
    mask = padding_mask(batch)
    with attack_context(model, model_mode):
        if random_start:
            gen = generator if generator is not None else default_generator(device)
            delta = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            u = torch.rand((shape[0], 1, 1), generator=gen, device=device, dtype=dtype)
            delta = normalize_per_example(delta, mask) * eps * u
        else:
            delta = torch.zeros(shape, device=device, dtype=dtype)
        with EmbeddingPerturbation(model, mask=mask) as hook:
            for _ in range(steps):
                delta = delta.detach().requires_grad_(True)
                hook.delta = delta
                (grad,) = torch.autograd.grad(loss_fn(model, batch), delta)
                delta = project_per_example(delta.detach() + alpha * normalize_per_example(grad, mask), eps)
        return _masked(delta, mask).detach()
