"""SAM on FSDP2 (``torch.distributed.fsdp.fully_shard``) over gloo on two CPU processes (issue 13).

torch 2.13 runs FSDP2 on CPU with gloo: parameters and gradients are DTensors sharded over the ranks,
the backward reduce-scatters the averaged gradient. The step engine with ``sharded=True`` perturbs
each shard by ``rho g_shard / ||g||`` with the norm all-reduced across shards; the trajectory must
equal the unsharded variant on the union of both ranks' batches, for SAM, ASAM, GSAM, LookSAM and GAM
with their own defaults (their inner products all-reduced too; LookSAM's k = 5 makes step 0 a SAM step
and steps 1-2 its reuse steps; GAM takes its three perturbed points through the engine's advance()).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.distributed import process_group, spawn

STEPS, LR = 3, 0.1


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def rank_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _worker(rank, port, world, variants, out):
    from torch.distributed.device_mesh import init_device_mesh

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        for variant in variants:
            _train(rank, mesh, variant, out)


def _train(rank, mesh, variant, out):
    from torch.distributed.fsdp import fully_shard

    from sharpguard.optim import SAMConfig, SAMEngine

    net = make_net()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    engine = SAMEngine(SAMConfig(variant=variant).build(opt, sharded=True), sharded=True)
    assert not engine.per_worker  # the norm needs every shard's reduced gradient
    for step in range(STEPS):
        x, y = rank_batch(step, rank)

        def replay():
            nn.functional.cross_entropy(net(x), y).backward()

        opt.zero_grad()
        engine.record(replay)
        replay()  # the clean pass (FSDP reduce-scatters the averaged gradient)
        engine.finish()
        opt.step()
    full = [p.full_tensor().detach().clone() for p in net.parameters()]
    if rank == 0:
        torch.save(full, f"{out}/{variant}.pt")


def unsharded_reference(variant: str, world: int) -> list[torch.Tensor]:
    from sharpguard.optim import make_sam

    net = make_net()
    opt = make_sam(torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), variant)
    for step in range(STEPS):
        batches = [rank_batch(step, r) for r in range(world)]

        def closure():
            for x, y in batches:  # the mean over ranks of each rank's mean loss, as FSDP averages
                (nn.functional.cross_entropy(net(x), y) / world).backward()

        opt.zero_grad()
        opt.step(closure)
    return [p.detach() for p in net.parameters()]


@pytest.mark.distributed
def test_fsdp2_sam_asam_gsam_looksam_and_gam_equal_the_unsharded_variant(tmp_path):
    variants = ["sam", "asam", "gsam", "looksam", "gam"]
    spawn(_worker, 2, variants, str(tmp_path), nprocs=2)  # one pair of processes for all
    for variant in variants:
        got = torch.load(tmp_path / f"{variant}.pt", weights_only=True)
        want = unsharded_reference(variant, 2)
        assert len(got) == len(want) > 0
        start = [p.detach() for p in make_net().parameters()]
        assert any(not torch.equal(g, s) for g, s in zip(got, start))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=variant)


def test_sharded_training_refuses_the_variants_that_keep_unsharded_state():
    from sharpguard.errors import ConfigurationError
    from sharpguard.optim import SAMConfig

    opt = torch.optim.SGD(make_net().parameters(), lr=LR)
    for variant in ("friendly_sam", "momentum_sam", "esam", "wsam"):
        with pytest.raises(ConfigurationError, match=f"sharded \\(FSDP\\) training supports .* got '{variant}'"):
            SAMConfig(variant=variant).build(opt, sharded=True)


@pytest.mark.parametrize("nonfinite", ["skip", "fallback"])
@pytest.mark.parametrize(("variant", "bad_pass"), [("sam", 2), ("gsam", 2), ("looksam", 2), ("gam", 2), ("gam", 4)])
def test_sharded_sam_policies_on_a_non_finite_gradient_at_w_plus_e(nonfinite, variant, bad_pass):
    """The sharded engine takes SAM's fault policy (one process: the shards are the whole tensors).
    Default skip: the weights and SGD's state stay bitwise, and only the variant's own buffers are
    kept; fallback: the plain step from the clean gradient, with the clean gradient's copy kept.
    GAM's pass 4 is its last point (w_2 + e_2); pass 2 its first, whose fault reaches the update
    through the points' flag."""
    from sharpguard.optim import SAMConfig, SAMEngine

    net, ref = make_net(), make_net()
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    sam = SAMConfig(variant=variant, nonfinite=nonfinite).build(opt, sharded=True)
    engine = SAMEngine(sam, sharded=True)
    x, y = rank_batch(0, 0)
    calls = [0]

    def replay():
        calls[0] += 1
        loss = nn.functional.cross_entropy(net(x), y)
        (loss * float("nan") if calls[0] == bad_pass else loss).backward()

    opt.zero_grad()
    engine.record(replay)
    replay()
    engine.finish()
    opt.step()
    assert calls[0] == (4 if variant == "gam" else 2)  # the clean pass and one per perturbed point
    assert (sam._clean is not None) == (nonfinite == "fallback" or variant != "sam")
    got = [p.detach() for p in net.parameters()]
    if nonfinite == "skip":
        assert all(torch.equal(g, r) for g, r in zip(got, ref.parameters())) and not opt.state
    else:
        plain = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
        nn.functional.cross_entropy(ref(x), y).backward()
        plain.step()
        assert all(torch.equal(g, r) for g, r in zip(got, ref.parameters()))
