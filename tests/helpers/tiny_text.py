"""A one-layer BERT and a learnable synthetic text task for the Hugging Face / Accelerate tests.

Also imported by the two-process scripts the distributed tests launch with torchrun, and by the
hand-written SAM references (float64-free, but independent of the adapters: plain autograd).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

VOCAB = 100
SEQ_LEN = 12


def sdpa_bert(seed: int, *, vocab: int = 20, num_labels: int = 3):
    """A smaller BertForSequenceClassification (hidden 8, 1 layer, SDPA attention) for the curvature
    tests: small enough for a dense Hessian, and exercising the fused-attention double-backward fallback."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=num_labels,
        attn_implementation="sdpa",
    )
    return BertForSequenceClassification(cfg)


def tiny_bert(seed: int = 0, dropout: float = 0.0):
    """BertForSequenceClassification from a config (no hub): 1 layer, hidden 16, 2 heads."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


class FirstTokenTask(torch.utils.data.Dataset):
    """Random token ids; label 1 when the first token is "small" (id < 55).

    BERT's pooler reads position 0, so a one-layer model learns it in a few dozen steps."""

    def __init__(self, n: int = 64, seed: int = 0, seq_len: int = SEQ_LEN):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, VOCAB, (n, seq_len), generator=g)
        self.labels = (self.ids[:, 0] < 55).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def trainer_args(output_dir, **overrides):
    """TrainingArguments for a short, quiet, deterministic CPU run without saving (override any)."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=8,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        learning_rate=1e-3,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def per_worker_sam_trainer(out, **overrides):
    """The two-process HF runs of the distributed tests: SharpGuardTrainer(sam={"rho": 0.2}) on the tiny BERT,
    SGD at 0.5, two optimizer steps of two micro-batches of 4 per rank, per-batch mean losses; it keeps in
    ``.seen`` the micro-batches its loop hands to ``training_step`` (detached, on CPU), from which the
    tests rebuild per-worker SAM in one process. ``overrides`` go to ``TrainingArguments`` (FSDP, say)."""
    from transformers import TrainingArguments

    from sharpguard.integrations.huggingface import SharpGuardTrainer

    class RecordingTrainer(SharpGuardTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.seen.append({k: v.detach().cpu().clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, *args, **kwargs)

    args = dict(
        output_dir=f"{out}/hf",
        use_cpu=True,  # without it torchrun on a GPU-less box gives two independent single runs
        max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.0,
        lr_scheduler_type="constant", average_tokens_across_devices=False, report_to="none", disable_tqdm=True,
        save_strategy="no", seed=0,
    )
    args.update(overrides)
    model = tiny_bert()
    trainer = RecordingTrainer(
        model=model, args=TrainingArguments(**args), train_dataset=FirstTokenTask(32),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None), sam={"rho": 0.2},
    )
    trainer.loss_is_scaled_for_ga = False  # per-batch mean losses, averaged over the window
    trainer.seen = []
    return trainer


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def sam_reference(
    model: torch.nn.Module,
    windows: Sequence[Sequence[dict]],
    *,
    lr: float,
    rho: float,
    max_grad_norm: float = 0.0,
    per_worker: Sequence[Sequence[Sequence[dict]]] | None = None,
) -> torch.nn.Module:
    """SAM with SGD written out by hand (Foret et al. 2021, Alg. 1), one optimizer step per window.

    ``windows[t]`` is the list of micro-batches of step t (gradient accumulation: the loss of each is
    divided by their number). With ``per_worker[t][r]`` (the micro-batches of worker r), each worker
    computes its own e from its own gradient and the SAM gradients are averaged (Foret et al.,
    m-sharpness; what DDP with a no_sync first pass gives). The Trainer clips the final gradient.
    """
    model = copy.deepcopy(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_at(batches, n_micro):
        for p in params:
            p.grad = None
        for b in batches:
            (model(**b).loss / n_micro).backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def sam_grad(batches):
        w = [p.detach().clone() for p in params]
        g = grad_at(batches, len(batches))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(gi, alpha=float(rho / (norm + 1e-12)))
        g2 = grad_at(batches, len(batches))
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
        return g2

    steps = per_worker if per_worker is not None else [[w] for w in windows]
    for workers in steps:
        grads = [sam_grad(batches) for batches in workers]
        g = [torch.stack(gs).mean(0) for gs in zip(*grads)]
        if max_grad_norm > 0:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in g]))
            coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)
            g = [x * coef for x in g]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.sub_(gi, alpha=lr)
    return model
