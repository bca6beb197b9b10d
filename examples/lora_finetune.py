"""LoRA fine-tuning of a small causal LM with SAM on the adapters or Flat-LoRA, and a sharpness
monitor, through the Hugging Face Trainer. CPU, no downloads: GPT-2 is built from a config and the
task is synthetic (sequences that count up modulo the vocabulary). Needs ``pip install "sharpguard[lora]"``.

    python examples/lora_finetune.py                       # Flat-LoRA (one forward/backward per step)
    python examples/lora_finetune.py --method sam          # SAM on the LoRA adapters (two per step)
    python examples/lora_finetune.py --quick               # a few steps (smoke test)

The Trainer builds its optimizer over the trainable parameters, which for a peft model are the
adapters: ``sam={"variant": "sam"}`` is SAM in the LoRA space; ``"flat_lora"`` perturbs the merged
weights ``W + s B A`` instead (sharpguard.optim.FlatLoRA). The monitor measures the top Hessian
eigenvalue of the loss with respect to the trainable (adapter) parameters.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback


class Counting(torch.utils.data.Dataset):
    """Token sequences that count up modulo ``vocab`` from a random start."""

    def __init__(self, n: int, seed: int, seq_len: int = 16, vocab: int = 64) -> None:
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(vocab: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        # SDPA, transformers' default attention, works as it is: the monitor's Hessian-vector products run
        # it on PyTorch's math kernel, which has the double backward the fused CPU kernel lacks
        attn_implementation="sdpa",
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    return get_peft_model(GPT2LMHeadModel(config), lora)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="flat_lora", choices=["flat_lora", "sam"])
    parser.add_argument("--sigma", type=float, default=0.05, help="Flat-LoRA's noise scale")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius (in the LoRA space)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--quick", action="store_true", help="6 steps, for a smoke test")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    steps = 6 if args.quick else args.steps

    model = build_model()
    sam = {"variant": "flat_lora",
           "sigma": args.sigma} if args.method == "flat_lora" else {"variant": "sam", "rho": args.rho}
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            use_cpu=True,
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            max_grad_norm=1.0,
            logging_steps=max(1, steps // 5),
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            # sharpguard's lines go through transformers' logger: what is active, the first check, the end
            log_level="info",
            remove_unused_columns=False,
            seed=0,
        )
        monitor = SharpnessMonitorCallback(every_n_steps=max(1, steps // 3), measures=("lambda_max",), probe_size=16)
        trainer = SharpGuardTrainer(
            model=model,
            args=training_args,
            train_dataset=Counting(512, seed=0),
            eval_dataset=Counting(128, seed=1),
            sam=sam,
            callbacks=[monitor],
        )
        trainer.train()
        metrics = trainer.evaluate()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sharpness = [(h["step"],
                  h["sharpness/lambda_max"]) for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    passes = "1 forward/backward" if args.method == "flat_lora" else "2 forward/backward"
    print(f"method {args.method}: {trainable} trainable (LoRA) parameters, {passes} passes per step")
    print(f"eval loss {metrics['eval_loss']:.4f}")
    for step, value in sharpness:
        print(f"step {step:4d}  sharpness/lambda_max {value:.4f}")
    return {"eval_loss": metrics["eval_loss"], "n_sharpness": len(sharpness)}


if __name__ == "__main__":
    main()
