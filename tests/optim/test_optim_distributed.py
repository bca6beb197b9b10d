"""SAM under DistributedDataParallel (2 CPU processes over gloo) against a single-process reference.

Default: the clean pass runs under ``no_sync()`` so each worker perturbs with its own gradient
(m-sharpness); the perturbed gradients are averaged by DDP. ``sync_perturbation=True``: one
perturbation from the averaged clean gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from tests.helpers.distributed import process_group, spawn
from torch import nn

from sharpguard.optim import SAM

WORLD, STEPS, RHO, LR, MU = 2, 3, 0.2, 0.1, 0.9


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 1, generator=g, dtype=torch.float64)


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, WORLD, port):
        for sync in (False, True):
            train(rank, out_dir, sync)


def train(rank: int, out_dir: str, sync: bool) -> None:
    """STEPS SAM steps on this rank's shards; checks the replicas agree and saves the weights."""
    ddp = nn.parallel.DistributedDataParallel(make_model())
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=MU, model=ddp, sync_perturbation=sync)
    for step in range(STEPS):
        batch = shard(rank, step)

        def closure():
            opt.zero_grad()
            loss = loss_of(ddp, batch)
            loss.backward()
            return loss

        opt.step(closure)
    params = [p.detach().clone() for p in ddp.module.parameters()]
    gathered = [[torch.empty_like(p) for p in params] for _ in range(WORLD)]
    for i, p in enumerate(params):
        dist.all_gather([g[i] for g in gathered], p)
    assert all(torch.equal(a, b) for a, b in zip(gathered[0], gathered[1])), "replicas diverged"
    torch.save(params, os.path.join(out_dir, f"rank{rank}_sync{int(sync)}.pt"))


def grads_at(model: nn.Module, batch) -> list[torch.Tensor]:
    model.zero_grad()
    loss_of(model, batch).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def reference(sync: bool) -> list[torch.Tensor]:
    """Single process: SAM with per-worker (or averaged) perturbation and averaged SAM gradient."""
    model = make_model()
    params = list(model.parameters())
    buf = None
    for step in range(STEPS):
        batches = [shard(r, step) for r in range(WORLD)]
        w = [p.detach().clone() for p in params]
        clean = [grads_at(model, b) for b in batches]
        if sync:
            avg = [sum(gs) / WORLD for gs in zip(*clean)]
            clean = [avg] * WORLD
        sam_grads = []
        for r, b in enumerate(batches):
            g = clean[r]
            n = torch.sqrt(sum((t * t).sum() for t in g))
            with torch.no_grad():
                for p, w0, t in zip(params, w, g):
                    p.copy_(w0 + RHO * t / n)
            sam_grads.append(grads_at(model, b))
            with torch.no_grad():
                for p, w0 in zip(params, w):
                    p.copy_(w0)
        G = [sum(gs) / WORLD for gs in zip(*sam_grads)]
        buf = G if buf is None else [MU * m + t for m, t in zip(buf, G)]
        with torch.no_grad():
            for p, m in zip(params, buf):
                p.sub_(LR * m)
    return [p.detach().clone() for p in params]


@pytest.mark.distributed
def test_ddp_sam_equals_single_process_reference(tmp_path):
    spawn(worker, str(tmp_path), nprocs=WORLD)
    per_worker, synced = reference(sync=False), reference(sync=True)
    assert any(not torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(per_worker, synced))  # modes differ
    for sync, want in ((False, per_worker), (True, synced)):
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"rank{rank}_sync{int(sync)}.pt", weights_only=True)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def variant_worker(rank: int, port: int, out_dir: str, force_per_worker: bool) -> None:
    """GSAM and LookSAM with a DDP model= and default settings: the replicas must stay identical."""
    from sharpguard.optim import GSAM, LookSAM

    with process_group(rank, WORLD, port):
        equal = {}
        for cls, knobs in ((GSAM, {"alpha": 0.5}), (LookSAM, {"k": 2})):
            if force_per_worker:  # the negative control: what an unsynced clean gradient does
                cls = type(cls.__name__, (cls,), {"per_worker_safe": True})
            ddp = nn.parallel.DistributedDataParallel(make_model())
            opt = cls.wrap(torch.optim.SGD(ddp.parameters(), lr=LR), rho=RHO, model=ddp, **knobs)
            for step in range(STEPS):
                batch = shard(rank, step)

                def closure():
                    loss = loss_of(ddp, batch)
                    loss.backward()
                    return loss

                opt.zero_grad()
                opt.step(closure)
            flat = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            equal[cls.variant] = bool(torch.equal(gathered[0], gathered[1]))
        torch.save(equal, os.path.join(out_dir, f"variants_rank{rank}_force{int(force_per_worker)}.pt"))


@pytest.mark.distributed
def test_ddp_variants_that_use_the_clean_gradient_keep_replicas_identical(tmp_path):
    """GSAM's update and LookSAM's g_v mix in the clean gradient: it must be all-reduced (no no_sync)."""
    for force in (False, True):
        spawn(variant_worker, str(tmp_path), force, nprocs=WORLD)
    assert torch.load(tmp_path / "variants_rank0_force0.pt", weights_only=True) == {"gsam": True, "looksam": True}
    # an unsynchronised clean gradient really would make them diverge
    assert torch.load(tmp_path / "variants_rank0_force1.pt", weights_only=True) == {"gsam": False, "looksam": False}
