"""On an accelerator the curvature functions keep the Lanczos basis, and finite-difference products their
entry weights' copy and first gradient, in host memory (``basis_device="auto"``, ``host_device``): the
eigenvalue equals the all-on-device one and the device's peak is lower. Skipped only without CUDA (CI has
no GPU; ``tests/sharpness/test_product_plan.py`` checks the same arithmetic and the simulated memory)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sharpguard.sharpness import hessian_eigenvalues

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_host_resident_vectors_give_the_same_eigenvalue_at_a_lower_device_peak():
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda()
    ids = torch.randint(0, 512, (2, 256), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    peaks, values = {}, {}
    for where in (None, "auto"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        r = hessian_eigenvalues(model, batch, k=1, hvp="finite_difference", basis_device=where, seed=0)
        torch.cuda.synchronize()
        peaks[where], values[where] = torch.cuda.max_memory_allocated(), r.eigenvalues[0]
    assert values["auto"] == pytest.approx(values[None], rel=1e-4)
    assert peaks["auto"] < peaks[None]
