"""Monitor metrics reach the user's real loggers (issue 11): Lightning's CSVLogger and TensorBoardLogger
at the step Lightning uses for its own rows of the same batch, and the HF Trainer's ``report_to``
TensorBoard integration; read back from the files those loggers wrote."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import pytorch_lightning as pl

from sharpguard.integrations.lightning import SharpnessMonitor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


class _Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_csv_and_tensorboard_rows_line_up_with_lightnings_own(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    cb = SharpnessMonitor(every_n_steps=2, measures=("lambda_max",), alerts=None)
    loggers = [pl.loggers.CSVLogger(tmp_path / "csv"), pl.loggers.TensorBoardLogger(tmp_path / "tb")]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=loggers, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Lit(), torch.utils.data.DataLoader(data, batch_size=8))
    history = cb.monitor.history.values("sharpness/lambda_max")
    assert [s for s, _ in history] == [2, 4, 6]  # optimizer steps

    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    own = [int(r["step"]) for r in rows if r.get("train_loss")]
    mine = [(int(r["step"]), float(r["sharpness/lambda_max"])) for r in rows if r.get("sharpness/lambda_max")]
    assert own == [0, 1, 2, 3, 4, 5]
    # optimizer step n is Lightning's row n - 1: the same row index as the train_loss of that batch
    assert [s for s, _ in mine] == [s - 1 for s, _ in history]
    assert [v for _, v in mine] == pytest.approx([v for _, v in history], rel=1e-12)

    tb = _scalars(tmp_path / "tb")
    assert [s for s, _ in tb["sharpness/lambda_max"]] == [s for s, _ in mine]
    assert [s for s, _ in tb["train_loss"]] == own
    assert [v for _, v in tb["sharpness/lambda_max"]] == pytest.approx([v for _, v in history], rel=1e-6)
    assert "monitor/overhead_pct" in tb


def test_hf_report_to_tensorboard_gets_the_metrics(tmp_path, monkeypatch):
    from tests.helpers.tiny_text import FirstTokenTask, tiny_bert, trainer_args

    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    cb = SharpnessMonitorCallback(every_n_steps=2, measures=("lambda_max",), alerts=None)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = trainer_args(tmp_path / "out", max_steps=4, report_to=["tensorboard"])
    trainer = SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(48), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    logged = [(h["step"], h["sharpness/lambda_max"]) for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    assert [s for s, _ in logged] == [2, 4]
    tb = _scalars(tmp_path)
    # transformers' TensorBoard callback prefixes training logs with "train/"
    got = tb["train/sharpness/lambda_max"]
    assert [s for s, _ in got] == [2, 4]
    assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]  # the Trainer's own rows, same steps
