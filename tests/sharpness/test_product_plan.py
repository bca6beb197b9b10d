"""``micro_batches="auto"`` chooses the product method as well as the micro-batches (sharpness/micro.py,
``plan_products``): an exact product's double backward runs under the math attention kernel, which keeps
each head's ``T x T`` attention weights, so at long sequences with one example (nothing to split) its graph
passes a training step's memory many times over; finite-difference products then take its place. Checked
on a Hugging Face Llama built from its config: the choice, the eigenvalue against the exact products, the
count of saved bytes against a count that keeps the tensors, the monitor's one warning, and on fake
tensors (``FakeTensorMode``, MemTracker) the check's peak against the training step's."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharpguard.monitor import SharpnessMonitor
from sharpguard.simulate import RESIDENT_CATEGORIES, fake_process_group, fake_tensors, parameter_bytes, profile_step
from sharpguard.sharpness import hessian_eigenvalues, hessian_trace, plan_products
from sharpguard.sharpness.cost import FLATTEN_VECTORS, _device_vectors, estimate_check_memory
from sharpguard.sharpness.micro import _math_attention_kernel, _saved_bytes

VOCAB = 64


def _llama(seq: int, hidden: int = 32, layers: int = 2, heads: int = 4) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                         max_position_embeddings=seq, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _batch(rows: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_long_sequence_takes_finite_differences_with_the_exact_eigenvalue():
    torch.manual_seed(0)
    model, batch = _llama(1024), _batch(1, 1024)
    plan = plan_products(model, [batch])
    assert (plan.hvp, plan.micro_batches) == ("finite_difference", 1)
    assert "math attention kernel" in plan.reason and "finite differences" in plan.reason
    chosen = hessian_eigenvalues(model, batch, k=1, seed=0)
    exact = hessian_eigenvalues(model, batch, k=1, seed=0, hvp="autograd", micro_batches=1)
    assert chosen.hvp_method == "finite_difference" and exact.hvp_method == "autograd+math_sdpa"
    assert chosen.eigenvalues[0] == pytest.approx(exact.eigenvalues[0], rel=1e-4)
    # asked for exact products, the plan keeps them (it only sizes the micro-batches)
    assert plan_products(model, [batch], hvp="autograd").hvp == "autograd"
    assert hessian_eigenvalues(model, batch, k=1, seed=0, hvp="autograd", max_iter=3).hvp_method == "autograd+math_sdpa"


def test_short_sequences_keep_exact_products():
    torch.manual_seed(0)
    model = _llama(16)
    plan = plan_products(model, [_batch(8, 16)])
    assert (plan.hvp, plan.reason) == ("autograd", "")
    assert hessian_eigenvalues(model, _batch(8, 16), k=1, seed=0, max_iter=3).hvp_method.startswith("autograd")


def test_saved_bytes_count_what_a_kept_graph_holds():
    """The counter hands autograd nothing to keep; its count equals one that keeps every saved tensor."""
    torch.manual_seed(0)
    model, batch = _llama(256), _batch(2, 256)

    def kept() -> int:
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key not in weights:
                seen[key] = t.untyped_storage().nbytes()
            return t

        model.eval()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        del loss
        model.train()
        return sum(seen.values())

    fused = _saved_bytes(model, batch, None)
    assert fused == kept()
    with _math_attention_kernel()():
        math = _saved_bytes(model, batch, None)
        assert math == kept()
    # the math kernel keeps (about) one T x T float32 matrix per head and layer more
    assert math - fused == pytest.approx(2 * 2 * 4 * 256 * 256 * 4, rel=0.1)


def test_monitor_says_once_that_it_takes_finite_differences():
    torch.manual_seed(0)
    model, batch = _llama(1024), _batch(1, 1024)
    monitor = SharpnessMonitor(measures=("lambda_max",), probe=[batch], alerts=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, settings = monitor.measure(model, with_settings=True)
        monitor.measure(model)
    said = [w for w in caught if "finite-difference products" in str(w.message)]
    assert len(said) == 1
    assert metrics["sharpness/lambda_max"] > 0
    assert settings["sharpness/lambda_max"]["hvp"] == "finite_difference"


def _fake_long_sequence_peaks(layers: int = 4, world: int | None = None,
                              **checks) -> tuple[int, dict[str, int], int, int]:
    """On fake tensors, a Llama of ``layers`` blocks at 2048 tokens (one sequence), each block and the model
    under ``fully_shard`` on a fake process group of ``world`` ranks where given: the training step's peak,
    each ``checks[name](model, batch)``'s peak, the parameters' bytes (per rank) and the bytes the step's peak
    holds besides its transient (weights, optimizer state, FSDP2's gathered weights and buffers)."""
    with contextlib.ExitStack() as stack:
        mesh = None if world is None else stack.enter_context(fake_process_group(world))
        stack.enter_context(fake_tensors())
        model = _llama(2048, hidden=512, layers=layers, heads=8)
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        batch = _batch(1, 2048)
        opt = torch.optim.AdamW(model.parameters())

        def train() -> None:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def peak(fn) -> int:
            return profile_step(fn, model=model, optimizers=[opt], inputs=[batch]).memory.peak_bytes

        train()
        step = profile_step(train, model=model, optimizers=[opt], inputs=[batch]).memory
        resident = sum(step.peak_by_category.get(c, 0) for c in RESIDENT_CATEGORIES)
        peaks = {name: peak(lambda check=check: check(model, batch)) for name, check in checks.items()}
        return step.peak_bytes, peaks, parameter_bytes(model), resident


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking")
def test_fake_long_sequence_check_holds_no_double_backward_graph():
    """On fake tensors (nothing allocated), a Llama of 4 blocks at 2048 tokens: the check's peak passes the
    training step's by no more than its Krylov vectors (the basis shares the CPU's memory), where exact
    products under the math kernel held about four times the step."""
    step, peaks, param_bytes, _ = _fake_long_sequence_peaks(
        check=lambda model, batch: hessian_eigenvalues(model, batch, k=1),
        exact=lambda model, batch: hessian_eigenvalues(model, batch, k=1, hvp="autograd", max_iter=2),
    )
    # the live model's finite-difference check: the flatten's gradients and flat copy and the check's own vectors
    # on the device (basis rows, entry weights, the slices' running sum); the step's own gradients are a margin
    vectors = FLATTEN_VECTORS + _device_vectors("finite_difference", "lambda_max", several_slices=True)
    assert peaks["check"] - step <= vectors * param_bytes
    assert peaks["exact"] > 3 * step


def test_host_resident_finite_differences_give_the_device_product_bitwise():
    """The central difference with the entry weights and the first gradient in host memory (``host_device``,
    what the curvature functions pass on an accelerator) does the same arithmetic piece by piece: on one
    device the two paths agree bitwise, and the weights come back exactly."""
    from sharpguard.sharpness import HVPOperator

    torch.manual_seed(0)
    model, batch = _llama(64), _batch(2, 64)
    before = [p.detach().clone() for p in model.parameters()]
    with HVPOperator(model, batch, hvp="finite_difference", check_determinism=False) as op:
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(1))
        h = 1e-3
        on_device = op._central_difference(op.w0, v, h)
        host = op._central_difference_host(op.w0, v, h)
        assert torch.equal(on_device, host)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert op._at_w0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking")
def test_fake_check_with_host_basis_stays_within_the_training_step():
    """With every Krylov vector in host memory (the meta device stands for it on fake tensors: the basis, the
    Lanczos vector the product reads, the entry weights, both gradients, the buffers' backup), a long-sequence
    check's peak is the training step's: the device holds only the probe's forward and backward, where all of
    them on the device held seven parameter-sized vectors more."""
    step, peaks, param_bytes, _ = _fake_long_sequence_peaks(
        check=lambda model, batch: hessian_eigenvalues(model, batch, k=1, basis_device="meta"),
        trace=lambda model, batch: hessian_trace(model, batch, n_hvp=9, basis_device="meta"),
        on_device=lambda model, batch: hessian_eigenvalues(model, batch, k=1),
    )
    assert peaks["check"] <= step
    assert peaks["trace"] <= step
    assert peaks["on_device"] - step >= 6 * param_bytes


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking")
def test_fake_fsdp2_checks_with_host_basis_stay_within_the_training_step():
    """Under FSDP2 (world 8, a fake process group), the function's check and the monitor's, each with its
    vectors in host memory, peak at the training step's per rank. The monitor plans as the function does: no
    exact-product measurement on a sharded model (its math-kernel forward had been the check's own peak).
    Within a kibibyte: the check's scalars (the world-scaled probe loss beside the loss, 4 bytes) and the
    monitor's guard's copy of the model's buffers (Llama's rotary frequencies, 256 bytes); CUDA's allocator
    rounds every block up to 512 bytes."""
    made = {}  # the plan, and the monitor on the fake batch (made in the first, unread, measured call)
    step, peaks, _, _ = _fake_long_sequence_peaks(
        layers=2, world=8,
        plan=lambda model, batch: made.update(
            plan=plan_products(model, [batch]),
            monitor=SharpnessMonitor(measures=("lambda_max",), probe=[batch], alerts=None,
                                     measure_kwargs={"lambda_max": {"basis_device": "meta"}})),
        check=lambda model, batch: hessian_eigenvalues(model, batch, k=1, basis_device="meta"),
        watched=lambda model, batch: made["monitor"].measure(model),
    )
    check, watched, plan = peaks["check"], peaks["watched"], made["plan"]
    assert check <= step + 1024
    assert watched <= step + 1024
    assert (plan.hvp, plan.reason) == ("finite_difference", "")


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking")
@pytest.mark.parametrize("world", [None, 8])
def test_live_cost_model_predicts_the_simulated_check_peaks(world):
    """``estimate_check_memory`` from the training step alone (its peak, its resident bytes, the parameters'
    bytes) predicts each finite-difference check's simulated peak within 2%, on one device and per FSDP2 rank:
    the Lanczos check and the monitor's with the basis on the device and in host memory, and Hutch++."""
    step, peaks, param_bytes, resident = _fake_long_sequence_peaks(
        layers=2, world=world,
        lambda_max=lambda model, batch: hessian_eigenvalues(model, batch, k=1, hvp="finite_difference"),
        lambda_max_host=lambda model, batch: hessian_eigenvalues(model, batch, k=1, hvp="finite_difference",
                                                                 basis_device="meta"),
        trace=lambda model, batch: hessian_trace(model, batch, n_hvp=9, hvp="finite_difference"),
        trace_host=lambda model, batch: hessian_trace(model, batch, n_hvp=9, hvp="finite_difference",
                                                      basis_device="meta"),
    )
    for name, peak in peaks.items():
        predicted = estimate_check_memory(
            step_peak_bytes=step, resident_bytes=resident, vector_bytes=param_bytes, measure=name.split("_host")[0],
            basis_on_device=not name.endswith("_host"), n_hvp=9,
        )
        assert abs(predicted.peak_bytes / peak - 1) <= 0.02, (name, predicted, peak)
