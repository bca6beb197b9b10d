"""SAM in a hand-written Accelerate loop, with gradient accumulation, clipping, a scheduler and a
sharpness monitor that runs only on optimizer steps. CPU, no downloads (a BERT built from a config,
a synthetic task).

    python examples/accelerate_loop.py                  # one process
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_loop.py   # two CPU processes (DDP)
    python examples/accelerate_loop.py --quick          # a few steps (smoke test)
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
from sharpguard.monitor import SharpnessMonitor


def synthetic(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 100, (n, 12), generator=g)
    labels = (ids[:, 0] < 55).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]} for i in range(n)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sam")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="8 micro-batches, for a smoke test")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2,
    )
    model = BertForSequenceClassification(config)
    loader = torch.utils.data.DataLoader(synthetic(512, 0), batch_size=16, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=64)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    sam = SharpnessAwareMinimization(accelerator, model, optimizer, variant=args.variant, rho=args.rho)
    probe = [{k: torch.stack([ex[k] for ex in synthetic(32, 2)]) for k in ("input_ids", "attention_mask", "labels")}]
    monitor = MonitorStep(accelerator,
                          SharpnessMonitor(measures=("lambda_max",), every_n_steps=8, probe=probe, alerts=None))

    micro, limit = 0, 8 if args.quick else None
    for _ in range(1 if args.quick else args.epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = sam.backward(batch)  # clean pass, and on sync steps the SAM pass
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)  # clips the SAM gradient
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                metrics = monitor.step(model, optimizer=optimizer, loss=loss)
            if metrics and accelerator.is_main_process:
                print(f"step {monitor.global_step:4d}  loss {float(loss):.4f}  lambda_max "
                      f"{metrics['sharpness/lambda_max']:.4f}")
            micro += 1
            if limit is not None and micro >= limit:
                break

    summary = monitor.finish()  # through Accelerate's logger; printed here so the example shows it
    sam.finish()
    if accelerator.is_main_process:
        print(f"sharpguard: {summary}")

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(synthetic(256, 1), batch_size=64):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    acc = correct / total
    if accelerator.is_main_process:
        print(f"optimizer steps {monitor.global_step}  eval accuracy {acc:.3f}")
    return {"eval_accuracy": acc, "steps": monitor.global_step}


if __name__ == "__main__":
    main()
