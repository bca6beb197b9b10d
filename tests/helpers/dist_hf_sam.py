"""Two-process Trainer run with sam= (launched by tests/integrations/test_hf_distributed.py through torchrun).

Each rank records the micro-batches its loop handed to training_step and its final weights; the
test rebuilds per-worker SAM from them in a single process.
"""

import sys

import torch
from tests.helpers.distributed import exit_torchrun_worker
from tests.helpers.tiny_text import per_worker_sam_trainer
from accelerate.utils import DistributedType


def main(out: str) -> None:
    trainer = per_worker_sam_trainer(out)
    assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU, trainer.accelerator.distributed_type
    assert trainer.accelerator.num_processes == 2
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
    rank = trainer.accelerator.process_index
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    torch.save({"seen": trainer.seen, "params": params}, f"{out}/rank{rank}.pt")
    exit_torchrun_worker()


if __name__ == "__main__":
    main(sys.argv[1])
