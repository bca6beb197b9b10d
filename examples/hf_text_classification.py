"""Fine-tune a small BERT with SAM (or a variant), embedding-space adversarial training, and a
sharpness monitor, through the Hugging Face Trainer. CPU, no downloads: the model is built from a
config and the task is synthetic (label = whether the first token id is below 55).

    python examples/hf_text_classification.py                      # SAM + sharpness monitor
    python examples/hf_text_classification.py --variant asam --adversarial freelb
    python examples/hf_text_classification.py --quick              # a few steps (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback


class FirstTokenTask(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int, seq_len: int = 12, vocab: int = 100):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(10, vocab, (n, seq_len), generator=g)
        self.labels = (self.ids[:, 0] < 55).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sam", help="sam, asam, gsam, looksam, momentum_sam, friendly_sam")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--adversarial", default=None, help="freelb, smart, fgm, embedding-pgd, r3f (default: none)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="6 steps, for a smoke test")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    steps = 6 if args.quick else args.steps

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    adversarial = None
    if args.adversarial == "freelb":
        # FreeLB's step is relative to the embedding norm (~0.08 per token for this tiny model)
        adversarial = {"method": "freelb", "steps": 2, "alpha": 0.01, "init_mag": 0.002}
    elif args.adversarial:
        adversarial = args.adversarial

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            use_cpu=True,
            max_steps=steps,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,
            learning_rate=1e-2,
            max_grad_norm=1.0,
            logging_steps=max(1, steps // 5),
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            # sharpguard's lines go through transformers' logger: what is active, the first check, the end
            log_level="info",
            seed=0,
        )
        monitor = SharpnessMonitorCallback(
            every_n_steps=max(1, steps // 3), measures=("lambda_max", "trace"), probe_size=32,
            measure_kwargs={"trace": {"n_hvp": 10}},
        )
        trainer = SharpGuardTrainer(
            model=model,
            args=training_args,
            train_dataset=FirstTokenTask(512, seed=0),
            eval_dataset=FirstTokenTask(256, seed=1),
            compute_metrics=accuracy,
            sam={"variant": args.variant, "rho": args.rho},
            adversarial=adversarial,
            callbacks=[monitor],
        )
        trainer.train()
        metrics = trainer.evaluate()
    sharpness = [(h["step"],
                  h["sharpness/lambda_max"]) for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    print(f"eval accuracy {metrics['eval_accuracy']:.3f}  eval loss {metrics['eval_loss']:.4f}")
    for step, value in sharpness:
        print(f"step {step:4d}  sharpness/lambda_max {value:.4f}")
    return {"eval_accuracy": metrics["eval_accuracy"], "n_sharpness": len(sharpness)}


if __name__ == "__main__":
    main()
