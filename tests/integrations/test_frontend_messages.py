"""Every front end says what it does, through the framework's own channel.

Hugging Face: sharpguard's lines go to transformers' library logger, so
``transformers.logging.set_verbosity_info()`` and ``TrainingArguments(log_level=...)`` reach them;
warnings (no check made, ``every_n_steps`` longer than the run, ``fp16=True`` on a CPU, a plain
Trainer whose callback cannot reach ``report_to``) show at transformers' default verbosity. The
docs/huggingface.md monitor block runs as written. Accelerate: ``MonitorStep`` logs through
Accelerate's ``get_logger`` on the main process. Lightning: rank-zero info and warnings.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

import transformers
import accelerate  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, tiny_bert, trainer_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"


class _Lines(logging.Handler):
    """The sharpguard lines a logger receives (records that reach the logger it is added to)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level and "sharpguard" in r.getMessage()]


@pytest.fixture
def hf_lines():
    """A handler on transformers' library logger (propagate=False there, so caplog sees nothing), at
    transformers' default verbosity; the verbosity is restored afterwards."""
    handler = _Lines()
    transformers.logging.add_handler(handler)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # transformers' default (other test modules set it to error)
    try:
        yield handler
    finally:
        transformers.logging.remove_handler(handler)
        transformers.logging.set_verbosity(level)


def _doc_block(path: Path, needle: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    (block,) = [b for b in blocks if needle in b]
    return block


def test_the_huggingface_doc_monitor_block_runs_as_written_and_says_what_it_cannot_reach(tmp_path, hf_lines):
    block = _doc_block(DOCS / "huggingface.md", "cb = SharpnessMonitorCallback(")
    transformers.logging.set_verbosity_info()
    scope = {"model": tiny_bert(), "args": trainer_args(tmp_path, max_steps=4), "train": FirstTokenTask(48)}
    exec(compile(block, "docs/huggingface.md", "exec"), scope)  # a plain Trainer, no set_trainer call
    trainer, cb = scope["trainer"], scope["cb"]
    assert type(trainer) is Trainer and cb.trainer is None
    rows = [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    assert [r["step"] for r in rows] == [2]  # the first check, at the first measured step
    assert torch.isfinite(torch.tensor(rows[0]["sharpness/lambda_max"])) and "monitor/first_check_s" in rows[0]
    warned = hf_lines.at(logging.WARNING)
    assert len([w for w in warned if "report_to" in w]) == 1  # said once
    assert "state.log_history" in warned[0] and "set_trainer" in warned[0]
    info = hf_lines.at(logging.INFO)
    assert any("SharpnessMonitor measures lambda_max, trace" in m for m in info)  # what is active, its cost
    # the first check only, no steady state: the end line is a warning
    assert any("made 1 checks; first check at step 2" in m and "the run ended at step 4" in m for m in warned)


def test_the_docs_agree_on_the_plain_trainer():
    hf, monitors = (DOCS / "huggingface.md").read_text(), (DOCS / "monitors.md").read_text()
    for text in (hf, monitors):
        assert "finds the trainer" not in text and "stops at once" not in text
        assert "report_to" in text and "set_trainer" in text and "state.log_history" in text


@pytest.mark.parametrize("how", ["set_verbosity_info", "log_level"])
def test_hf_console_lines_reach_users_who_ask_transformers_for_info(tmp_path, hf_lines, how):
    cb = SharpnessMonitorCallback(measures=("lambda_max",), alerts=None)
    kw = {"log_level": "info"} if how == "log_level" else {}
    if how == "set_verbosity_info":
        transformers.logging.set_verbosity_info()
    trainer = SharpGuardTrainer(model=tiny_bert(), args=trainer_args(tmp_path, max_steps=3, **kw),
                                train_dataset=FirstTokenTask(32), callbacks=[cb], sam={"rho": 0.05})
    trainer.train()
    info = hf_lines.at(logging.INFO)
    assert any("SAM active -- SAM(rho=0.05" in m for m in info) and any("SAM spent --" in m for m in info)
    assert any(m.startswith("sharpguard: SharpnessMonitor measures") for m in info)
    # three steps: the first check only, no steady state, so the end line is the one warning
    assert [m for m in hf_lines.at(logging.WARNING) if m.startswith("sharpguard: SharpnessMonitor made 1 checks")]
    assert not [m for m in hf_lines.at(logging.WARNING) if "made 1 checks" not in m]  # the callback has its trainer


def test_hf_info_lines_stay_quiet_at_the_default_verbosity_but_warnings_show(tmp_path, hf_lines):
    transformers.logging.set_verbosity_warning()
    cb = SharpnessMonitorCallback(every_n_steps=50, measures=("lambda_max",), alerts=None)
    trainer = SharpGuardTrainer(model=tiny_bert(), args=trainer_args(tmp_path, max_steps=3),
                                train_dataset=FirstTokenTask(32), callbacks=[cb])
    with pytest.warns(UserWarning, match=r"every_n_steps=50 exceeds this run's 3 optimizer steps"):
        trainer.train()
    assert not [r for r in hf_lines.records if r.levelno == logging.INFO]
    (note,) = hf_lines.at(logging.WARNING)
    assert "made no check" in note and "every_n_steps=50 is more than the 3 optimizer steps" in note


def test_fp16_on_a_cpu_is_a_warning_with_a_plain_trainer_and_with_sharpguard_trainer(tmp_path, hf_lines):
    args = trainer_args(tmp_path, max_steps=2, fp16=True)
    cb = SharpnessMonitorCallback(measures=("lambda_max",), alerts=None)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(16), callbacks=[cb])
    trainer.train()
    assert len([m for m in hf_lines.at(logging.WARNING) if "fp16=True cannot act on this device (cpu" in m]) == 1
    hf_lines.records.clear()
    cb = SharpnessMonitorCallback(measures=("lambda_max",), alerts=None)
    trainer = SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(16), callbacks=[cb],
                                sam={"rho": 0.05})
    trainer.train()
    # said once: by the trainer at construction, not again by its callback
    assert len([m for m in hf_lines.at(logging.WARNING) if "fp16=True cannot act" in m]) == 1


# ------------------------------------------------------------------------------------------ Accelerate
def _accelerate_loop(monitor_step, sam, accelerator, model, optimizer, loader, steps):
    for _, (x, y) in zip(range(steps), loader):
        with accelerator.accumulate(model):
            loss = sam.backward((x, y))
            optimizer.step()
            optimizer.zero_grad()
            monitor_step.step(model, optimizer=optimizer, loss=loss)


def _accelerate_setup():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader, [(x[:16], y[:16])]


@pytest.mark.usefixtures("_fresh_accelerate_state")
def test_accelerate_says_at_start_and_at_the_end_through_its_logger(caplog):
    from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
    from sharpguard.monitor import SharpnessMonitor

    accelerator, model, optimizer, loader, probe = _accelerate_setup()
    with caplog.at_level(logging.INFO, logger="sharpguard.integrations.accelerate"):
        sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.05)
        step = MonitorStep(accelerator, SharpnessMonitor(measures=("lambda_max",), probe=probe, alerts=None))
        _accelerate_loop(step, sam, accelerator, model, optimizer, loader, steps=4)
        line, spent = step.finish(), sam.finish()
    text = caplog.text
    assert "sharpguard: SAM active -- SAM(rho=0.05" in text and f"sharpguard: {spent}" in text
    assert "sharpguard: SharpnessMonitor measures lambda_max" in text and f"sharpguard: {line}" in text
    assert "made 1 checks; first check at step 2" in line and "the run ended at step 4" in line
    # four steps: the first check only, no steady state, so the end line is the one warning
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned.endswith(f"sharpguard: {line}")


@pytest.mark.usefixtures("_fresh_accelerate_state")
def test_accelerate_warns_when_every_n_steps_exceeds_the_loop_and_when_no_check_was_made(caplog):
    from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
    from sharpguard.monitor import SharpnessMonitor

    accelerator, model, optimizer, loader, probe = _accelerate_setup()
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.05)
    monitor = SharpnessMonitor(measures=("lambda_max",), probe=probe, alerts=None, every_n_steps=5)
    with pytest.warns(UserWarning, match=r"every_n_steps=5 exceeds this run's 3 optimizer steps \(total_steps=3\)"):
        step = MonitorStep(accelerator, monitor, total_steps=3)
    _accelerate_loop(step, sam, accelerator, model, optimizer, loader, steps=3)
    with caplog.at_level(logging.INFO, logger="sharpguard.integrations.accelerate"):
        step.finish()
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "made no check" in warned and "every_n_steps=5 is more than the 3 optimizer steps trained" in warned


# ------------------------------------------------------------------------------------------ Lightning
@pytest.fixture
def lightning_lines(monkeypatch):
    """What Lightning's rank_zero_info says. It logs to whichever package's rank_zero logger was imported last
    (lightning_utilities keeps one module-level `log`: pytorch_lightning's, lightning.pytorch's or
    lightning_fabric's), whose package logger may not propagate to the root (Lightning turns propagation off
    when the root had no handler at its import): read that logger itself, at INFO, with rank-zero logging on."""
    from lightning_utilities.core import rank_zero as rank_zero_module

    from sharpguard.integrations.lightning import NAMESPACE

    __import__(NAMESPACE)  # first: importing Lightning sets rank_zero_module.log and rank_zero_only.rank
    lines = _Lines()
    log = rank_zero_module.log
    log.addHandler(lines)
    monkeypatch.setattr(log, "level", logging.INFO)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    monkeypatch.setattr(rank_zero_module.rank_zero_only, "rank", 0, raising=False)
    try:
        yield lines
    finally:
        log.removeHandler(lines)


def test_lightning_warns_when_every_n_steps_exceeds_max_steps_and_when_no_check_was_made(lightning_lines):
    """On Lightning's own BoringModel: rank-zero warnings at fit start and fit end, info lines between."""
    from sharpguard.integrations.lightning import NAMESPACE, RobustnessMonitor, SharpnessMonitor

    pl = __import__(NAMESPACE, fromlist=["Trainer"])
    demos = __import__(f"{NAMESPACE}.demos.boring_classes", fromlist=["BoringModel"])
    lines = lightning_lines
    sharp = SharpnessMonitor(measures=("lambda_max",), every_n_steps=50, alerts=None, probe_size=2)
    robust = RobustnessMonitor(measures=("clean_acc",), when="validation", alerts=None, probe_size=2,
                               batch_map=lambda b: (b, torch.zeros(len(b), dtype=torch.long)))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, limit_val_batches=2, val_check_interval=2,
                         logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[sharp, robust])
    with pytest.warns(UserWarning) as warned:
        trainer.fit(demos.BoringModel())
    messages = [str(w.message) for w in warned]
    assert any("every_n_steps=50 exceeds this run's 4 optimizer steps (max_steps=4)" in m for m in messages)
    assert any("SharpnessMonitor made no check" in m and "every_n_steps=50 is more than the 4" in m for m in messages)
    text = "\n".join(lines.at(logging.INFO))
    assert "RobustnessMonitor measures clean_acc" in text and "at validation ends (not on the step schedule" in text
    assert "RobustnessMonitor made 2 checks; first check at step 2" in text and "checks ran at validation ends" in text


@pytest.mark.usefixtures("_fresh_accelerate_state")
def test_accelerate_fp16_on_a_cpu_is_a_warning_said_once(caplog):
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
    from sharpguard.monitor import SharpnessMonitor

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert not accelerator.native_amp and accelerator.scaler is None  # Accelerate itself trains fp32 here
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    probe = [(torch.randn(4, 4), torch.randint(0, 2, (4,)))]
    with caplog.at_level(logging.WARNING, logger="sharpguard.integrations.accelerate"):
        SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.05)
        MonitorStep(accelerator, SharpnessMonitor(measures=("lambda_max",), probe=probe, alerts=None))
    said = [r.getMessage() for r in caplog.records if "mixed_precision='fp16' cannot act on cpu" in r.getMessage()]
    assert len(said) == 1 and "sharpguard: " in said[0]  # Accelerate prefixes the rank


def test_lightning_estimates_the_run_from_the_stepping_batches_without_max_steps():
    from sharpguard.integrations.lightning import NAMESPACE, SharpnessMonitor

    pl = __import__(NAMESPACE, fromlist=["Trainer"])
    demos = __import__(f"{NAMESPACE}.demos.boring_classes", fromlist=["BoringModel"])
    sharp = SharpnessMonitor(measures=("lambda_max",), every_n_steps=10, alerts=None, probe_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=0,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[sharp])
    with pytest.warns(UserWarning, match=r"every_n_steps=10 exceeds this run's 3 optimizer steps "
                                         r"\(trainer.estimated_stepping_batches\)"):
        trainer.fit(demos.BoringModel())
    assert trainer.global_step == 3 and sharp.monitor.schedule.n_checks == 0


def test_lightning_says_when_the_first_check_is_done(lightning_lines):
    """Like the HF Trainer and Accelerate: one rank-zero line right after the (quick) first check, quoting the
    value the loggers received, and none after later checks."""
    from sharpguard.integrations.lightning import NAMESPACE, SharpnessMonitor

    pl = __import__(NAMESPACE, fromlist=["Trainer"])
    demos = __import__(f"{NAMESPACE}.demos.boring_classes", fromlist=["BoringModel"])
    sharp = SharpnessMonitor(measures=("lambda_max",), alerts=None, probe_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[sharp])
    trainer.fit(demos.BoringModel())
    (line,) = [m for m in lightning_lines.at(logging.INFO) if "first check done" in m]
    (first_step, first_value), *_ = sharp.monitor.history.values("sharpness/lambda_max")
    assert line.startswith(f"sharpguard: first check done: lambda_max={first_value:.4g} in ") and " s (quick, " in line
    assert f"SharpnessMonitor at step {first_step};" in line
