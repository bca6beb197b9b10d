"""Train the same small net on scikit-learn's digits with plain SGD and with SAM; print both results.

    python examples/plain_sam_digits.py [--epochs 30] [--rho 0.05] [--seed 0]

Runs on a CPU in well under a minute (README.md gives a measured time). The only difference between
the two runs is the optimizer line:
``torch.optim.SGD(...)`` versus ``sg.SAM(..., torch.optim.SGD, rho=...)`` with ``step(closure)``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import sharpguard as sg


def load_digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train = int(0.75 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(use_sam: bool, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, float]:
    x_train, y_train, x_test, y_test = data
    model = make_model(args.seed)
    if use_sam:
        opt = sg.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, model=model, lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    batches = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x_train), generator=batches).split(args.batch_size):
            xb, yb = x_train[idx], y_train[idx]

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
    seconds = time.perf_counter() - start
    train_loss, train_acc = evaluate(model, x_train, y_train)
    test_loss, test_acc = evaluate(model, x_test, y_test)
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load_digits(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, {args.epochs} epochs, seed {args.seed}")
    print(f"{'optimizer':<22}{'train loss':>11}{'train acc':>10}{'test loss':>10}{'test acc':>9}{'seconds':>9}")
    for name, use_sam in (("SGD (momentum 0.9)", False), (f"SAM(SGD), rho={args.rho}", True)):
        r = train(use_sam, args, data)
        print(
            f"{name:<22}{r['train_loss']:>11.4f}{r['train_acc']:>10.3f}{r['test_loss']:>10.4f}"
            f"{r['test_acc']:>9.3f}{r['seconds']:>9.1f}"
        )


if __name__ == "__main__":
    main()
