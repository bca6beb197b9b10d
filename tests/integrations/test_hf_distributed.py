"""The Trainer with sam= on two CPU processes over gloo (torchrun): DDP, per-worker SAM."""

import pytest

import transformers  # noqa: F401
import accelerate  # noqa: F401

from tests.helpers.dist_launch import check_per_worker_sam, torchrun  # noqa: E402


@pytest.mark.distributed
def test_trainer_sam_two_processes_matches_per_worker_sam(tmp_path):
    ranks = torchrun("dist_hf_sam.py", tmp_path)
    assert len(ranks[0]["seen"]) == 4  # 2 optimizer steps x 2 micro-batches on each rank
    check_per_worker_sam(ranks, micro_per_step=2, lr=0.5, rho=0.2)
