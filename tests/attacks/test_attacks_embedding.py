"""Embedding-space perturbation through the input-embedding hook, on one-layer BERTs built from configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpguard.adversarial import FGM, FreeLB
from sharpguard.attacks import EmbeddingPerturbation, embedding_pgd, input_embeddings, robust_accuracy
from sharpguard.errors import ConfigurationError

import transformers


def config(**kw):
    base = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    base.update(kw)
    return transformers.BertConfig(**base)


def classifier(**kw):
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config(**kw)).eval()


def text_batch(n: int = 6, length: int = 10):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 6:] = 0
    mask[3, 3:] = 0
    ids = ids * mask  # pad id 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def test_hook_adds_delta_to_word_embeddings_only_at_real_tokens():
    model, batch = classifier(), text_batch()
    seen = {}
    handle = model.bert.embeddings.LayerNorm.register_forward_hook(lambda m, a, o: seen.__setitem__("pre_ln", a[0]))
    with torch.no_grad():
        model(**batch)
        clean = seen["pre_ln"].clone()
        delta = torch.randn(6, 10, 16)
        with EmbeddingPerturbation(model, delta, batch["attention_mask"]):
            model(**batch)
        perturbed = seen["pre_ln"].clone()
        model(**batch)  # hook removed on exit
    handle.remove()
    mask = batch["attention_mask"][..., None].float()
    assert torch.allclose(perturbed - clean, delta * mask, atol=1e-5)
    assert torch.equal(seen["pre_ln"], clean)


def test_perturbation_applies_once_per_forward_for_shared_embeddings():
    emb = nn.Embedding(10, 4)

    class TwoCalls(nn.Module):  # an encoder-decoder calling one shared embedding twice
        def __init__(self):
            super().__init__()
            self.shared = emb

        def get_input_embeddings(self):
            return self.shared

        def forward(self, input_ids):
            return self.shared(input_ids), self.shared(input_ids)

    model, ids = TwoCalls(), torch.arange(6).view(2, 3)
    delta = torch.ones(2, 3, 4)
    with EmbeddingPerturbation(model, delta), torch.no_grad():
        enc, dec = model(ids)
        enc2, _ = model(ids)
    assert torch.allclose(enc - dec, delta) and torch.allclose(enc2 - dec, delta)


def test_tied_output_weights_are_never_touched():
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config(tie_word_embeddings=True)).train()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    batch = text_batch()
    batch["labels"] = batch["input_ids"].clone()
    before = model.bert.embeddings.word_embeddings.weight.detach().clone()
    seen = []
    handle = model.cls.predictions.decoder.register_forward_pre_hook(lambda m,
                                                                     a: seen.append(m.weight.detach().clone()))
    FGM(eps=1.0)(model, batch).backward()
    handle.remove()
    # every forward (clean and adversarial) saw the same output-layer weights, and they are unchanged
    assert len(seen) == 2 and all(torch.equal(w, before) for w in seen)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before)


def test_embedding_pgd_respects_ball_and_padding_and_lowers_accuracy():
    model, batch = classifier(), text_batch(16)
    eps = 2.0
    delta = embedding_pgd(model, batch, eps=eps, alpha=1.0, steps=3)
    assert (delta.flatten(1).norm(dim=1) <= eps + 1e-5).all()
    assert torch.all(delta[batch["attention_mask"] == 0] == 0)
    modes = [m.training for m in model.modules()]
    clean = robust_accuracy(model, batch)
    robust = robust_accuracy(model, batch, lambda m, b, y: embedding_pgd(m, b, eps=eps, alpha=1.0, steps=3))
    assert robust <= clean
    assert [m.training for m in model.modules()] == modes


def test_freelb_fixed_dropout_masks_are_identical_across_ascent_steps():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config(hidden_dropout_prob=0.5)).train()
    batch = text_batch()
    masks = []
    handle = model.bert.encoder.layer[0].output.dropout.register_forward_hook(lambda m, a, o: masks.append(o == 0))
    FreeLB(steps=3, dropout="fixed")(model, batch)
    assert len(masks) == 3 and all(torch.equal(masks[0], m) for m in masks[1:])
    masks.clear()
    FreeLB(steps=3, dropout="train")(model, batch)
    assert not torch.equal(masks[0], masks[1])
    handle.remove()


def test_models_without_input_embeddings_get_a_clear_error():
    with pytest.raises(ConfigurationError, match="get_input_embeddings"):
        input_embeddings(nn.Linear(3, 3))
    model = classifier()
    with pytest.raises(ConfigurationError, match="input_ids"):
        embedding_pgd(model, {"inputs_embeds": torch.zeros(2, 3, 16)})
    with pytest.raises(ConfigurationError, match="shape"):
        with EmbeddingPerturbation(model, torch.zeros(1, 2, 16)), torch.no_grad():
            model(**text_batch())
