"""Random weight perturbations with a per-row (per output unit) scale, for RWP and Flat-LoRA.

Both methods draw :math:`\\varepsilon_{ij} \\sim \\mathcal N(0, s_i^2)` where the standard deviation of
row ``i`` (one output unit: a filter of a conv, a row of a ``Linear`` weight) is proportional to the
norm of that row (RWP: Li et al., TMLR 2024, the "filter-wise" noise of its code; Flat-LoRA: Li et
al., ICML 2025, its perturbation generation). The whole list of tensors is handled with a few kernels per device/dtype
group (one concatenation, one ``segment_reduce`` for the row sums, one ``randn``), never a Python loop of tensor
operations over parameters. Randomness comes from a private ``torch.Generator`` reseeded from
``(seed, step)``, so the noise of a step is the same in every front end and the global RNG is left
alone (docs/design.md promise 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RowLayout", "step_generator", "gaussian"]

_GOLDEN = 0x9E3779B97F4A7C15


def step_generator(cache: dict[torch.device, torch.Generator], device: torch.device, seed: int,
                   step: int) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, step)`` (one per device, reused)."""
    gen = cache.get(device)
    if gen is None:
        gen = cache[device] = torch.Generator(device=device)
    gen.manual_seed((seed * _GOLDEN + step) % (2**63 - 1))
    return gen


class RowLayout:
    """The rows (output units) of a list of same-device, same-dtype tensors, laid end to end.

    ``out_dims[k]`` is the dimension of tensor ``k`` that indexes output units: 0 for ``Linear`` and
    conv weights, 1 for a transposed ``Conv1D`` weight of shape ``(in, out)`` (read through its
    transpose, so that every row is contiguous in the flat layout); ``None`` makes the whole tensor one
    row (biases and other 1-D tensors, as in the RWP code), and ``"element"`` makes every element its
    own row. Only the row lengths are kept (one integer per row, not per element).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], out_dims: Sequence[int | str | None]) -> None:
        lengths: list[int] = []
        self.transposed: list[bool] = []
        #: (rows, elements per row) of each tensor: its block of the flat layout as a matrix
        self.blocks: list[tuple[int, int]] = []
        for t, dim in zip(tensors, out_dims):
            n = t.numel()
            if dim is None:
                block = (1, n)
            elif dim == "element":
                block = (n, 1)
            else:
                if dim not in (0, 1) or (dim == 1 and t.dim() != 2):
                    raise ValueError(f"output dimension {dim!r} of a {t.dim()}-D tensor")
                block = (t.shape[dim], n // max(t.shape[dim], 1))
            lengths.extend([block[1]] * block[0])
            self.blocks.append(block)
            self.transposed.append(dim == 1)
        device = tensors[0].device
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)
        #: elements per row, as a float vector (Flat-LoRA's fan-in ``n``)
        self.fan_in = self.lengths.to(torch.float32)
        self.n_rows = len(lengths)
        self.numel = sum(t.numel() for t in tensors)
        self.sizes = [t.numel() for t in tensors]
        self.shapes = [t.shape for t in tensors]

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """All tensors as one vector, rows contiguous (a transposed weight read column by column)."""
        return torch.cat([(t.t() if tr else t).reshape(-1) for t, tr in zip(tensors, self.transposed)])

    def row_sums(self, tensors: Sequence[torch.Tensor], *, square: bool) -> torch.Tensor:
        """Per-row sums of ``tensors`` (of their squares when ``square``), in float32 or wider."""
        flat = self.flat(tensors)  # a fresh tensor (torch.cat): squared in place
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # squares of half-precision weights overflow or lose the small rows
        if square:
            flat.mul_(flat)
        return torch.segment_reduce(flat, "sum", lengths=self.lengths)

    def scale_rows_(self, flat: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
        """Multiply every element of row ``r`` of ``flat`` by ``per_row[r]``, in place (one foreach
        multiply of per-tensor ``(rows, length)`` views by ``(rows, 1)`` slices: no per-element index)."""
        views = [c.view(b) for c, b in zip(torch.split(flat, self.sizes), self.blocks)]
        factors = [f.view(b[0], 1) for f, b in zip(torch.split(per_row, [b[0] for b in self.blocks]), self.blocks)]
        torch._foreach_mul_(views, factors)
        return flat

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the tensors of this layout."""
        out = []
        for chunk, shape, tr in zip(torch.split(flat, self.sizes), self.shapes, self.transposed):
            out.append(chunk.view(shape[1], shape[0]).t() if tr else chunk.view(shape))
        return out


def gaussian(layout: RowLayout, row_std: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Flat Gaussian noise (in ``layout.flat`` order) with standard deviation ``row_std[r]`` on row ``r``."""
    flat = torch.randn(layout.numel, generator=generator, device=row_std.device, dtype=dtype)
    return layout.scale_rows_(flat, row_std)
