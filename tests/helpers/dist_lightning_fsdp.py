"""Two-process Lightning fit under ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in
``configure_model``) with the SAM callback (launched by tests/integrations/test_fsdp_frameworks.py through torchrun).

Each rank reads its own batches (``rank_batch``); rank 0 saves the full weights after each variant.
The refused variants must fail in ``trainer.fit`` with the core's message; each rank saves what it saw.
"""

import sys

import pytorch_lightning as pl
import torch
from torch import nn

from sharpguard.integrations.lightning import SharpnessAwareMinimization

from tests.helpers.distributed import exit_torchrun_worker
from tests.helpers.fsdp_case import ACCUM, BATCH, LR, STEPS, VARIANTS, make_net, rank_batch

REFUSED = {"bsam": {"num_data": STEPS * ACCUM * BATCH * 2}, "friendly_sam": {}}  # variant: its own knobs


class LitFSDP2(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_net()

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    def train_dataloader(self):
        batches = [rank_batch(m, self.global_rank) for m in range(STEPS * ACCUM)]
        data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False)


def trainer(callback: pl.Callback | list) -> pl.Trainer:
    from pytorch_lightning.strategies import ModelParallelStrategy

    return pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=STEPS, accumulate_grad_batches=ACCUM, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callback if isinstance(callback, list) else [callback],
    )


def main(out: str) -> None:
    from torch.distributed.tensor import DTensor

    result: dict = {"refused": {}}
    for variant in VARIANTS:
        lit, sam = LitFSDP2(), SharpnessAwareMinimization(variant=variant)
        t = trainer(sam)
        t.fit(lit)
        params = list(lit.parameters())
        assert params and all(isinstance(p, DTensor) for p in params), [type(p) for p in params]
        result["sharded"] = all(p.to_local().numel() < p.numel() for p in params if p.dim() == 2)
        result["strategy"] = type(t.strategy).__name__
        result["engine_sharded"] = sam.engine.sharded
        result["n_steps_" + variant] = sam.n_steps
        result[variant] = [p.full_tensor().detach().clone() for p in params]
    # SAM with the default SharpnessMonitor (lambda_max + eos_ratio, the module's training_step as the probe
    # loss) on the sharded model: each check's values, the probe each rank captured, and the weights (which
    # must be the unmonitored SAM run's: a check changes nothing)
    from sharpguard.integrations.lightning import SharpnessMonitor

    lit, sam = LitFSDP2(), SharpnessAwareMinimization(variant="sam")
    monitor = SharpnessMonitor(every_n_steps=1, measure_kwargs={"lambda_max": {"tol": 1e-9, "max_iter": 80},
                                                               "eos_ratio": {"tol": 1e-9, "max_iter": 80}})
    seen: list = []
    original = monitor.monitor._measure

    def recording(model, batches, optimizer, batch):
        metrics, settings = original(model, batches, optimizer, batch)
        seen.append({k: float(v) for k, v in metrics.items()})
        return metrics, settings

    monitor.monitor._measure = recording
    trainer([sam, monitor]).fit(lit)
    result["monitored"] = [p.full_tensor().detach().clone() for p in lit.parameters()]
    result["checks"] = seen
    result["probe"] = [tuple(t.clone() for t in b) for b in monitor.monitor.probe.batches]
    for variant, knobs in REFUSED.items():
        t = trainer(SharpnessAwareMinimization(variant=variant, **knobs))
        try:
            t.fit(LitFSDP2())
        except Exception as exc:  # noqa: BLE001 - the test checks type and text
            result["refused"][variant] = f"{type(exc).__name__}: {exc}"
        else:
            result["refused"][variant] = "no error"
    rank = torch.distributed.get_rank()
    torch.save(result, f"{out}/rank{rank}.pt")
    exit_torchrun_worker()


if __name__ == "__main__":
    main(sys.argv[1])
