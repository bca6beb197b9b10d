"""Curvature checks on fake tensors (``FakeTensorMode``; FSDP2 ``fully_shard`` over a fake process group of
world 8): a cost-only run performs the products and vector work of a real one, reads no value back and
says so (NaN values, ``cost_only``, the exact number of products). The FLOPs it counts are those of the
same check on real tensors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode, is_fake
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from sharpguard.errors import ConfigurationError
from sharpguard.monitor import SharpnessMonitor
from sharpguard.sharpness import (
    auto_micro_batches,
    directional_curvature,
    eos_ratio,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from sharpguard.sharpness import (average_sharpness, first_order_sharpness, keskar_sharpness, loss_slice_1d,
                                  worst_case_sharpness)

VOCAB = 128


def _gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _batch(rows: int = 4, cols: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_every_hvp_measure_is_a_cost_only_run_on_fake_tensors():
    with FakeTensorMode():
        model = _gpt2()
        batch = {k: torch.randint(0, VOCAB, v.shape) for k, v in _batch().items()}
        assert all(is_fake(p) for p in model.parameters())
        eig = hessian_eigenvalues(model, batch)
        # nothing can converge when nothing is read: the stated default count, enough to fill the basis
        # (max_basis 5) and restart it once, and, as in a real run, the determinism check's second product
        assert eig.cost_only and eig.settings["fixed_products"] == 6 and eig.n_hvp == 6 + 1
        assert eig.basis_vectors == 6 and eig.n_restarts == 1
        assert math.isnan(eig.lambda_max) and math.isnan(eig.residuals[0]) and not eig.converged
        assert hessian_eigenvalues(model, batch, fixed_products=3).n_hvp == 3 + 1
        assert hessian_eigenvalues(model, batch, fixed_products=3, check_determinism=False).n_hvp == 3
        both = hessian_eigenvalues(model, batch, which="both", fixed_products=4)
        assert both.n_hvp == 4 + 1 and len(both.eigenvalues) == 2
        tr = hessian_trace(model, batch, n_hvp=6)
        assert tr.n_hvp == 6 + 1 and tr.settings["cost_only"] and math.isnan(tr.trace)
        assert hessian_trace(model, batch, method="hutchinson", n_hvp=2).n_hvp == 2 + 1
        slq = spectral_density(model, batch, n_iter=3, n_v=2)
        assert slq.n_hvp == 6 + 1 and slq.settings["cost_only"]
        d = directional_curvature(model, batch)
        assert d.n_hvp == 1 + 1 and math.isnan(d.value)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        eos = eos_ratio(model, batch, opt, fixed_products=4)
        assert eos.n_hvp == 4 + 1 and math.isnan(eos.ratio) and eos.settings["cost_only"]
        # bad input is still refused with its sentence
        with pytest.raises(ConfigurationError, match="fixed_products"):
            hessian_eigenvalues(model, batch, fixed_products=0)


def test_fixed_products_on_real_tensors_runs_exactly_that_many():
    torch.manual_seed(0)
    model, batch = _gpt2(), _batch()
    free = hessian_eigenvalues(model, batch, tol=1e-2, micro_batches=1)
    fixed = hessian_eigenvalues(model, batch, tol=1e-2, micro_batches=1, fixed_products=free.n_hvp + 3,
                                check_determinism=False)
    assert fixed.n_hvp == free.n_hvp + 3 and not fixed.cost_only  # past convergence: no early stop
    assert fixed.converged and fixed.lambda_max == pytest.approx(free.lambda_max, rel=1e-2)


def test_a_cost_only_check_counts_the_flops_of_the_real_check():
    """The same model, real and as a fake copy: one check with the same fixed number of products counts
    the same FLOPs (what benchmarks/simulate.py reports), and the automatic micro-batches agree."""
    torch.manual_seed(0)
    real, batch = _gpt2(), _batch(rows=8)
    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake = copy.deepcopy(real)
    fake_batch = {k: mode.from_tensor(v) for k, v in batch.items()}
    kwargs = {"fixed_products": 7, "check_determinism": False}
    real_choice = auto_micro_batches(real, [batch])
    with mode:
        assert auto_micro_batches(fake, [fake_batch]) == real_choice
        fake_flops = _flops(lambda: hessian_eigenvalues(fake, fake_batch, **kwargs))
        fake_trace = _flops(lambda: hessian_trace(fake, fake_batch, n_hvp=6, check_determinism=False))
    real_flops = _flops(lambda: hessian_eigenvalues(real, batch, **kwargs))
    real_trace = _flops(lambda: hessian_trace(real, batch, n_hvp=6, check_determinism=False))
    assert fake_flops == real_flops > 0, (fake_flops, real_flops)
    assert fake_trace == real_trace > 0
    # an uncached product (2 micro-batches here) is a forward, a backward with its graph and the double
    # backward: about three forward+backward passes (docs/cost_model.md), the restart's few basis mixes aside
    step = _flops(lambda: real(**batch).loss.backward())
    assert 2 * 7 * step < real_flops < 3.1 * 7 * step


@pytest.fixture
def fake_world():
    """A fake process group of world 8 (no processes): FSDP2's collectives become no-ops on fake tensors."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=0, world_size=8, store=FakeStore())
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (8,))  # built before entering fake mode
    finally:
        dist.destroy_process_group()


def test_checks_run_on_fsdp2_over_a_fake_world_of_8(fake_world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with FakeTensorMode():
        model = _gpt2()
        for block in model.transformer.h:
            fully_shard(block, mesh=fake_world)
        fully_shard(model, mesh=fake_world)
        batch = {k: torch.randint(0, VOCAB, v.shape) for k, v in _batch().items()}
        eig = hessian_eigenvalues(model, batch)
        assert eig.cost_only and eig.settings["sharded"] and eig.n_hvp == 6 + 1  # + the determinism product
        assert eig.hvp_method == "finite_difference"  # FSDP's gradients, differenced
        assert eig.settings["probe_examples"] == 8 * 4  # every rank taken to hold this rank's examples
        local = sum(p.to_local().numel() for p in model.parameters())
        assert eig.settings["n_params"] == 8 * local
        tr = hessian_trace(model, batch, n_hvp=3)
        assert tr.n_hvp == 3 + 1 and tr.settings["sharded"]
        density = spectral_density(model, batch, n_iter=4, n_v=2)
        assert density.n_hvp == 8 + 1 and density.hvp_method == "finite_difference"
        assert all(math.isnan(t) for run in density.nodes for t in run.tolist())
        # the weight-perturbation measures: FSDP's gradients, a fixed number of passes, nothing read
        for result in (worst_case_sharpness(model, batch, steps=2), average_sharpness(model, batch, n_samples=2),
                       first_order_sharpness(model, batch), keskar_sharpness(model, batch, max_iter=2)):
            assert math.isnan(result.value) and result.settings["cost_only"] and result.settings["sharded"]
        along = directional_curvature(model, batch)
        assert math.isnan(along.value) and along.settings["sharded"] and along.n_hvp == 1 + 1
        line = loss_slice_1d(model, batch, n_points=3)
        assert line.settings["sharded"] and all(math.isnan(v) for v in line.losses.tolist())
        watched = SharpnessMonitor(("worst_case", "average"), probe=[batch], alerts=None).measure(model)
        assert math.isnan(watched["sharpness/worst_case"]) and math.isnan(watched["sharpness/average"])
        # the parameters are sharded again after the checks (the auto choice's forward gathers the root's)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        mon = SharpnessMonitor(("lambda_max", "trace"), probe=[batch], measure_kwargs={"trace": {"n_hvp": 3}})
        metrics, settings = mon.measure(model, with_settings=True)
        assert math.isnan(metrics["sharpness/lambda_max"]) and metrics["monitor/n_hvp"] == 6 + 1 + 3 + 1
        assert settings["sharpness/lambda_max"]["cost_only"]


def test_the_default_sharpness_monitor_check_runs_on_fake_tensors():
    with FakeTensorMode():
        model = _gpt2()
        batch = {k: torch.randint(0, VOCAB, v.shape) for k, v in _batch().items()}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon = SharpnessMonitor(probe=[batch])  # lambda_max and eos_ratio
        metrics, settings = mon.measure(model, opt, with_settings=True)
    assert math.isnan(metrics["sharpness/lambda_max"]) and math.isnan(metrics["sharpness/eos_ratio"])
    assert settings["sharpness/lambda_max"]["cost_only"] and settings["sharpness/eos_ratio"]["cost_only"]
    # two cost-only Lanczos runs of max_basis + 1 products, each with its determinism check's second product
    assert metrics["monitor/n_hvp"] == 6 + 1 + 6 + 1
