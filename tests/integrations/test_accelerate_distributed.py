"""An Accelerate loop with SharpnessAwareMinimization on two CPU processes over gloo (torchrun)."""

import pytest
import torch

import transformers  # noqa: F401
import accelerate  # noqa: F401

from tests.helpers.dist_launch import check_per_worker_sam, torchrun  # noqa: E402
from tests.helpers.distributed import process_group, spawn  # noqa: E402


@pytest.mark.distributed
def test_accelerate_sam_two_processes_matches_per_worker_sam(tmp_path):
    ranks = torchrun("dist_accelerate_sam.py", tmp_path)
    assert len(ranks[0]["seen"]) == 4
    check_per_worker_sam(ranks, micro_per_step=2, lr=0.5, rho=0.2)


def _sharded_norm_worker(rank, port, world, out):
    from sharpguard.integrations.accelerate import sharded_global_norm

    with process_group(rank, world, port):
        full = [torch.arange(10, dtype=torch.float32) - 3.0, torch.linspace(-1, 2, 7)]
        shards = [t.chunk(world)[rank] for t in full]  # FSDP-style: each rank holds a slice
        norm = sharded_global_norm(shards)
        torch.save(norm, f"{out}/norm{rank}.pt")


@pytest.mark.distributed
def test_sharded_global_norm_reduces_across_shards(tmp_path):
    """The norm FSDP needs for e = rho g / ||g||: the shards' squares summed over ranks."""
    spawn(_sharded_norm_worker, 2, str(tmp_path), nprocs=2)
    full = torch.cat([torch.arange(10, dtype=torch.float64) - 3.0, torch.linspace(-1, 2, 7, dtype=torch.float64)])
    for r in range(2):
        got = torch.load(tmp_path / f"norm{r}.pt", weights_only=True)
        assert float(got) == pytest.approx(float(full.norm()), rel=1e-6)
