"""Two-process Accelerate loop with SharpnessAwareMinimization (launched by
tests/integrations/test_accelerate_distributed.py through torchrun)."""

import sys

import torch
from tests.helpers.distributed import exit_torchrun_worker
from tests.helpers.tiny_text import FirstTokenTask, tiny_bert
from accelerate import Accelerator
from accelerate.utils import DistributedType

from sharpguard.integrations.accelerate import SharpnessAwareMinimization


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    assert accelerator.num_processes == 2
    model = tiny_bert()
    loader = torch.utils.data.DataLoader(FirstTokenTask(32), batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
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
    params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()}
    torch.save({"seen": seen, "params": params}, f"{out}/rank{accelerator.process_index}.pt")
    exit_torchrun_worker()


if __name__ == "__main__":
    main(sys.argv[1])
