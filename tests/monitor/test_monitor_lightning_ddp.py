"""Monitors under Lightning DDP (ddp_spawn, 2 CPU ranks over gloo), through the one MonitorDriver: both
ranks check at the same steps, and the values checked, alerted on and recorded are the same on both —
the mean over ranks for a per-rank measure (clean accuracy on each rank's own probe shard); the
curvature is already global (the Hessian products all-reduce)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from tests.helpers.lightning_dist import LeaveTogether  # noqa: E402

from sharpguard.integrations.lightning import RobustnessMonitor, SharpnessMonitor  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning")]


class _Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(100 + self.global_rank)  # a different shard per rank
        data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
        return torch.utils.data.DataLoader(data, batch_size=8)


class _Report(pl.Callback):
    def __init__(self, sharp, robust, path: str) -> None:
        self.sharp, self.robust, self.path = sharp, robust, path

    def on_train_end(self, trainer, pl_module):
        lam = self.sharp.monitor.history.values("sharpness/lambda_max")
        acc = self.robust.monitor.history.values("robustness/clean_acc")
        x, y = self.robust.monitor.probe.batches[0]
        with torch.no_grad():
            local = (pl_module(x).argmax(-1) == y).double().mean().item()  # this rank's own probe, final weights
        row = torch.tensor([len(lam), len(acc), *[s for s, _ in lam][:3], *[v for _, v in lam][:3],
                            *[s for s, _ in acc][:3], *[v for _, v in acc][:3], local], dtype=torch.float64)
        gathered = trainer.strategy.all_gather(row)
        if trainer.is_global_zero:
            torch.save({"rows": gathered.cpu(), "world": trainer.world_size}, self.path)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_ranks_share_checks_and_values(tmp_path):
    path = str(tmp_path / "r.pt")
    sharp = SharpnessMonitor(measures=("lambda_max",), alerts=None, min_every=2, max_every=3)
    robust = RobustnessMonitor(measures=("clean_acc",), alerts=None, every_n_steps=4, probe_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=8, logger=False,
                         use_distributed_sampler=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[sharp, robust, _Report(sharp, robust, path), LeaveTogether()])
    trainer.fit(_Lit())
    out = torch.load(path, weights_only=True)
    assert out["world"] == 2
    r0, r1 = out["rows"][0], out["rows"][1]
    assert r0[0].item() == r1[0].item() == 3 and r0[1].item() == r1[1].item() == 2
    # the same check steps (2, 5, 8: adaptive, capped by max_every) and the same values on both ranks
    assert r0[2:5].tolist() == r1[2:5].tolist() == [2.0, 5.0, 8.0]
    assert torch.equal(r0[5:8], r1[5:8])
    assert r0[8:10].tolist() == [4.0, 8.0] and torch.equal(r0[10:12], r1[10:12])
    # the per-rank accuracies differ; what both recorded at step 8 is their mean
    local0, local1 = r0[-1].item(), r1[-1].item()
    assert local0 != local1
    assert r0[11].item() == pytest.approx((local0 + local1) / 2, abs=1e-12)
