"""The HF Trainer and Accelerate front ends say, through their own channels, when the first (quick)
check is done (its measure, value and seconds), and end with the overhead line at WARNING when there is
no steady state or it is over the budget, at INFO otherwise - as Lightning's rank-zero lines do."""

from __future__ import annotations

import logging

import pytest
import torch

import accelerate  # noqa: F401
import transformers
from transformers import BertConfig, BertForSequenceClassification, TrainerControl, TrainerState, TrainingArguments

from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback
from sharpguard.monitor import SharpnessMonitor

ACCELERATE_LOGGER = "sharpguard.integrations.accelerate"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int, needle: str) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level and needle in r.getMessage()]


@pytest.fixture
def hf_records():
    """What reaches transformers' library logger (it does not propagate, so caplog sees nothing)."""
    handler = _Records()
    transformers.logging.add_handler(handler)
    level = transformers.logging.get_verbosity()
    try:
        yield handler
    finally:
        transformers.logging.remove_handler(handler)
        transformers.logging.set_verbosity(level)


class _FirstToken(torch.utils.data.Dataset):
    """Label = whether the first token id is below 55 (a task a one-layer BERT learns)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(10, 100, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[0] < 55).long()}


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2))


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8,
                             learning_rate=1e-2, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
                             logging_steps=100, **kw)


def _schedule_state(monitor: SharpnessMonitor, *, n_checks: int, steady_s: float, steady_train_s: float) -> dict:
    """A schedule after ``n_checks`` checks: a 0.5 s first check at step 2 after 1 s of training, then
    ``steady_s`` s of monitor time over ``steady_train_s`` s of training."""
    state = monitor.schedule.state_dict()
    state.update(n_checks=n_checks, first_check_seconds=0.5, first_check_step=2, setup_seconds=[0.5, 1.0],
                 monitor_seconds=0.5 + steady_s, train_seconds=1.0 + steady_train_s, step_seconds=0.1, last_cost=0.5)
    return state


# ------------------------------------------------------------------------------------- HF Trainer
def test_hf_first_check_line_quotes_the_logged_value_and_seconds_and_the_end_line_warns_without_steady_state(
        tmp_path, hf_records):
    transformers.logging.set_verbosity_info()
    cb = SharpnessMonitorCallback(measures=("lambda_max",), alerts=None)
    trainer = SharpGuardTrainer(model=_bert(), args=_args(tmp_path, max_steps=4), train_dataset=_FirstToken(64),
                                callbacks=[cb], sam={"rho": 0.05})
    trainer.train()
    (row,) = [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    (line,) = hf_records.at(logging.INFO, "first check done")
    assert line.startswith(f"sharpguard: first check done: lambda_max={row['sharpness/lambda_max']:.4g} in "
                           f"{row['monitor/first_check_s']:.2f} s (quick, ")
    assert f"SharpnessMonitor at step {row['step']}" in line
    # four steps: the first check only, no steady state - a warning, seen at transformers' default verbosity
    (end,) = hf_records.at(logging.WARNING, "made 1 checks")
    assert "the run ended at step 4" in end
    assert not hf_records.at(logging.INFO, "made 1 checks")


def test_hf_first_check_line_follows_log_level_and_stays_quiet_at_the_default_verbosity(tmp_path, hf_records):
    transformers.logging.set_verbosity_warning()
    cb = SharpnessMonitorCallback(measures=("lambda_max",), alerts=None)
    SharpGuardTrainer(model=_bert(), args=_args(tmp_path, max_steps=3), train_dataset=_FirstToken(48),
                      callbacks=[cb]).train()
    assert not hf_records.at(logging.INFO, "first check done")
    hf_records.records.clear()
    cb = SharpnessMonitorCallback(measures=("lambda_max",), alerts=None)
    SharpGuardTrainer(model=_bert(), args=_args(tmp_path, max_steps=3, log_level="info"),
                      train_dataset=_FirstToken(48), callbacks=[cb]).train()
    assert len(hf_records.at(logging.INFO, "first check done: lambda_max=")) == 1


@pytest.mark.parametrize("steady_s, n_checks, level", [(1.0, 3, logging.INFO),      # 1% of 100 s: within 5%
                                                        (20.0, 3, logging.WARNING),  # 20%: over the budget
                                                        (0.0, 1, logging.WARNING)])  # no steady state
def test_hf_end_line_level_follows_the_steady_state_against_the_budget(tmp_path, hf_records, steady_s, n_checks,
                                                                       level):
    transformers.logging.set_verbosity_info()
    monitor = SharpnessMonitor(measures=("lambda_max",), probe=[(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))],
                               alerts=None)
    monitor.schedule.load_state_dict(_schedule_state(monitor, n_checks=n_checks, steady_s=steady_s,
                                                     steady_train_s=100.0))
    cb = SharpnessMonitorCallback(monitor=monitor)
    cb.on_train_end(_args(tmp_path), TrainerState(), TrainerControl())
    (end,) = [r for r in hf_records.records if "SharpnessMonitor made" in r.getMessage()]
    assert end.levelno == level
    assert f"{100 * steady_s / 100.0:.1f}% of the 100.0 s of training" in end.getMessage()


# ------------------------------------------------------------------------------------- Accelerate
def _accelerate_run(steps: int):
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import MonitorStep

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step = MonitorStep(accelerator, SharpnessMonitor(measures=("lambda_max",), probe=[(x[:16], y[:16])], alerts=None))
    measured = []
    for _, (xb, yb) in zip(range(steps), loader):
        with accelerator.accumulate(model):
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            measured.append(step.step(model, optimizer=optimizer, loss=loss.detach()))
    return step, [m for m in measured if m]


@pytest.mark.usefixtures("_fresh_accelerate_state")
def test_accelerate_first_check_line_quotes_the_returned_metrics_and_the_end_line_warns_without_steady_state(caplog):
    with caplog.at_level(logging.INFO, logger=ACCELERATE_LOGGER):
        step, measured = _accelerate_run(steps=4)
        step.finish()
    first = measured[0]
    (line,) = [r for r in caplog.records if "first check done" in r.getMessage()]
    assert line.levelno == logging.INFO
    # Accelerate's adapter may put "[RANK 0] " in front
    assert (f"sharpguard: first check done: lambda_max={first['sharpness/lambda_max']:.4g} "
            f"in {first['monitor/first_check_s']:.2f} s (quick, ") in line.getMessage()
    (end,) = [r for r in caplog.records if "SharpnessMonitor made 1 checks" in r.getMessage()]
    assert end.levelno == logging.WARNING and "the run ended at step 4" in end.getMessage()


@pytest.mark.usefixtures("_fresh_accelerate_state")
@pytest.mark.parametrize("steady_s, n_checks, level", [(1.0, 3, logging.INFO), (20.0, 3, logging.WARNING),
                                                        (0.0, 1, logging.WARNING)])
def test_accelerate_end_line_level_follows_the_steady_state_against_the_budget(caplog, steady_s, n_checks, level):
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import MonitorStep

    monitor = SharpnessMonitor(measures=("lambda_max",), probe=[(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))],
                               alerts=None)
    step = MonitorStep(Accelerator(cpu=True), monitor)
    monitor.schedule.load_state_dict(_schedule_state(monitor, n_checks=n_checks, steady_s=steady_s,
                                                     steady_train_s=100.0))
    with caplog.at_level(logging.INFO, logger=ACCELERATE_LOGGER):
        line = step.finish()
    (end,) = [r for r in caplog.records if "SharpnessMonitor made" in r.getMessage()]
    assert end.levelno == level and end.getMessage().endswith(f"sharpguard: {line}")
    assert f"{100 * steady_s / 100.0:.1f}% of the 100.0 s of training" in end.getMessage()


def test_the_first_check_line_is_said_once():
    """Only right after the first check: later checks give no line (the core rule both front ends use)."""
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    model = torch.nn.Linear(3, 2)
    monitor = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None, every_n_steps=1)
    lines = [monitor.first_check_line(monitor.on_step_end(s, model)) for s in (1, 2, 3)]
    assert lines[0] is not None and lines[0].startswith("first check done: lambda_max=")
    assert "(full, 16 probe examples" in lines[0] and lines[1:] == [None, None]
