"""FLOPs of the exact Hessian-vector product against plain double backward (docs/cost_model.md, "Time").

Pearlmutter's product by plain double backward, ``grad(grad(L), w, grad_outputs=v)``, is a forward (1
unit of a dense layer's forward product), the backward that keeps its graph (2) and the second backward
through both graphs (6): 3 forward+backwards of matrix-product FLOPs, 2 on a cached gradient graph.
``HVPOperator``'s exact product must cost no more. The counts are ``FlopCounterMode``'s, exact and
deterministic, on models we did not write (GPT-2 and Llama built from ``transformers`` configs) and a
CNN; the reference forward+backward is the same model's, in the same (eval) mode, under PyTorch's
default attention kernel. ``FlopCounterMode`` has no formula for the fused CPU attention kernel, so the
tests count it as the math kernel's matrix products (checked below against the math kernel's count).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import cross_entropy
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from sharpguard.sharpness import HVPOperator
from sharpguard.sharpness.cost import check_flops_per_hvp, estimate_check_cost

aten = torch.ops.aten

#: The fused CPU attention kernel counted as the math kernel's products: ``Q K^T`` and ``A V`` forward, the
#: four products of their gradients backward (torch's formula for the fused GPU kernels' backward adds a
#: fifth, the flash kernel's recomputation of ``Q K^T``, which the math kernel and the product do not run).
CPU_FLASH_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: 2 * sdpa_flop_count(q, k, v),
}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def gpt2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, attn_implementation="sdpa",
                        loss_type="ForCausalLM", bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(dtype).eval()
    ids = torch.randint(0, 256, (4, 32))
    return model, {"input_ids": ids, "labels": ids}


def llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa", loss_type="ForCausalLM",
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (4, 32))
    return model, {"input_ids": ids, "labels": ids}


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(), nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    ).eval()
    return model, (torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,)))


MODELS = {"gpt2": gpt2, "llama": llama, "cnn": cnn}


def loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    return cross_entropy(model(batch[0]), batch[1])


def forward_backward_flops(model: nn.Module, batch: Any) -> int:
    def run() -> None:
        loss_of(model, batch).backward()

    flops = count_flops(run)
    model.zero_grad(set_to_none=True)
    return flops


def plain_double_backward(model: nn.Module, batch: Any, v: list[torch.Tensor]) -> list[torch.Tensor]:
    """The textbook product (PyHessian's route), under the math kernel (the fused ones have no double backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_of(model, batch), params, create_graph=True)
        return list(torch.autograd.grad(grads, params, grad_outputs=v))


def random_directions(model: nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters() if p.requires_grad]


def exact_product_flops(model: nn.Module, batch: Any, v: torch.Tensor, *, cached: bool) -> list[int]:
    """FLOPs of each product of one operator (the first includes entering it): one uncached, two cached."""
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to finite differences
        op = HVPOperator(model, batch, hvp="auto", check_determinism=False, cache_graph=cached)
        with op:
            for _ in range(2 if cached else 1):
                counts.append(count_flops(lambda: op.matvec(v)))
            assert op.method == ("autograd" if isinstance(batch, tuple) else "autograd+math_sdpa")
    return counts


@pytest.fixture(scope="module", params=list(MODELS))
def counted(request):
    model, batch = MODELS[request.param]()
    fb = forward_backward_flops(model, batch)
    directions = random_directions(model)
    v = torch.cat([d.reshape(-1) for d in directions])
    reference = count_flops(lambda: plain_double_backward(model, batch, directions))
    (exact,) = exact_product_flops(model, batch, v, cached=False)
    first, second = exact_product_flops(model, batch, v, cached=True)
    return {"name": request.param, "model": model, "batch": batch, "fb": fb, "reference": reference,
            "exact": exact, "first": first, "second": second}


def test_reference_double_backward_counts_three_forward_backwards(counted):
    """The floor the product is held to: plain double backward is exactly 3 forward+backwards where every
    matrix product's input needs a gradient (a decoder: its first product reads the trainable embedding);
    a CNN's first convolution takes no input gradient, which both counts lack in different shares."""
    if counted["name"] == "cnn":
        assert 2.9 * counted["fb"] <= counted["reference"] <= 3 * counted["fb"]
    else:
        assert counted["reference"] == 3 * counted["fb"]


def test_exact_product_costs_no_more_than_plain_double_backward(counted):
    """Uncached: a forward, a backward keeping its graph and the second backward, nothing more (a first try
    under the fused attention kernel, which has no double backward, cost about a forward+backward more)."""
    assert counted["exact"] <= counted["reference"]
    assert counted["exact"] <= 3.0 * counted["fb"]


def test_cached_product_costs_one_double_backward(counted):
    """On a cached gradient graph: the first product builds it (3 forward+backwards, as uncached), every
    later one is the second backward alone (2)."""
    assert counted["first"] <= 3.0 * counted["fb"]
    assert counted["second"] <= 2.1 * counted["fb"]
    assert counted["second"] == counted["first"] - counted["fb"]  # the forward and first backward, once


def test_cost_model_predicts_the_counted_product(counted):
    """sharpguard.sharpness.cost's FLOP ratios (what a monitor budgets with) against the counts."""
    fb = counted["fb"]
    assert counted["exact"] / fb == pytest.approx(check_flops_per_hvp("autograd", micro_batches=2), rel=0.10)
    assert counted["second"] / fb == pytest.approx(check_flops_per_hvp("autograd"), rel=0.10)
    # a check of n products on the cached graph: one forward+backward to build it, then n double backwards
    n = 5
    predicted = estimate_check_cost(10**6, step_peak_bytes=1e9, step_seconds=1.0, n_hvp=n,
                                    check_determinism=False).flops_over_step
    assert (counted["first"] + (n - 1) * counted["second"]) / fb == pytest.approx(predicted, rel=0.10)
    # with the determinism check (the default) one of the n is its second product, on a graph built afresh
    predicted = estimate_check_cost(10**6, step_peak_bytes=1e9, step_seconds=1.0, n_hvp=n).flops_over_step
    assert (2 * counted["first"] + (n - 2) * counted["second"]) / fb == pytest.approx(predicted, rel=0.10)


def test_attention_formulas_count_what_the_math_kernel_computes():
    """The fused CPU kernel counted by the GPU kernels' formulas gives the math kernel's count, so the
    reference forward+backward is the same arithmetic as the product's (which runs the math kernel)."""
    model, batch = llama()
    fused = forward_backward_flops(model, batch)
    with sdpa_kernel(SDPBackend.MATH):
        math_kernel = forward_backward_flops(model, batch)
    assert fused == math_kernel
    with FlopCounterMode(display=False) as unmapped:  # torch alone misses the fused CPU kernel's products
        loss_of(model, batch).backward()
    model.zero_grad(set_to_none=True)
    assert unmapped.get_total_flops() < fused


def test_exact_product_value_is_plain_double_backward_in_float64():
    """The cheaper route computes the same product: float64 GPT-2 from its config, against the textbook one."""
    model, batch = gpt2(torch.float64)
    directions = random_directions(model)
    expected = torch.cat([h.reshape(-1) for h in plain_double_backward(model, batch, directions)])
    v = torch.cat([d.reshape(-1) for d in directions])
    with HVPOperator(model, batch, hvp="auto") as op:
        hv = op.matvec(v)
        assert op.method == "autograd+math_sdpa" and op.n_hvp == 2  # the determinism check's product too
    torch.testing.assert_close(hv, expected, rtol=1e-10, atol=1e-12)


def test_requested_autograd_runs_through_scaled_dot_product_attention():
    """``hvp="autograd"`` on a model whose default attention kernel is fused: exact products, no error."""
    model, batch = llama()
    with HVPOperator(model, batch, hvp="autograd", check_determinism=False) as op:
        op.matvec(torch.ones(op.size))
        assert op.method == "autograd+math_sdpa"


def test_models_without_attention_report_plain_autograd():
    """``nn.MultiheadAttention`` calls attention inside its functional form; a CNN calls none."""
    torch.manual_seed(0)

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    batch = (torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))
    with HVPOperator(Attend().eval(), batch) as op:
        op.matvec(torch.ones(op.size))
        assert op.method == "autograd+math_sdpa"
    model, batch = cnn()
    with HVPOperator(model, batch) as op:
        op.matvec(torch.ones(op.size))
        assert op.method == "autograd"


def test_exact_product_floor_holds_at_a_larger_shape_on_fake_tensors():
    """A Llama-shaped block at GPT-2-small width and 1024 tokens, simulated (FakeTensorMode: nothing is
    allocated): the ratio does not depend on the size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharpguard.simulate import fake_tensors

    with fake_tensors():
        config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=12,
                             num_key_value_heads=4, vocab_size=32000, attn_implementation="sdpa",
                             loss_type="ForCausalLM")
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(0, 32000, (2, 1024))
        batch = {"input_ids": ids, "labels": ids}
        fb = forward_backward_flops(model, batch)
        directions = [torch.ones_like(p) for p in model.parameters()]
        reference = count_flops(lambda: plain_double_backward(model, batch, directions))
        (exact,) = exact_product_flops(model, batch, torch.ones(sum(p.numel() for p in model.parameters())),
                                       cached=False)
    assert reference == 3 * fb
    assert exact <= reference


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking:UserWarning")  # torch's MemTracker, re-entered
def test_simulation_counts_the_fused_cpu_attention_kernel():
    """sharpguard.simulate's counter gives the fused CPU kernel torch's fused-kernel formulas: the math
    kernel's products plus the backward's recomputed ``Q K^T`` (2 b h s^2 d per layer), so a decoder's
    training step on CPU tensors no longer misses its attention while a check on the math kernel counts it."""
    from sharpguard.simulate import profile_step

    model, batch = llama()
    step = profile_step(lambda: loss_of(model, batch).backward(), model=model, inputs=[batch]).flops
    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.MATH):
        math_kernel = forward_backward_flops(model, batch)
    b, s = batch["input_ids"].shape
    layers, heads, head_dim = 2, 4, 16
    assert step == math_kernel + layers * 2 * b * heads * s * s * head_dim


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking:UserWarning")  # torch's MemTracker, re-entered
def test_exact_product_peak_is_plain_double_backwards_on_fake_tensors():
    """Memory: the product holds what the textbook double backward holds (MemTracker's live bytes on a
    GPT-2 from its config, simulated), within 1% (3 MiB here: its buffers are freed in another order);
    a first try under the fused kernel kept its graph alive, through the exception's frames, while the
    math kernel's product ran: 37% more here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharpguard.simulate import fake_tensors, profile_step

    with fake_tensors():
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, attn_implementation="sdpa", loss_type="ForCausalLM")).eval()
        ids = torch.randint(0, 50257, (2, 256))
        batch = {"input_ids": ids, "labels": ids}
        directions = [torch.ones_like(p) for p in model.parameters()]

        def textbook() -> torch.Tensor:
            return torch.cat([h.reshape(-1) for h in plain_double_backward(model, batch, directions)])

        def exact() -> torch.Tensor:
            with HVPOperator(model, batch, check_determinism=False, cache_graph=False) as op:
                return op.matvec(torch.ones(op.size))

        peaks = {name: profile_step(fn, model=model, inputs=[batch], count_flops=False).memory.peak_bytes
                 for name, fn in (("textbook", textbook), ("exact", exact))}
    assert peaks["exact"] <= 1.01 * peaks["textbook"]


def test_input_hessian_runs_through_scaled_dot_product_attention():
    """The input-space product (CURE's curvature) on a ViT from its config with SDPA attention, whose fused
    CPU kernel has no double backward, equals the same weights' value with eager attention (float64)."""
    from transformers import ViTConfig, ViTForImageClassification

    from sharpguard.sharpness import input_hessian_eigenvalue

    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                 patch_size=8, num_labels=3)
    sdpa = ViTForImageClassification(ViTConfig(**shape, attn_implementation="sdpa")).double().eval()
    eager = ViTForImageClassification(ViTConfig(**shape, attn_implementation="eager")).double().eval()
    eager.load_state_dict(sdpa.state_dict())
    batch = (torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2]))
    fused = input_hessian_eigenvalue(sdpa, batch, seed=0, tol=1e-10)
    reference = input_hessian_eigenvalue(eager, batch, seed=0, tol=1e-10)
    assert fused.converged == reference.converged == 1.0
    # the same function: equal to Lanczos' tolerance (the two kernels round differently)
    torch.testing.assert_close(torch.tensor(fused.values), torch.tensor(reference.values), rtol=1e-6, atol=0.0)
    assert min(reference.values) > 0
