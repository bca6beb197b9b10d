"""The simulation against reality: a run under FakeTensorMode (sharpguard.simulate.profile_step) predicts the
live bytes the same run allocates on real CPU tensors, counted by an independent meter, the CPU allocator's own
running count reported to torch.profiler (benchmarks/scale.py: live_peak_bytes). Same steps as
``benchmarks/simulate.py --validate`` runs at 1.4M-29M parameters, on a GPT-2 small enough for the suite.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks.scale import live_peak_bytes
from sharpguard.optim import SAM
from sharpguard.sharpness import hessian_eigenvalues, hessian_trace
from sharpguard.simulate import fake_tensors, profile_step


def _gpt2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=32, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    ids = torch.randint(0, 512, (8, 32))
    return GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _train(model: nn.Module, ids: dict[str, torch.Tensor]) -> Callable[[], Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        _loss(model, ids).backward()
        opt.step()
    return step


def _sam(model: nn.Module, ids: dict[str, torch.Tensor]) -> Callable[[], Any]:
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        return loss
    return lambda: opt.step(closure)


def _check(micro_batches: int, hvp: str = "auto") -> Callable[[nn.Module, Any], Callable[[], Any]]:
    return lambda model, ids: lambda: hessian_eigenvalues(model, ids, _loss, k=1, max_iter=4, hvp=hvp,
                                                          micro_batches=micro_batches)


def _trace(check_determinism: bool, micro_batches: int = 2) -> Callable[[nn.Module, Any], Callable[[], Any]]:
    return lambda model, ids: lambda: hessian_trace(model, ids, _loss, n_hvp=3, micro_batches=micro_batches,
                                                    check_determinism=check_determinism)


STEPS = {"train": _train, "sam": _sam, "check, whole batch": _check(1), "check, 2 slices": _check(2),
         "check, finite differences": _check(2, "finite_difference"), "trace, 2 slices": _trace(True),
         "trace, 2 slices, no determinism check": _trace(False), "trace, whole batch": _trace(True, 1)}


def _simulated_and_live(make: Callable[[nn.Module, Any], Callable[[], Any]]) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_tensors():
            model, ids = _gpt2()
            prof = profile_step(make(model, ids), model=model, inputs=list(ids.values()), count_flops=False)
        model, ids = _gpt2()
        return prof.memory.peak_bytes - prof.memory.start_bytes, live_peak_bytes(make(model, ids))


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_simulated_peak_is_the_live_bytes_the_same_run_allocates_on_the_cpu(step):
    simulated, live = _simulated_and_live(STEPS[step])
    assert live > 0
    # the same bytes, but for the odd small buffer a real kernel allocates and its meta kernel does not
    assert simulated == pytest.approx(live, rel=0.02), (simulated, live)


def test_the_determinism_check_holds_one_vector_more_in_the_simulation_as_on_the_cpu():
    """The determinism check (the first product applied twice and compared) runs its second product in a
    cost-only run too; only the comparison, which reads values, is left out. The first product's result is
    held through the second, which with the basis where the products run (here the CPU) sets a trace check's
    peak one model-size vector above the same check without it, in the simulation as in the live bytes."""
    model, _ = _gpt2()
    vector = 4 * sum(p.numel() for p in model.parameters())
    (sim_checked, live_checked), (sim_plain, live_plain) = _simulated_and_live(_trace(True)), _simulated_and_live(
        _trace(False))
    assert sim_checked - sim_plain == pytest.approx(vector, abs=16 * 1024), (sim_checked - sim_plain, vector)
    assert live_checked - live_plain == pytest.approx(vector, abs=16 * 1024), (live_checked - live_plain, vector)


def test_a_dropped_cached_graph_leaves_the_simulated_memory():
    """A cached product's gradient graph (kept with ``retain_graph=True``) dropped before the call ends: the
    tracker sees it go, as the CPU does. torch's module tracker would otherwise hold it through its backward
    hooks to the end of the call (sharpguard.simulate._module_pops_holding_no_graph), and the determinism
    check, which drops the first product's cached graph and builds its own, would count two graphs."""
    from sharpguard.sharpness.operator import HVPOperator

    def product_then_drop(model: nn.Module, ids: Any) -> Callable[[], Any]:
        def fn() -> None:
            with HVPOperator(model, ids, _loss, check_determinism=False, cache_graph=True, micro_batches=1) as op:
                op.matvec(torch.ones(op.size))
                op._graphs.clear()
        return fn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_tensors():
            model, ids = _gpt2()
            prof = profile_step(product_then_drop(model, ids), model=model, inputs=list(ids.values()),
                                count_flops=False)
    assert prof.memory.end_bytes == prof.memory.start_bytes and prof.memory.end_by_category["activations"] == 0


def _simulated(check: Callable[[nn.Module, Any], Any]) -> tuple[int, int]:
    """The device's peak over its bytes before the call, and the FLOPs, of ``check(model, ids)`` on fake tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_tensors():
            model, ids = _gpt2()
            prof = profile_step(lambda: check(model, ids), model=model, inputs=list(ids.values()))
    return prof.memory.peak_bytes - prof.memory.start_bytes, prof.flops


@pytest.mark.parametrize(("hvp", "micro_batches"), [("autograd", 2), ("finite_difference", 1)])
def test_the_determinism_product_costs_one_product_and_no_device_memory_with_the_basis_in_host_memory(
        hvp, micro_batches):
    """A cost-only run at the default (``check_determinism=True``) costs exactly one product's FLOPs more than
    the same run without the check (the same as a run of one more product) and, with the basis in host memory
    (``basis_device="auto"`` on an accelerator; the meta device stands for the host), not a byte more on the
    device: the first product's result waits in host memory. Its ``n_hvp`` counts the extra product. Exact
    products on two slices, so that no product reuses a cached graph and each costs the same."""
    def lambda_max(n: int, checked: bool = False) -> Callable[[nn.Module, Any], Any]:
        return lambda model, ids: hessian_eigenvalues(model, ids, _loss, k=1, hvp=hvp, micro_batches=micro_batches,
                                                      basis_device="meta", fixed_products=n, check_determinism=checked)

    def trace(n: int, checked: bool = False) -> Callable[[nn.Module, Any], Any]:
        return lambda model, ids: hessian_trace(model, ids, _loss, n_hvp=n, hvp=hvp, micro_batches=micro_batches,
                                                basis_device="meta", check_determinism=checked)

    for name, check in (("lambda_max", lambda_max), ("trace", trace)):
        n, n_plus_1, checked = _simulated(check(3)), _simulated(check(4)), _simulated(check(3, True))
        assert checked[1] == n_plus_1[1] > n[1], (name, checked, n, n_plus_1)
        assert checked[0] == n[0] == n_plus_1[0], (name, checked, n, n_plus_1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_tensors():
            model, ids = _gpt2()
            assert lambda_max(3, True)(model, ids).n_hvp == 4 and trace(3, True)(model, ids).n_hvp == 4


def test_a_simulated_robustness_check_is_the_live_bytes_it_allocates_on_the_cpu():
    """The RobustnessMonitor's default check on a ViT from transformers' config: its forwards under autograd
    that no backward consumes (the clean pass, the attacks' last one) leave graphs that torch's module tracker,
    popping modules through hooks that hold autograd nodes, kept counted to the end of the call, 73% above the
    CPU here; with the pops holding no node the simulation is the CPU's live bytes."""
    from tests.monitor.test_fake_robustness import Logits, _batches, _config, _fake_vit

    from sharpguard.monitor import RobustnessMonitor

    size = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
            "image_size": 64, "patch_size": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fake_tensors():
            torch.manual_seed(0)
            model, probe = _fake_vit(**size), _batches(1, rows=32, side=64)
            prof = profile_step(lambda: RobustnessMonitor(probe=probe, alerts=None).measure(model), model=model,
                                inputs=probe, count_flops=False)
        torch.manual_seed(0)
        model, probe = Logits(_config(**size)), _batches(1, rows=32, side=64)
        live = live_peak_bytes(lambda: RobustnessMonitor(probe=probe, alerts=None).measure(model))
    assert prof.memory.peak_bytes - prof.memory.start_bytes == pytest.approx(live, rel=0.02)
