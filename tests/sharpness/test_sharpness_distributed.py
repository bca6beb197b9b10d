"""Under torch.distributed every rank gets the same measurement: that of the union of the ranks' probes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.helpers.distributed import process_group, spawn
from torch import nn

from sharpguard.sharpness import (
    average_sharpness,
    first_order_sharpness,
    hessian_eigenvalues,
    hessian_trace,
    loss_slice_1d,
    worst_case_sharpness,
)

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _shards() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    # unequal shards and batch sizes, so the batch-size weighting matters
    return [[(x[:8], y[:8]), (x[8:20], y[8:20])], [(x[20:], y[20:])]]


def _measure(model: nn.Module, batches) -> dict[str, float]:
    eig = hessian_eigenvalues(model, batches, k=2, tol=1e-8)
    return {
        "lambda_1": eig.eigenvalues[0],
        "lambda_2": eig.eigenvalues[1],
        "n_hvp": eig.n_hvp,
        "trace": hessian_trace(model, batches, method="hutchinson", n_hvp=8).trace,
        "worst_case": worst_case_sharpness(model, batches, steps=3).value,
        "m_sharpness": worst_case_sharpness(model, batches, steps=2, per_batch=True).value,
        "first_order": first_order_sharpness(model, batches).value,
        "average": average_sharpness(model, batches, n_samples=4).value,
        "slice": float(loss_slice_1d(model, batches, n_points=3).losses.sum()),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, WORLD, port):
        model = nn.parallel.DistributedDataParallel(_model())
        result = _measure(model, _shards()[rank])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        del model


@pytest.mark.distributed
def test_every_rank_gets_the_measurement_of_the_union_of_probe_shards(tmp_path):
    spawn(_worker, str(tmp_path), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # bitwise the same numbers on every rank
    reference = _measure(_model(), [b for shard in _shards() for b in shard])
    for key, value in reference.items():
        assert ranks[0][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
