"""Two CPU processes asking Accelerate (or the HF Trainer) for FSDP2, with SAM (launched by
tests/integrations/test_fsdp_frameworks.py through torchrun; ``SHARPGUARD_TEST_FRAMEWORK`` = ``accelerate`` or ``hf``).

On CPU, Accelerate never selects ``DistributedType.FSDP`` (accelerate/state.py sets it only inside the
branch for GPU-like distributed types, not ``MULTI_CPU``): the model is wrapped in DDP and the FSDP
settings are dropped without a word; sharpguard says it. Each rank records what Accelerate chose, what the
SAM engine made of it, the warnings, the micro-batches it trained on and its final weights.
"""

import os
import sys

import torch
from tests.helpers.distributed import exit_torchrun_worker
from tests.helpers.tiny_text import FirstTokenTask, per_worker_sam_trainer, tiny_bert


def accelerate_run() -> dict:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from sharpguard.integrations.accelerate import SharpnessAwareMinimization

    accelerator = Accelerator(
        cpu=True, gradient_accumulation_steps=2, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)
    )
    model = tiny_bert()
    loader = torch.utils.data.DataLoader(FirstTokenTask(32), batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.2)
    seen = []
    for i, batch in enumerate(loader):
        if i == 4:  # two optimizer steps of two micro-batches
            break
        seen.append({k: v.detach().cpu().clone() for k, v in batch.items()})
        with accelerator.accumulate(model):
            sam.backward(batch)
            optimizer.step()
            optimizer.zero_grad()
    return {
        "distributed_type": accelerator.distributed_type.name,
        "wrapped": type(model).__name__,
        "engine_sharded": sam.engine.sharded,
        "per_worker": sam.engine.per_worker,
        "seen": seen,
        "params": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()},
    }


def hf_run(out: str) -> dict:
    trainer = per_worker_sam_trainer(out, fsdp=True, fsdp_config={"fsdp_version": 2})
    trainer.train()
    engine = trainer._sg_engine
    return {
        "distributed_type": trainer.accelerator.distributed_type.name,
        "wrapped": type(trainer.model_wrapped).__name__,
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "engine_sharded": engine.sharded,
        "per_worker": engine.per_worker,
        "seen": trainer.seen,
        "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
    }


def main(out: str) -> None:
    import warnings

    framework = os.environ["SHARPGUARD_TEST_FRAMEWORK"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = accelerate_run() if framework == "accelerate" else hf_run(out)
    result["said"] = [str(w.message) for w in caught]
    torch.save(result, f"{out}/rank{torch.distributed.get_rank()}.pt")
    exit_torchrun_worker()


if __name__ == "__main__":
    main(sys.argv[1])
