"""SAM on LoRA adapters and Flat-LoRA on a tiny GPT-2 (built from a config) wrapped by peft LoRA:
the adapter selection, Flat-LoRA's noise in the merged weight space of GPT-2's transposed Conv1D
weights, and the same weights from Flat-LoRA in plain PyTorch, the Hugging Face Trainer and
Lightning, with one forward per step."""

from __future__ import annotations

import math

import pytest
import torch

from sharpguard.errors import ConfigurationError
from sharpguard.optim import SAM, FlatLoRA, lora_parameters, make_sam
from tests.helpers import front_ends

VOCAB, SEQ, MB, STEPS, LR = 32, 8, 4, 3, 0.05


def tiny_gpt2_lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    model = get_peft_model(
        GPT2LMHeadModel(config),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    with torch.no_grad():  # B = 0 at init would make the merged weight the base weight
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    return model


class Counting(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable by one layer."""

    def __init__(self, n: int = STEPS * MB) -> None:
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(1))
        self.ids = (start + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def batches() -> list[dict[str, torch.Tensor]]:
    data = Counting()
    return [{"input_ids": data.ids[i : i + MB], "labels": data.ids[i : i + MB]} for i in range(0, len(data), MB)]


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def adapter_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in lora_parameters(model)])


def count_forwards(model) -> list[int]:
    calls = [0]
    model.get_base_model().transformer.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


# ------------------------------------------------------------------------------------------- helpers
def test_lora_parameters_are_exactly_the_adapters():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_gpt2_lora()
    chosen = lora_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert chosen and all("lora_" in names[id(p)] for p in chosen)
    assert {id(p) for p in chosen} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ConfigurationError, match="peft.get_peft_model"):
        lora_parameters(GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2)))


def test_sam_restricted_to_the_adapters_leaves_the_base_weights_bitwise():
    model = tiny_gpt2_lora()
    frozen, before = base_weights(model), adapter_vector(model)
    opt = SAM(lora_parameters(model), torch.optim.SGD, rho=0.05, lr=LR, model=model)
    for batch in batches():
        opt.step(lambda b=batch: (opt.zero_grad(), model(**b).loss.backward())[0])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(adapter_vector(model), before)


def test_flat_lora_noise_follows_the_output_units_of_a_transposed_conv1d():
    """GPT-2's Conv1D keeps its weight as (in, out): Flat-LoRA's rows are the output columns there.
    Eight output columns are made 20x larger: noise scaled along the wrong axis would show."""
    sigma = 0.05
    model = tiny_gpt2_lora()
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        weight[:, :8] *= 20.0
    w0 = weight.detach().clone()
    merged = w0 + layer.get_delta_weight("default")
    opt = FlatLoRA(lora_parameters(model), torch.optim.SGD, sigma=sigma, model=model, lr=LR)
    zs = []
    for step in range(4):
        opt._step = step  # four independent draws at the same weights
        opt.prepare()
        eps = weight.detach() - w0
        zs.append(eps * merged.shape[0] ** 0.5 / (sigma * merged.norm(dim=0, keepdim=True)))
        opt.cancel()
        assert torch.equal(weight, w0)  # restored by copy
    z = torch.cat([t.reshape(-1) for t in zs])
    z = z.detach()
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05  # 3072 draws of N(0, 1)


# ------------------------------------------------------------------------------------- front ends
def run_plain(model) -> None:
    opt = make_sam(torch.optim.SGD(lora_parameters(model), lr=LR), "flat_lora", model=model)
    front_ends.run_plain(opt, model, batches(), 1, loss_fn=lambda m, b, epoch: m(**b).loss)


def run_hf(model, tmp_path) -> None:
    # the model's own mean loss, as in the other front ends (not the Trainer's sum / num_items_in_batch,
    # which counts the unshifted labels of a causal LM)
    front_ends.run_hf(model, torch.optim.SGD(lora_parameters(model), lr=LR), Counting(), tmp_path,
                      {"variant": "flat_lora"}, micro_batch=MB, lr=LR, max_steps=STEPS, model_accepts_loss_kwargs=False)


def run_lightning(model) -> None:
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    loader = torch.utils.data.DataLoader(Counting(), batch_size=MB, shuffle=False)
    front_ends.run_lightning(model, lambda m: torch.optim.SGD(lora_parameters(m), lr=LR), loader,
                             SharpnessAwareMinimization(variant="flat_lora"), max_steps=STEPS,
                             loss_fn=lambda m, batch, epoch: m(**batch).loss)


# Accelerate keeps process-wide singletons: every test here gets its own (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("_fresh_accelerate_state")


def test_flat_lora_trains_the_same_adapters_in_plain_pytorch_hf_and_lightning(tmp_path):
    start = tiny_gpt2_lora()
    plain = tiny_gpt2_lora()
    frozen = base_weights(plain)
    calls = count_forwards(plain)
    run_plain(plain)
    assert calls[0] == STEPS  # one forward per step
    reference = adapter_vector(plain)
    assert not torch.equal(reference, adapter_vector(start))
    assert all(torch.equal(p, frozen[n]) for n, p in plain.named_parameters() if n in frozen)
    # not a plain SGD step: the perturbation changed the gradients
    sgd = tiny_gpt2_lora()
    opt = torch.optim.SGD(lora_parameters(sgd), lr=LR)
    for batch in batches():
        opt.zero_grad()
        sgd(**batch).loss.backward()
        opt.step()
    assert float((adapter_vector(sgd) - reference).abs().max()) > 1e-5

    for name, runner in (("hf", lambda m: run_hf(m, tmp_path)), ("lightning", run_lightning)):
        model = tiny_gpt2_lora()
        calls = count_forwards(model)
        runner(model)
        assert calls[0] == STEPS, name
        got = adapter_vector(model)
        assert float((got - reference).abs().max() / reference.abs().max()) <= 1e-5, name
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen), name


def test_lora_finetune_example_quick(capsys):
    """examples/lora_finetune.py end to end (--quick), both methods: it trains and the monitor measures."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "lora_finetune.py"
    spec = importlib.util.spec_from_file_location("lora_finetune_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for method in ("flat_lora", "sam"):
        result = example.main(["--quick", "--method", method])
        assert result["n_sharpness"] == 3 and math.isfinite(result["eval_loss"])  # 3 monitor checks in 6 steps
    out = capsys.readouterr().out
    assert "method flat_lora" in out and "method sam" in out
