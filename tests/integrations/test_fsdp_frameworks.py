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
  it (per-worker SAM, the DDP semantics). What of their FSDP2 path CPU can run without them is run
  at the engine level: accumulation and replays under FSDP2's ``no_sync`` as Accelerate implements it
  (``set_requires_gradient_sync``). The adapters' own FSDP path needs the GPU check.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.dist_launch import check_per_worker_sam, torchrun

REFUSAL = ("ConfigurationError: sharded (FSDP) training supports variant 'sam', 'asam', 'gsam', 'looksam' or 'gam', "
           "got '{}'")


# ------------------------------------------------------------------------------------------ Lightning
@pytest.fixture(scope="module")
def lightning_fsdp2(tmp_path_factory):
    """One torchrun pair for the whole module: SAM, ASAM, then the refused variants."""
    return torchrun("dist_lightning_fsdp.py", tmp_path_factory.mktemp("lightning_fsdp2"), timeout=240)


def unsharded_trajectory(variant: str) -> list[list[torch.Tensor]]:
    """Unsharded SAM on the union of both ranks' micro-batches, as FSDP2 averages them (the mean over
    ranks of each rank's per-micro-batch mean loss, divided by the accumulation): the weights after each
    optimizer step."""
    from tests.helpers.fsdp_case import ACCUM, LR, STEPS, make_net, rank_batch

    from sharpguard.optim import make_sam

    net = make_net()
    opt = make_sam(torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9), variant)
    out = []
    for step in range(STEPS):
        micro = [rank_batch(step * ACCUM + a, r) for r in range(2) for a in range(ACCUM)]

        def closure(micro=micro):
            for x, y in micro:
                (nn.functional.cross_entropy(net(x), y) / (2 * ACCUM)).backward()

        opt.zero_grad()
        opt.step(closure)
        out.append([p.detach().clone() for p in net.parameters()])
    return out


def unsharded_reference(variant: str) -> list[torch.Tensor]:
    """The unsharded SAM reference's final weights."""
    return unsharded_trajectory(variant)[-1]


def per_worker_reference() -> list[torch.Tensor]:
    """The wrong answer for sharded SAM: each rank perturbs along its own gradient (DDP's m-sharpness)."""
    from tests.helpers.fsdp_case import ACCUM, LR, STEPS, make_net, rank_batch

    net = make_net()
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    rho = 0.05
    for step in range(STEPS):
        final = [torch.zeros_like(p) for p in params]
        for r in range(2):
            micro = [rank_batch(step * ACCUM + a, r) for a in range(ACCUM)]

            def loss(micro=micro):
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
    from tests.helpers.fsdp_case import STEPS, VARIANTS, make_net

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


def _dense_lambda_max(weights: list[torch.Tensor], batches: list) -> float:
    """The top eigenvalue of the exact Hessian of the example-mean loss over ``batches`` (float64)."""
    from tests.helpers.fsdp_case import make_net

    net = make_net().double()
    names = [n for n, _ in net.named_parameters()]
    shapes = [w.shape for w in weights]
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])

    def loss(flat):
        chunks = torch.split(flat, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    w = torch.cat([t.double().reshape(-1) for t in weights])
    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, w))[-1])


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_lightning_fsdp2_sharpness_monitor_measures_the_union_and_changes_nothing(lightning_fsdp2):
    """The default SharpnessMonitor beside SAM under ModelParallelStrategy: every check's lambda_max is
    the dense Hessian's of the union of the probes the two ranks captured, at that step's weights (the
    unsharded reference trajectory), the same on both ranks, eos_ratio is SGD's, and the monitored run
    trains to the unmonitored run's weights bitwise."""
    from tests.helpers.fsdp_case import LR, STEPS

    r0, r1 = lightning_fsdp2
    assert len(r0["checks"]) == len(r1["checks"]) == STEPS
    assert r0["checks"] == r1["checks"]
    for got, want in zip(r0["monitored"], r0["sam"]):
        assert torch.equal(got, want)
    probe = r0["probe"] + r1["probe"]
    for check, weights in zip(r0["checks"], unsharded_trajectory("sam")):
        lam = _dense_lambda_max(weights, probe)
        assert check["sharpness/lambda_max"] == pytest.approx(lam, rel=1e-4)
        assert check["sharpness/eos_ratio"] == pytest.approx(lam / ((2 + 2 * 0.9) / LR), rel=1e-4)
        # the check tells the union from one rank's probe
        assert abs(_dense_lambda_max(weights, r0["probe"]) - lam) > 1e-3 * lam


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_lightning_model_parallel_fsdp2_refuses_the_unsharded_variants(lightning_fsdp2):
    from tests.helpers.dist_lightning_fsdp import REFUSED

    for rank in lightning_fsdp2:
        assert set(rank["refused"]) == set(REFUSED)
        for variant, message in rank["refused"].items():
            assert message.startswith(REFUSAL.format(variant)), message
            assert "use DDP for them" in message


def test_lightning_fsdp1_strategy_refuses_a_cpu_accelerator():
    """Lightning's FSDPStrategy (FSDP1) cannot run on CPU: the accelerator connector refuses it."""
    import pytorch_lightning as pl

    with pytest.raises(ValueError,
                       match="The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp", logger=False)


# ------------------------------------------------------------------------------- Accelerate, HF Trainer
def _accelerate_style_worker(rank, port, out):
    """What the Accelerate adapter does under FSDP2, without Accelerate (which will not pick FSDP on
    CPU): accumulation and the replays of all but the last micro-batch under Accelerate's FSDP2
    ``no_sync`` (``set_requires_gradient_sync(False)``, accelerate/accelerator.py ``no_sync``), so the
    gradient is reduce-scattered once per pass, from the unsharded accumulation."""
    import contextlib

    from tests.helpers.fsdp_case import ACCUM, LR, STEPS, VARIANTS, make_net, rank_batch
    from tests.helpers.distributed import process_group
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sharpguard.optim import SAMConfig, SAMEngine

    with process_group(rank, 2, port):
        mesh = init_device_mesh("cpu", (2,))
        for variant in VARIANTS:
            net = make_net()
            for layer in net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)

            @contextlib.contextmanager
            def no_sync(net=net):
                net.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    net.set_requires_gradient_sync(True)

            opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
            engine = SAMEngine(SAMConfig(variant=variant).build(opt, sharded=True), sharded=True)
            for step in range(STEPS):
                for a in range(ACCUM):
                    x, y = rank_batch(step * ACCUM + a, rank)

                    def replay(x=x, y=y, net=net):
                        (nn.functional.cross_entropy(net(x), y) / ACCUM).backward()

                    engine.record(replay)
                    with no_sync() if a < ACCUM - 1 else contextlib.nullcontext():
                        replay()
                engine.finish(no_sync=no_sync)
                opt.step()
                opt.zero_grad()
            full = [p.full_tensor().detach().clone() for p in net.parameters()]
            if rank == 0:
                torch.save(full, f"{out}/{variant}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_fsdp2_no_sync_accumulation_as_accelerate_runs_it_equals_unsharded_sam(tmp_path):
    from tests.helpers.fsdp_case import VARIANTS
    from tests.helpers.distributed import spawn

    spawn(_accelerate_style_worker, str(tmp_path), nprocs=2)
    for variant in VARIANTS:
        got, want = torch.load(tmp_path / f"{variant}.pt", weights_only=True), unsharded_reference(variant)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=variant)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_accelerate_fsdp2_plugin_on_cpu_falls_back_to_ddp_and_sam_follows(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPGUARD_TEST_FRAMEWORK", "accelerate")
    ranks = torchrun("dist_fsdp_cpu_fallback.py", tmp_path)
    for rank in ranks:
        assert rank["distributed_type"] == "MULTI_CPU" and rank["wrapped"] == "DistributedDataParallel"
        assert rank["engine_sharded"] is False and rank["per_worker"] is True
        assert any("FSDP was requested but Accelerate runs" in m for m in rank["said"])  # not silent
    assert len(ranks[0]["seen"]) == 4
    check_per_worker_sam(ranks, micro_per_step=2, lr=0.5, rho=0.2)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_hf_trainer_fsdp2_config_on_cpu_falls_back_to_ddp_and_sam_follows(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPGUARD_TEST_FRAMEWORK", "hf")
    ranks = torchrun("dist_fsdp_cpu_fallback.py", tmp_path)
    for rank in ranks:
        assert rank["distributed_type"] == "MULTI_CPU" and rank["wrapped"] == "DistributedDataParallel"
        assert rank["is_fsdp_enabled"] is False
        assert rank["engine_sharded"] is False and rank["per_worker"] is True
        assert any("FSDP was requested but Accelerate runs" in m for m in rank["said"])
    assert len(ranks[0]["seen"]) == 4
    check_per_worker_sam(ranks, micro_per_step=2, lr=0.5, rho=0.2)
