"""The tiny model, batches and settings shared by tests/integrations/test_fsdp_frameworks.py and the processes it
launches (no framework import: spawned workers import this quickly)."""

import torch
from torch import nn

STEPS, ACCUM, LR, BATCH = 2, 2, 0.1, 8  # two optimizer steps of two micro-batches per rank
VARIANTS = ("sam", "asam")


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def rank_batch(micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` (0 .. STEPS * ACCUM - 1) of rank ``rank``."""
    g = torch.Generator().manual_seed(100 * micro + rank)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
