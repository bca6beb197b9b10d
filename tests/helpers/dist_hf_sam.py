"""Two-process Trainer run with sam= (launched by tests/integrations/test_hf_distributed.py through torchrun).

Each rank records the micro-batches its loop handed to training_step and its final weights; the
test rebuilds per-worker SAM from them in a single process.
"""

import sys

import torch
from tests.helpers.distributed import exit_torchrun_worker
from tests.helpers.tiny_text import FirstTokenTask, tiny_bert
from accelerate.utils import DistributedType
from transformers import TrainingArguments

from sharpguard.integrations.huggingface import SharpGuardTrainer


class RecordingTrainer(SharpGuardTrainer):
    def training_step(self, model, inputs, *args, **kwargs):
        self.seen.append({k: v.detach().cpu().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


def main(out: str) -> None:
    model = tiny_bert()
    args = TrainingArguments(
        output_dir=f"{out}/hf",
        use_cpu=True,  # without it torchrun on a GPU-less box gives two independent single runs
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        average_tokens_across_devices=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=FirstTokenTask(32),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.5), None),
        sam={"rho": 0.2},
    )
    trainer.loss_is_scaled_for_ga = False  # per-batch mean losses, averaged over the window
    assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU, trainer.accelerator.distributed_type
    assert trainer.accelerator.num_processes == 2
    trainer.seen = []
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
    rank = trainer.accelerator.process_index
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    torch.save({"seen": trainer.seen, "params": params}, f"{out}/rank{rank}.pt")
    exit_torchrun_worker()


if __name__ == "__main__":
    main(sys.argv[1])
