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


def _trace(check_determinism: bool) -> Callable[[nn.Module, Any], Callable[[], Any]]:
    return lambda model, ids: lambda: hessian_trace(model, ids, _loss, n_hvp=3, micro_batches=2,
                                                    check_determinism=check_determinism)


STEPS = {"train": _train, "sam": _sam, "check, whole batch": _check(1), "check, 2 slices": _check(2),
         "check, finite differences": _check(2, "finite_difference"), "trace, 2 slices": _trace(False)}


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


def test_a_cost_only_run_leaves_out_the_determinism_checks_product_and_the_one_vector_it_holds():
    """A cost-only run reads no value, so it runs no determinism check (the first product applied twice and
    compared). The real default does: one more product, and the first product's result held through it. With
    the basis where the products run (here the CPU) that vector sets a trace check's peak, one model-size
    vector above the simulation; a lambda_max check peaks later (its basis grows), as the cases above show."""
    simulated, live = _simulated_and_live(_trace(True))
    model, _ = _gpt2()
    vector = 4 * sum(p.numel() for p in model.parameters())
    assert live - simulated == pytest.approx(vector, abs=16 * 1024), (live - simulated, vector)


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
        monkeypatch, hvp, micro_batches):
    """The real default's determinism check, run on fake tensors (the operator's own code, its comparison
    left out where nothing can be read): exactly one product's FLOPs more than the cost-only run (the same as a
    run of one more product), and, with the basis in host memory (``basis_device="auto"`` on an accelerator;
    the meta device stands for the host), not a byte more on the device: the first product's result waits in
    host memory. (With the basis on the device, the cases above show a lambda_max check's peak unchanged and the
    test above a Hutch++ check's one model-size vector higher.) Exact products on two slices, so that no
    product reuses a cached graph and each costs the same."""
    from sharpguard.sharpness.operator import HVPOperator

    lambda_max = {n: (lambda model, ids, n=n: hessian_eigenvalues(
        model, ids, _loss, k=1, hvp=hvp, micro_batches=micro_batches, basis_device="meta", fixed_products=n))
        for n in (3, 4)}
    trace = {n: (lambda model, ids, n=n: hessian_trace(
        model, ids, _loss, n_hvp=n, hvp=hvp, micro_batches=micro_batches, basis_device="meta")) for n in (3, 4)}
    cost_only = {name: {n: _simulated(check) for n, check in checks.items()}
                 for name, checks in (("lambda_max", lambda_max), ("trace", trace))}

    init = HVPOperator.__init__

    def with_the_check(self, *args, **kwargs):  # as on real tensors: the check runs (its reads are skipped)
        init(self, *args, **kwargs)
        self._unchecked = True

    monkeypatch.setattr(HVPOperator, "__init__", with_the_check)
    checked = {"lambda_max": _simulated(lambda_max[3]), "trace": _simulated(trace[3])}
    for name, (peak, flops) in checked.items():
        n, n_plus_1 = cost_only[name][3], cost_only[name][4]
        assert flops == n_plus_1[1] > n[1], (name, flops, n, n_plus_1)
        assert peak == n[0] == n_plus_1[0], (name, peak, n, n_plus_1)
