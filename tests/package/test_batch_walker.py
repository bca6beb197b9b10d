"""The one batch walker and the one DDP unwrap, on the batch shapes users pass."""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from sharpguard._batches import apply_to_tensors, split_batch, tensors_in
from sharpguard._modules import is_data_parallel, unwrap_data_parallel

Pair = namedtuple("Pair", "inputs targets")


def test_walker_keeps_structure_and_namedtuples():
    batch = {"a": (torch.ones(2), [torch.zeros(2), "tag"]), "b": Pair(torch.arange(2), torch.arange(2) + 5), "n": 3}
    out = apply_to_tensors(batch, lambda t: t * 2)
    assert isinstance(out["b"], Pair) and out["b"].targets.tolist() == [10, 12]
    assert isinstance(out["a"], tuple) and isinstance(out["a"][1], list) and out["a"][1][1] == "tag"
    assert out["a"][0].tolist() == [2.0, 2.0] and out["n"] == 3
    assert [t.tolist() for t in tensors_in(batch)] == [[1.0, 1.0], [0.0, 0.0], [0, 1], [5, 6]]


def test_split_keeps_namedtuples_through_the_walker():
    parts = split_batch(Pair(torch.arange(4.0), torch.arange(4)), 2)
    assert all(isinstance(p, Pair) for p in parts) and parts[1].targets.tolist() == [2, 3]


def test_unwrap_only_looks_through_ddp():
    model = nn.Linear(2, 2)
    assert unwrap_data_parallel(model) is model and not is_data_parallel(model) and not is_data_parallel(None)


def test_unwrap_looks_through_a_real_ddp_wrapper(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        inner = nn.Linear(2, 2)
        ddp = nn.parallel.DistributedDataParallel(inner)
        assert unwrap_data_parallel(ddp) is inner and is_data_parallel(ddp)
    finally:
        dist.destroy_process_group()
