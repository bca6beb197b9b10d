"""SAM through the frameworks' own FSDP paths on two CPU processes over gloo (issue 13).

What each framework does with FSDP on a CPU (installed versions: accelerate 1.15, transformers 5.24,
Lightning 2.6; docs/gpu.md, "FSDP"):

* Lightning ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``) runs on CPU with
  gloo: SAM and ASAM must equal unsharded SAM on the union of both ranks' batches, and the variants
  the sharded path cannot run are refused through ``trainer.fit`` with the core's message.
* Lightning ``FSDPStrategy`` (FSDP1) refuses a CPU accelerator before anything runs.
* Accelerate (``FullyShardedDataParallelPlugin(fsdp_version=2)``) and the HF Trainer
  (``fsdp_config={"fsdp_version": 2}``) silently fall back to DDP on CPU: Accelerate only selects
  ``DistributedType.FSDP`` for GPU-like devices. The tests pin that fallback and that SAM then follows
  it (per-worker SAM, the DDP semantics); the sharded path of those adapters needs the GPU check.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _dist_launch import check_per_worker_sam, torchrun

REFUSAL = "ConfigurationError: sharded (FSDP) training supports variant 'sam' or 'asam', got '{}'"


# ------------------------------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning_fsdp2(tmp_path_factory):
    """One torchrun pair for the whole module: SAM, ASAM, then the refused variants."""
    return torchrun("_dist_lightning_fsdp.py", tmp_path_factory.mktemp("lightning_fsdp2"), timeout=240)


def unsharded_reference(variant: str) -> list[torch.Tensor]:
    """Unsharded SAM on the union of both ranks' micro-batches, as FSDP2 averages them (the mean over
    ranks of each rank's per-micro-batch mean loss, divided by the accumulation)."""
    from _dist_lightning_fsdp import ACCUM, LR, STEPS, make_net, rank_batch

    from sharpguard.optim import make_sam

    net = make_net()
    opt = make_sam(torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), variant)
    for step in range(STEPS):
        micro = [rank_batch(step * ACCUM + a, r) for r in range(2) for a in range(ACCUM)]

        def closure():
            for x, y in micro:
                (nn.functional.cross_entropy(net(x), y) / (2 * ACCUM)).backward()

        opt.zero_grad()
        opt.step(closure)
    return [p.detach() for p in net.parameters()]


def per_worker_reference() -> list[torch.Tensor]:
    """The wrong answer for sharded SAM: each rank perturbs along its own gradient (DDP's m-sharpness)."""
    from _dist_lightning_fsdp import ACCUM, LR, STEPS, make_net, rank_batch

    net = make_net()
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    rho = 0.05
    for step in range(STEPS):
        final = [torch.zeros_like(p) for p in params]
        for r in range(2):
            micro = [rank_batch(step * ACCUM + a, r) for a in range(ACCUM)]

            def loss():
                return sum(nn.functional.cross_entropy(net(x), y) for x, y in micro) / ACCUM

            g = torch.autograd.grad(loss(), params)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi, alpha=rho / float(norm))
            g2 = torch.autograd.grad(loss(), params)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(gi, alpha=rho / float(norm))
            for acc, gi in zip(final, g2):
                acc += gi / 2
        for p, gi in zip(params, final):
            p.grad = gi
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_lightning_model_parallel_fsdp2_sam_and_asam_equal_unsharded_sam(lightning_fsdp2):
    from _dist_lightning_fsdp import STEPS, VARIANTS, make_net

    start = [p.detach() for p in make_net().parameters()]
    for rank in lightning_fsdp2:
        assert rank["strategy"] == "ModelParallelStrategy"
        assert rank["sharded"]  # the 2-D weights really are split over the ranks
        assert rank["engine_sharded"]  # the callback saw FSDP2 through a strategy not named FSDP
        for variant in VARIANTS:
            assert rank[f"n_steps_{variant}"] == STEPS
    for variant in VARIANTS:
        got, want = lightning_fsdp2[0][variant], unsharded_reference(variant)
        assert len(got) == len(want) == len(start) > 0
        assert any(not torch.equal(g, s) for g, s in zip(got, start))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=variant)
    # the check can tell sharded SAM from per-worker SAM (a norm left local to each rank)
    wrong = per_worker_reference()
    assert any(not torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(lightning_fsdp2[0]["sam"], wrong))


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_lightning_model_parallel_fsdp2_refuses_the_unsharded_variants(lightning_fsdp2):
    from _dist_lightning_fsdp import REFUSED

    for rank in lightning_fsdp2:
        assert set(rank["refused"]) == set(REFUSED)
        for variant, message in rank["refused"].items():
            assert message.startswith(REFUSAL.format(variant)), message
            assert "use DDP for them" in message


def test_lightning_fsdp1_strategy_refuses_a_cpu_accelerator():
    """Lightning's FSDPStrategy (FSDP1) cannot run on CPU: the accelerator connector refuses it."""
    import pytorch_lightning as pl

    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp", logger=False)


# ------------------------------------------------------------------------------- Accelerate, HF Trainer
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_accelerate_fsdp2_plugin_on_cpu_falls_back_to_ddp_and_sam_follows(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPGUARD_TEST_FRAMEWORK", "accelerate")
    ranks = torchrun("_dist_fsdp_cpu_fallback.py", tmp_path)
    for rank in ranks:
        assert rank["distributed_type"] == "MULTI_CPU" and rank["wrapped"] == "DistributedDataParallel"
        assert rank["engine_sharded"] is False and rank["per_worker"] is True
    assert len(ranks[0]["seen"]) == 4
    check_per_worker_sam(ranks, micro_per_step=2, lr=0.5, rho=0.2)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_hf_trainer_fsdp2_config_on_cpu_falls_back_to_ddp_and_sam_follows(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPGUARD_TEST_FRAMEWORK", "hf")
    ranks = torchrun("_dist_fsdp_cpu_fallback.py", tmp_path)
    for rank in ranks:
        assert rank["distributed_type"] == "MULTI_CPU" and rank["wrapped"] == "DistributedDataParallel"
        assert rank["is_fsdp_enabled"] is False
        assert rank["engine_sharded"] is False and rank["per_worker"] is True
    assert len(ranks[0]["seen"]) == 4
    check_per_worker_sam(ranks, micro_per_step=2, lr=0.5, rho=0.2)
