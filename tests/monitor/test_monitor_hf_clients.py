"""SharpnessMonitorCallback at its defaults on Hugging Face model families built from configs (issue 11):
a causal LM, an encoder classifier, an image classifier and a seq2seq model. Each trains; a finite
``sharpness/lambda_max`` reaches ``log_history`` within the first steps; the monitored run equals the
unmonitored run bitwise; the probe loss is the Trainer's own ``compute_loss``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import transformers  # noqa: F401

from tests.helpers.tiny_text import params_of, trainer_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Dicts(torch.utils.data.Dataset):
    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 50, (32, 12), generator=_gen())
    return GPT2LMHeadModel(cfg), _Dicts(input_ids=ids, labels=ids)


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.1)
    ids = torch.randint(0, 50, (32, 12), generator=_gen())
    return BertForSequenceClassification(cfg), _Dicts(input_ids=ids, labels=ids[:, 0] % 3)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    x = torch.rand(32, 3, 8, 8, generator=_gen())
    return ViTForImageClassification(cfg), _Dicts(pixel_values=x, labels=(x[:, 0, 0, 0] * 3).long())


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids = torch.randint(2, 50, (32, 10), generator=_gen())
    return T5ForConditionalGeneration(cfg), _Dicts(input_ids=ids, labels=ids.flip(1)[:, :6])


FAMILIES = {"gpt2": gpt2, "bert": bert, "vit": vit, "t5": t5}


def _train(build, tmp_path, callbacks, sam=None, **args):
    torch.manual_seed(0)
    model, data = build()
    trainer = SharpGuardTrainer(model=model, args=trainer_args(tmp_path, max_steps=6, **args), train_dataset=data,
                                callbacks=callbacks, sam=sam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


def _check(build, tmp_path, sam=None, **args):
    plain = _train(build, tmp_path / "plain", [], sam=sam, **args)
    cb = SharpnessMonitorCallback()
    monitored = _train(build, tmp_path / "monitored", [cb], sam=sam, **args)
    a, b = params_of(plain.model), params_of(monitored.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [(h["step"],
               h["sharpness/lambda_max"]) for h in monitored.state.log_history if "sharpness/lambda_max" in h]
    assert logged and logged[0][0] <= 3 and all(math.isfinite(v) for _, v in logged), logged
    # the Trainer's own losses are untouched
    assert [h["loss"] for h in plain.state.log_history if "loss" in h] == [
        h["loss"] for h in monitored.state.log_history if "loss" in h
    ]
    return cb, monitored


@pytest.mark.parametrize("sam", [None, "sam"], ids=["plain", "sam"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_family_with_a_default_monitor(family, sam, tmp_path):
    """With ``sam``, both runs use SharpGuardTrainer(sam="sam") at its defaults: SAM + monitor equals SAM alone."""
    cb, trainer = _check(FAMILIES[family], tmp_path, sam=sam)
    # the probe is one training batch drawn from the dataset, measured with the Trainer's compute_loss
    assert len(cb.monitor.probe) == 8


def test_causal_lm_with_gradient_checkpointing_and_bf16(tmp_path):
    """Both flags act in training only; the check measures the fp32 loss of the same function (the
    model in eval mode does not checkpoint), and matches the value measured without the flags."""
    cb, trainer = _check(gpt2, tmp_path, gradient_checkpointing=True, bf16=True)
    from sharpguard.sharpness import hessian_eigenvalues

    model = trainer.model
    assert model.is_gradient_checkpointing
    # the monitor's own measurement path (compute_loss on the probe, guards, eval mode) at the final
    # weights, against a plain Lanczos on model(**batch).loss in fp32
    value = cb.monitor.measure(model, optimizer=trainer.optimizer)["sharpness/lambda_max"]
    model.eval()
    ref = hessian_eigenvalues(model, cb.monitor.probe.batches, k=1, tol=1e-6, max_iter=100).eigenvalues[0]
    assert value == pytest.approx(ref, rel=1e-2)
