"""Helpers the variant modules share."""

from __future__ import annotations

from typing import Any

import torch

from ..._validation import non_negative_int

__all__: list[str] = []


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, or 0 where ``den`` is zero or not finite (no host sync)."""
    ok = torch.isfinite(den) & (den > 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _seed(value: Any) -> int:
    return non_negative_int("seed", value)
