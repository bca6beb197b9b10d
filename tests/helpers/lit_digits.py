"""The digits data (scikit-learn's 8 x 8 digits, pixels scaled to [0, 1]) and the LightningModule the
Lightning tests train on it: written as users write one (cross entropy of its own forward, SGD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharpguard.integrations._lightning_namespace import pl


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits: inputs (n, 64) in [0, 1], labels (n,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return x, y


class LitDigits(pl.LightningModule):
    """Cross entropy of ``net`` on (x, y) batches, logged as ``train_loss``; SGD at ``lr`` (with
    ``momentum``), stepped down by ``gamma`` every optimizer step when given. Keeps what the tests read
    back: the inputs each ``training_step`` saw (``seen``) and how many times it ran (``train_steps``)."""

    def __init__(self, net: nn.Module, lr: float = 0.2, momentum: float = 0.0, gamma: float | None = None):
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.gamma = lr, momentum, gamma
        self.seen: list[torch.Tensor] = []
        self.train_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.detach().clone())
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        self.train_steps += 1
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.gamma is None:
            return opt
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=self.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
