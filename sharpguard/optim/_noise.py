"""Random weight perturbations with a per-row (per output unit) scale, for RWP and Flat-LoRA.

Both methods draw :math:`\\varepsilon_{ij} \\sim \\mathcal N(0, s_i^2)` where the standard deviation of
row ``i`` (one output unit: a filter of a conv, a row of a ``Linear`` weight) is proportional to the
norm of that row (Li et al., TMLR 2024, Sec. 6 "filter-wise" noise; Flat-LoRA, Li et al., ICML 2025,
Sec. 3.3). The whole list of tensors is handled with a few kernels per device/dtype group (one
concatenation, one ``index_add_`` for the row sums, one ``randn``), never a Python loop of tensor
operations over parameters. Randomness comes from a private ``torch.Generator`` reseeded from
``(seed, step)``, so the noise of a step is the same in every front end and the global RNG is left
alone (DESIGN.md promise 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RowLayout", "step_generator", "row_sums", "row_gaussian"]

_GOLDEN = 0x9E3779B97F4A7C15


def step_generator(cache: dict[torch.device, torch.Generator], device: torch.device, seed: int, step: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step)`` (one per device, reused)."""
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device)
    gen.manual_seed((seed * _GOLDEN + step) % (2**63 - 1))
    return gen


class RowLayout:
    """Which row each element of a list of same-device, same-dtype tensors belongs to.

    ``out_dims[k]`` is the dimension of tensor ``k`` that indexes output units (0 for ``Linear`` and
    conv weights, 1 for a transposed ``Conv1D`` weight); ``None`` makes the whole tensor one row
    (biases and other 1-D tensors, as in the RWP code), and ``"element"`` makes every element its
    own row. ``fan_in[r]`` is the number of elements of row ``r``. Built once per parameter list.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], out_dims: Sequence[int | str | None]) -> None:
        ids, fan_in, offset = [], [], 0
        device = tensors[0].device
        for t, dim in zip(tensors, out_dims):
            n = t.numel()
            if dim is None:
                rows = torch.full((n,), offset, dtype=torch.long)
                fan_in.append(n)
                offset += 1
            elif dim == "element":
                rows = torch.arange(offset, offset + n, dtype=torch.long)
                fan_in.extend([1] * n)
                offset += n
            else:
                index = torch.arange(t.shape[dim], dtype=torch.long).view(
                    [-1 if d == dim else 1 for d in range(t.dim())]
                ).expand(t.shape)
                rows = offset + index.reshape(-1)
                fan_in.extend([n // t.shape[dim]] * t.shape[dim])
                offset += t.shape[dim]
            ids.append(rows)
        self.row_ids = torch.cat(ids).to(device)
        self.n_rows = offset
        self.fan_in = torch.tensor(fan_in, dtype=tensors[0].dtype, device=device)
        self.sizes = [t.numel() for t in tensors]
        self.shapes = [t.shape for t in tensors]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the tensors of this layout."""
        return [chunk.view(shape) for chunk, shape in zip(torch.split(flat, self.sizes), self.shapes)]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def row_sums(layout: RowLayout, tensors: Sequence[torch.Tensor], *, square: bool) -> torch.Tensor:
    """Per-row sums of ``tensors`` (of their squares when ``square``), one value per row."""
    flat = _flat(tensors)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # squares of half-precision weights overflow or lose the small rows
    if square:
        flat = flat * flat
    return torch.zeros(layout.n_rows, dtype=flat.dtype, device=flat.device).index_add_(0, layout.row_ids, flat)


def row_gaussian(layout: RowLayout, row_std: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Gaussian noise with standard deviation ``row_std[r]`` on every element of row ``r``."""
    flat = torch.randn(
        int(layout.row_ids.numel()), generator=generator, device=row_std.device, dtype=row_std.dtype
    )
    flat.mul_(row_std[layout.row_ids])
    return layout.split(flat)
