"""SAM under Lightning DDP (ddp_spawn, 2 CPU ranks over gloo): replicas stay identical and follow
per-worker SAM (each worker perturbs with its local gradient; the perturbed gradients are averaged)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from tests.helpers.lightning_dist import LeaveTogether  # noqa: E402
from tests.helpers import lit_digits  # noqa: E402

from sharpguard.integrations.lightning import SharpnessAwareMinimization  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning")]

N, BATCH, RHO, LR, STEPS = 128, 16, 0.05, 0.2, 3


def digits():
    return lit_digits.digits(N)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


class LitDigits(lit_digits.LitDigits):
    def __init__(self):
        super().__init__(make_net(), lr=LR)

    def train_dataloader(self):
        # each rank reads its own fixed shard (examples rank, rank + 2, ...) so the reference knows it
        x, y = digits()
        shard = torch.utils.data.TensorDataset(x[self.global_rank :: 2], y[self.global_rank :: 2])
        return torch.utils.data.DataLoader(shard, batch_size=BATCH, shuffle=False)


class Report(pl.Callback):
    """Inside the workers: are the replicas identical? Rank 0 saves the weights."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        if trainer.is_global_zero:
            torch.save({"equal": bool(torch.equal(gathered[0], gathered[1])), "world": trainer.world_size,
                        "weights": [p.detach().clone() for p in pl_module.parameters()]}, self.path)


class ReplayOutsideStrategy(SharpnessAwareMinimization):
    """The fault of SAM callbacks that call pl_module.training_step: the backward bypasses DDP's reducer."""

    @staticmethod
    def _replay(trainer, pl_module, batch, batch_idx):
        return lambda: pl_module.training_step(batch, batch_idx).backward()


def fit(tmp_path, sam_cls) -> dict:
    path = str(tmp_path / "result.pt")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=STEPS, logger=False,
                         use_distributed_sampler=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[sam_cls(rho=RHO), Report(path), LeaveTogether()])
    trainer.fit(LitDigits())
    return torch.load(path, weights_only=True)


def per_worker_sam_reference() -> list[torch.Tensor]:
    """By hand: rank r trains on the examples r, r+2, ...; each rank perturbs
    with its own gradient, the perturbed gradients are averaged (DDP's all-reduce), then SGD."""
    net = make_net().double()
    x, y = digits()
    x = x.double()
    params = list(net.parameters())
    shards = [(x[r::2], y[r::2]) for r in range(2)]
    for step in range(STEPS):
        g2_sum = [torch.zeros_like(p) for p in params]
        for xr, yr in shards:
            xb, yb = xr[step * BATCH : (step + 1) * BATCH], yr[step * BATCH : (step + 1) * BATCH]
            g = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            w = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.add_(gi * RHO / norm)
            g2 = torch.autograd.grad(F.cross_entropy(net(xb), yb), params)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            for acc, gi in zip(g2_sum, g2):
                acc += gi / 2
        with torch.no_grad():
            for p, gi in zip(params, g2_sum):
                p.sub_(LR * gi)
    return [p.detach().float() for p in params]


@pytest.mark.timeout(240)
def test_ddp_ranks_identical_and_per_worker_sam(tmp_path):
    result = fit(tmp_path, SharpnessAwareMinimization)
    assert result["world"] == 2 and result["equal"]
    reference = per_worker_sam_reference()
    assert len(result["weights"]) == len(reference) > 0
    for got, want in zip(result["weights"], reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(240)
def test_replay_outside_the_strategy_lets_replicas_diverge(tmp_path):
    # the negative control: the test above would catch a callback that re-runs pl_module.training_step
    result = fit(tmp_path, ReplayOutsideStrategy)
    assert result["world"] == 2 and not result["equal"]
