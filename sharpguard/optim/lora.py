"""Re-exports of :func:`lora_parameters`, :func:`lora_layers` and :class:`FlatLoRA`, now in
:mod:`sharpguard.optim.variants.flat_lora`."""

from .variants.flat_lora import _ADAPTER_ATTRS, FlatLoRA, lora_layers, lora_parameters  # noqa: F401

__all__ = ["FlatLoRA", "lora_parameters", "lora_layers"]
