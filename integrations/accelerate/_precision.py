"""What the Accelerate adapters say about the precision Accelerate really runs (shared by the SAM and
monitor helpers, so neither imports the other)."""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["say_fp16_ignored"]


def _logger() -> Any:
    """Accelerate's multi-process logger (``main_process_only=`` per call)."""
    from accelerate.logging import get_logger

    return get_logger(__name__)


_FP16_SAID: weakref.WeakSet[Any] = weakref.WeakSet()


def say_fp16_ignored(accelerator: Any) -> None:
    """Warn once per accelerator when ``mixed_precision="fp16"`` cannot act (a CPU: Accelerate then wraps
    nothing in autocast and builds no GradScaler, so training runs in fp32 without a word)."""
    if getattr(accelerator, "mixed_precision", "no") != "fp16" or getattr(accelerator, "native_amp", True):
        return
    try:
        if accelerator in _FP16_SAID:
            return
        _FP16_SAID.add(accelerator)
    except TypeError:  # not weak-referenceable: say it each time rather than never
        pass
    device = getattr(getattr(accelerator, "device", None), "type", "this device")
    _logger().warning(f"sharpguard: mixed_precision='fp16' cannot act on {device} (no fp16 autocast and no "
                      "GradScaler): training runs in fp32. Use mixed_precision='bf16' on a CPU, or train on a "
                      "GPU for fp16.",
                      main_process_only=True)
