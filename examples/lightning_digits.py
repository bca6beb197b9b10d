"""SAM and monitors in a LightningModule you already have: the digits data (8x8 images), a small CNN.

    python examples/lightning_digits.py --max-epochs 3 --out runs/digits

Adds three callbacks to an ordinary Trainer and nothing to the model:
SharpnessAwareMinimization (SAM, rho=0.05), SharpnessMonitor (lambda_max and the edge-of-stability
ratio on the default schedule: a first check at step 2, then within 5% of training time) and
RobustnessMonitor (clean and PGD accuracy at each validation), with ModelCheckpoint keeping the most
robust weights. Runs on CPU in well under two minutes. The fit-end lines say what each monitor cost:
at 66 steps the run is shorter than the gap the 5% budget leaves after the first sharpness check, so
that check is the only one (the line says so); the robustness checks run at each validation, which
the step budget does not schedule. Without --out the files go to a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from sharpguard.integrations.lightning import (
    NAMESPACE,
    RobustnessMonitor,
    SharpnessAwareMinimization,
    SharpnessMonitor,
)

pl = __import__(NAMESPACE, fromlist=["Trainer"])


class DigitsCNN(pl.LightningModule):
    """A LightningModule as users write it: nothing sharpguard-specific inside."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def digits_loaders(batch_size: int = 64, seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1400], perm[1400:]
    ds = torch.utils.data.TensorDataset
    return (
        torch.utils.data.DataLoader(ds(x[train], y[train]), batch_size=batch_size, shuffle=True),
        torch.utils.data.DataLoader(ds(x[val], y[val]), batch_size=256),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.out is None:  # nothing left in the checkout
        args.out = Path(tempfile.mkdtemp(prefix="sharpguard_lightning_digits_"))

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    callbacks = [
        SharpnessAwareMinimization(rho=args.rho),
        # the default schedule: a first check at step 2 (monitor/first_check_s), then checks within 5% of
        # training time (monitor/overhead_pct, the steady state); the probe is sized to the work
        SharpnessMonitor(measures=("lambda_max", "eos_ratio"), history=str(args.out / "sharpness.jsonl")),
        # at every validation end, for ModelCheckpoint: one check per epoch, not on the step budget
        RobustnessMonitor(measures=("clean_acc", "pgd_acc"), when="validation", eps=0.1, steps=5, probe_size=128,
                          history=str(args.out / "robustness.jsonl")),
        pl.callbacks.ModelCheckpoint(dirpath=args.out / "checkpoints", monitor="robustness/pgd_acc", mode="max"),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.max_epochs, max_steps=args.max_steps, callbacks=callbacks,
        logger=pl.loggers.CSVLogger(args.out), enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsCNN(), train, val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in ("val_acc", "robustness/clean_acc", "robustness/pgd_acc", "sharpness/lambda_max",
                 "sharpness/eos_ratio", "monitor/first_check_s", "monitor/overhead_pct"):
        if name in metrics:
            print(f"{name:24s} {metrics[name]:.4f}")
    return metrics


if __name__ == "__main__":
    main()
