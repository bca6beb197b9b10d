"""Flatness for LoRA fine-tuning: SAM restricted to the adapters, and Flat-LoRA.

:func:`lora_parameters` selects the adapter parameters of a ``peft`` LoRA model, so that any SAM
variant perturbs (and the base optimizer updates) the adapters only::

    opt = sg.SAM(lora_parameters(model), torch.optim.AdamW, rho=0.05, lr=1e-4)

(The Hugging Face Trainer and most Lightning modules already build their optimizer over the
trainable parameters, which for a peft model are the adapters: ``sam={"variant": "sam"}`` is then
SAM on the LoRA space.) :class:`FlatLoRA` perturbs the full merged weight instead, at the cost of
the base optimizer. LoRA layers are recognised by peft's layer interface (``lora_A`` / ``lora_B``,
``get_base_layer()``, ``get_delta_weight(adapter)``), so the core never imports peft.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim import Optimizer

from ..._modules import unwrap_data_parallel
from ..._validation import non_negative_int
from ...errors import ConfigurationError
from ... import _validation as rules
from .. import functional as F
from .._noise import RowLayout, gaussian, step_generator
from ..sam import SAM, _non_negative

__all__ = ["FlatLoRA", "lora_parameters", "lora_layers"]

#: the adapter containers of a peft LoRA layer (LoRA, embedding LoRA, DoRA's magnitude)
_ADAPTER_ATTRS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model`` (modules with ``lora_A``, ``lora_B`` and ``get_delta_weight``)."""
    return [
        m for m in unwrap_data_parallel(model).modules()
        if hasattr(m, "lora_A") and hasattr(m, "lora_B") and callable(getattr(m, "get_delta_weight", None))
        and callable(getattr(m, "get_base_layer", None))
    ]


@rules.checked()
def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA adapter parameters of a peft model (``lora_A``, ``lora_B``, embedding LoRA,
    DoRA magnitudes), in module order: pass them to a SAM variant to perturb the adapters only.

    Raises :class:`~sharpguard.errors.ConfigurationError` when ``model`` has none (not a peft LoRA
    model, or every adapter frozen).
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"lora_parameters needs a torch.nn.Module, got {type(model).__name__}.")
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for layer in lora_layers(model):
        for attr in _ADAPTER_ATTRS:
            container = getattr(layer, attr, None)
            if isinstance(container, nn.Module):
                for p in container.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
    if not out:
        raise ConfigurationError(
            f"{type(model).__name__} has no trainable LoRA adapter parameters; wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) first (pip install \"sharpguard[lora]\")."
        )
    return out


class FlatLoRA(SAM):
    r"""Flat-LoRA (Li et al., ICML 2025, arXiv:2409.14396): random perturbation of the merged weight.

    For every LoRA layer with merged weight :math:`W' = W + s\,BA \in \mathbb R^{m\times n}` (``n``
    inputs), the forward of the step runs at :math:`W + \varepsilon_W + sBA` with
    :math:`\varepsilon_W \sim \mathcal N\big(0, \tfrac{\sigma^2}{n}\,\mathrm{diag}(\lVert W'_{1,:}\rVert^2,
    \dots, \lVert W'_{m,:}\rVert^2)\otimes 1_{1\times n}\big)`
    (the paper's perturbation generation): each output row gets noise
    proportional to its merged norm, divided by :math:`\sqrt n` so that the output's variance does
    not grow with the width. The gradient reaching ``A`` and ``B`` is that of the Bayesian expected
    loss :math:`\mathbb E_\varepsilon L(W + sBA + \varepsilon_W)` (the paper's objective), one sample per step. Other
    trainable parameters of the optimizer (a classifier head, or a model without LoRA layers: full
    fine-tuning) get the same rule on themselves (a 1-D tensor is one row of ``n = numel``).

    Like Momentum-SAM it perturbs in :meth:`prepare`, before the forward: **one** forward/backward
    per step (``cost == (1, 1)``). The frozen base weights are restored by copy after the backward
    (bitwise; the paper regenerates the noise from its seed and subtracts it, which is not exact in
    bf16), so the extra memory is one copy of the perturbed base weights. The paper raises
    ``sigma`` with a cosine schedule during training; set ``opt.sigma`` each step for that.
    ``model=`` is required (the LoRA layers are found in it). ``seed``: the noise of step ``t``
    comes from ``(seed, t)``, the same in every front end.
    """

    variant: ClassVar[str] = "flat_lora"
    aliases: ClassVar[tuple[str, ...]] = ("flatlora",)

    @classmethod
    def _configure(cls, *, sigma: float = 0.05, seed: int = 0) -> dict[str, Any]:  # type: ignore[override]
        sigma = _non_negative("sigma", sigma, "; Flat-LoRA's noise scale is about 0.05")
        return {"sigma": sigma, "seed": non_negative_int("seed", seed), "adaptive": False, "interval": 1}

    def _attach(self, base: Optimizer, model: nn.Module | None, sync_perturbation: bool,
                nonfinite: str = "skip") -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                "FlatLoRA perturbs the merged weights of the model's LoRA layers: pass model= (the peft model, "
                "or the LightningModule that holds it)."
            )
        super()._attach(base, model, sync_perturbation, nonfinite)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._targets_cache: tuple[list[torch.Tensor], list[tuple[nn.Module | None, int | None]], list] | None = None

    @classmethod
    def _cost_of(cls, knobs: dict[str, Any]) -> tuple[float, float]:
        return (1.0, 1.0)

    def needs_second_pass(self) -> bool:
        return False

    def _targets(self) -> tuple[list[torch.Tensor], list[tuple[nn.Module | None, int | None]], list]:
        """(tensors to perturb, (LoRA layer or None, output dim) for each, layouts per device/dtype)."""
        if self._targets_cache is not None:
            return self._targets_cache
        adapter_ids = {id(p) for layer in lora_layers(self.model) for attr in _ADAPTER_ATTRS
                       if isinstance(getattr(layer, attr, None), nn.Module) for p in getattr(layer, attr).parameters()}
        tensors: list[torch.Tensor] = []
        info: list[tuple[nn.Module | None, int | None]] = []
        for layer in lora_layers(self.model):
            trained = any(p.requires_grad for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
                          if isinstance(getattr(layer, attr, None), nn.Module)
                          for p in getattr(layer, attr).parameters())
            weight = getattr(layer.get_base_layer(), "weight", None)
            if not trained or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue
            tensors.append(weight)
            info.append((layer, 1 if getattr(layer, "fan_in_fan_out", False) else 0))
        for p in self._all_params():
            if id(p) not in adapter_ids and p.requires_grad:
                tensors.append(p)
                info.append((None, 0 if p.dim() > 1 else None))
        layouts = []
        for idx in F._group(tensors).values():
            layouts.append((idx, RowLayout([tensors[i] for i in idx], [info[i][1] for i in idx])))
        self._targets_cache = (tensors, info, layouts)
        return self._targets_cache

    @staticmethod
    def _merged(weight: torch.Tensor, layer: nn.Module | None) -> torch.Tensor:
        """``W + sum of the active adapters' s B A`` in the base weight's layout (``W`` when merged)."""
        if layer is None or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
            return weight
        merged = weight
        for name in getattr(layer, "active_adapters", []):
            if name in layer.lora_A or name in getattr(layer, "lora_embedding_A", {}):
                merged = merged + layer.get_delta_weight(name).to(weight.dtype)
        return merged

    @torch.no_grad()
    def prepare(self) -> None:
        """Move to ``W + eps_W`` (merged-norm scaled noise) before the forward; once per step."""
        if self._prepared:
            return
        self._prepared = True
        tensors, info, layouts = self._targets()
        if not tensors or self.sigma == 0:
            return
        noise: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        for idx, rows in layouts:
            merged = [self._merged(tensors[i], info[i][0]) for i in idx]  # one matmul per LoRA layer
            std = rows.row_sums(merged, square=True).div_(rows.fan_in).sqrt_().mul_(self.sigma)
            gen = step_generator(self._generators, tensors[idx[0]].device, self.seed, self._step)
            flat = gaussian(rows, std, gen, tensors[idx[0]].dtype)
            for i, d in zip(idx, rows.split(flat)):
                noise[i] = d
        self._move(tensors, noise, torch.ones((), device=tensors[0].device))

    def perturb(self) -> bool:
        if not self._prepared and not self._perturb_called:
            raise ConfigurationError(
                "FlatLoRA perturbs before the forward: call prepare() before computing the loss "
                "(step(closure) and every framework adapter do it for you)."
            )
        return super().perturb()
