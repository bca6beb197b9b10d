"""Monitor callbacks in Lightning: side-effect free, logged to CSV, alerts, checkpoint/early-stopping
driven by their metrics, validation under inference mode, resume."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from tests.helpers import lit_digits  # noqa: E402

from sharpguard.integrations.lightning import (  # noqa: E402
    NAMESPACE,
    AdversarialTraining,
    RobustnessMonitor,
    SharpnessAwareMinimization,
    SharpnessMonitor,
)
from sharpguard.monitor import EdgeOfStabilityAlert, read_history  # noqa: E402
from sharpguard.monitor.base import MonitorAlertWarning  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, BATCH = 192, 32


def digits(n: int = N):
    return lit_digits.digits(n)


def loader(shuffle: bool = False, n: int = N, batch_size: int = BATCH):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*digits(n)), batch_size=batch_size,
                                       shuffle=shuffle)


class LitDigits(lit_digits.LitDigits):
    def __init__(self, lr: float = 0.2, dropout: float = 0.0, bn: bool = False):
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32) if bn else nn.Identity(), nn.ReLU(),
                                       nn.Dropout(dropout), nn.Linear(32, 10)), lr=lr)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def trainer(**kw):
    args = dict(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(**args)


def weights(model):
    return [p.detach().clone() for p in model.parameters()] + [b.detach().clone() for b in model.buffers()]


def csv_rows(tmp_path):
    path = next(tmp_path.rglob("metrics.csv"))
    return list(csv.DictReader(open(path)))


def test_monitored_run_trains_bitwise_like_unmonitored(tmp_path):
    # dropout draws from the global RNG and BatchNorm has running stats: both must be left untouched
    def run(callbacks):
        torch.manual_seed(1)
        model = LitDigits(dropout=0.2, bn=True)
        trainer(max_steps=6, callbacks=callbacks).fit(model, loader(shuffle=True))
        return weights(model)

    plain = run([SharpnessAwareMinimization(rho=0.05)])
    monitored = run([
        SharpnessAwareMinimization(rho=0.05),
        SharpnessMonitor(measures=("lambda_max", "eos_ratio", "trace", "batch"), every_n_steps=2, probe_size=32,
                         measure_kwargs={"trace": {"n_hvp": 6}}, history=str(tmp_path / "s.jsonl")),
        RobustnessMonitor(measures=("clean_acc", "fgsm_acc", "pgd_acc", "input_grad_norm"), every_n_steps=3,
                          probe_size=32, eps=0.1, steps=3),
    ])
    for a, b in zip(plain, monitored):
        assert torch.equal(a, b)
    steps = sorted({r["step"] for r in read_history(tmp_path / "s.jsonl", ["sharpness/lambda_max"])})
    assert steps == [2, 4, 6]


def test_csv_logger_gets_the_metrics(tmp_path):
    model = LitDigits()
    t = trainer(max_steps=4, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=2, callbacks=[
        SharpnessMonitor(every_n_steps=2, probe_size=64),
        RobustnessMonitor(every_n_steps=2, probe_size=64, eps=0.1, steps=3),
    ])
    t.fit(model, loader())
    rows = csv_rows(tmp_path)
    lam = [(int(r["step"]), float(r["sharpness/lambda_max"])) for r in rows if r.get("sharpness/lambda_max")]
    pgd = [float(r["robustness/pgd_acc"]) for r in rows if r.get("robustness/pgd_acc")]
    clean = [float(r["robustness/clean_acc"]) for r in rows if r.get("robustness/clean_acc")]
    # checks after optimizer steps 2 and 4 land on the rows Lightning writes for the same batches
    # (its step counter is 0-based: the batch of optimizer step 2 is row 1)
    own = sorted({int(r["step"]) for r in rows if r.get("train_loss")})
    assert own == [1, 3]
    assert [s for s, _ in lam] == own
    assert all(v > 0 for _, v in lam) and len(pgd) == 2
    assert all(0 <= p <= c <= 1 for p, c in zip(pgd, clean))
    assert any(r.get("sharpness/eos_ratio") for r in rows) and any(r.get("monitor/overhead_pct") for r in rows)
    # the value logged is the value measured: recompute lambda_max at the final weights
    from sharpguard.sharpness import hessian_eigenvalues

    x, y = digits(64)
    ref = hessian_eigenvalues(model, [(x, y)], k=1, tol=1e-6, max_iter=60).eigenvalues[0]
    assert lam[-1][1] == pytest.approx(ref, rel=1e-2)


def test_edge_of_stability_alert_fires_and_stops(tmp_path):
    from sharpguard.sharpness import hessian_eigenvalues

    x, y = digits(64)
    probe = [(x, y)]
    lam = hessian_eigenvalues(LitDigits(), probe, k=1, tol=1e-6, max_iter=60).eigenvalues[0]
    lr = 3.0 / lam  # above 2 / lambda_max: full-batch gradient descent on the probe is unstable
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    monitor = SharpnessMonitor(every_n_steps=1, probe=probe, alerts=[EdgeOfStabilityAlert(patience=2)],
                               on_alert=["warn", "stop"])
    t = trainer(max_steps=30, logger=pl.loggers.CSVLogger(tmp_path), callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(LitDigits(lr=lr), data)
    alerts = [w for w in caught if issubclass(w.category, MonitorAlertWarning)]
    assert alerts and "edge of stability" in str(alerts[0].message)
    assert t.global_step < 30  # stopped by the alert
    rows = csv_rows(tmp_path)
    flags = [float(r["alert/eos"]) for r in rows if r.get("alert/eos")]
    ratios = [float(r["sharpness/eos_ratio"]) for r in rows if r.get("sharpness/eos_ratio")]
    assert flags[-1] == 1.0 and ratios[0] > 1.0


def test_stable_run_raises_no_alert():
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=64, alerts=[EdgeOfStabilityAlert(patience=2)],
                               on_alert="stop")
    t = trainer(max_steps=4, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(LitDigits(lr=0.05), loader())
    assert t.global_step == 4 and not [w for w in caught if issubclass(w.category, MonitorAlertWarning)]


def test_model_checkpoint_and_early_stopping_on_pgd_accuracy(tmp_path):
    robust = RobustnessMonitor(every_n_steps=2, probe_size=64, eps=0.1, steps=3, history=str(tmp_path / "r.jsonl"))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="robustness/pgd_acc", mode="max",
                                        every_n_train_steps=2, save_top_k=1)
    # min_delta larger than any possible change: the metric never "improves", so training stops
    stop = pl.callbacks.EarlyStopping(monitor="robustness/pgd_acc", mode="max", patience=1, min_delta=2.0,
                                      check_on_train_epoch_end=True)
    t = trainer(max_steps=-1, max_epochs=6, callbacks=[robust, ckpt, stop], enable_checkpointing=True)
    t.fit(LitDigits(lr=0.5), loader())
    pgd = read_history(tmp_path / "r.jsonl", ["robustness/pgd_acc"])
    assert float(ckpt.best_model_score) == pytest.approx(max(r["value"] for r in pgd))
    assert t.current_epoch < 6 and stop.stopped_epoch > 0


def test_robustness_monitor_under_validate_inference_mode():
    model = LitDigits()
    monitor = RobustnessMonitor(when="validation", probe_size=64, eps=0.1, steps=3, measures=("clean_acc", "pgd_acc"))
    class SeeMode(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.inference = torch.is_inference_mode_enabled()

    see = SeeMode()
    t = trainer(callbacks=[see, monitor])
    t.validate(model, loader(n=64, batch_size=32))
    assert see.inference  # the check really ran inside torch.inference_mode
    x, y = digits(64)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    assert t.callback_metrics["robustness/clean_acc"].item() == pytest.approx(clean)
    assert t.callback_metrics["robustness/pgd_acc"].item() <= clean


def test_resume_restores_monitor_state(tmp_path):
    def build():
        return [SharpnessMonitor(every_n_steps=2, probe_size=32, name="a"),
                SharpnessMonitor(measures=("trace",), every_n_steps=3, probe_size=32, name="b",
                                 measure_kwargs={"trace": {"n_hvp": 6}})]

    first = build()
    t = trainer(max_steps=-1, max_epochs=1, callbacks=first)
    t.fit(LitDigits(), loader())
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    keys = [k for k in ckpt["callbacks"] if k.startswith("SharpnessMonitor")]
    assert len(keys) == 2  # two instances, two state keys
    second = build()
    t2 = trainer(max_steps=-1, max_epochs=2, callbacks=second)
    t2.fit(LitDigits(), loader(), ckpt_path=path)
    a0, a1 = first[0].monitor, second[0].monitor
    steps = [r["step"] for r in a1.history.records if r["metric"] == "sharpness/lambda_max"]
    assert steps == [2, 4, 6, 8, 10, 12]  # the history tail continued after the resume, no repeats
    assert a1.probe.fingerprint == a0.probe.fingerprint  # the same probe examples after the resume
    assert second[1].monitor.schedule.n_checks == 4


def test_adversarial_training_callback_replaces_the_gradient():
    from sharpguard.adversarial import make_method

    model = LitDigits()
    cb = AdversarialTraining("pgd-at", eps=0.1, alpha=0.05, steps=2, seed=0)
    trainer(max_steps=2, callbacks=[cb]).fit(model, loader())
    assert cb.n_steps == 2
    # the same two steps by hand: SGD on method(model, batch)'s gradient (a fresh method: same random starts)
    method = make_method("pgd-at", eps=0.1, alpha=0.05, steps=2, seed=0)
    ref = LitDigits()
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for i, batch in zip(range(2), loader()):
        opt.zero_grad()
        method(ref, batch).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_validation_set_smaller_than_the_probe_measures_what_it_holds_and_says_so():
    cb = RobustnessMonitor(when="validation", probe_size=256, eps=0.1, steps=2, alerts=None)
    t = trainer(max_steps=2, val_check_interval=2, callbacks=[cb])
    with pytest.warns(UserWarning, match="holds 40 of the 256"):
        t.fit(LitDigits(), loader(), loader(n=40, batch_size=20))
    assert len(cb.monitor.probe) == 40
    assert 0.0 <= t.callback_metrics["robustness/clean_acc"].item() <= 1.0
    notes = [r for r in cb.monitor.history.records if r["metric"] == "monitor/note"]
    assert len(notes) == 1 and "40 of the 256" in notes[0]["settings"]["reason"]


def test_training_set_smaller_than_a_fixed_probe_measures_after_one_epoch():
    cb = SharpnessMonitor(probe_size=500, every_n_steps=1, measures=("lambda_max",), alerts=None)
    t = trainer(max_steps=-1, max_epochs=2, callbacks=[cb])
    with pytest.warns(UserWarning, match="192 of the 500"):
        t.fit(LitDigits(), loader())
    steps = [s for s, _ in cb.monitor.history.values("sharpness/lambda_max")]
    assert steps and steps[0] == 7  # the first step of the second epoch (6 batches an epoch)


class _DictDigits(LitDigits):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])


def _dict_loader():
    x, y = digits()
    data = [{"image": x[i], "label": y[i]} for i in range(len(x))]
    return torch.utils.data.DataLoader(data, batch_size=BATCH)


def test_robustness_keys_of_dict_batches_fail_at_the_first_step_or_measure():
    bad = RobustnessMonitor(every_n_steps=2, eps=0.1, steps=2, input_key="img")
    t = trainer(max_steps=4, callbacks=[bad])
    from sharpguard.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="input_key"):
        t.fit(_DictDigits(), _dict_loader())
    assert t.global_step == 1  # refused on the first captured batch, not after an epoch
    good = RobustnessMonitor(every_n_steps=2, eps=0.1, steps=2, probe_size=32, alerts=None)  # keys found by name
    t = trainer(max_steps=2, callbacks=[good])
    t.fit(_DictDigits(), _dict_loader())
    assert 0.0 <= t.callback_metrics["robustness/pgd_acc"].item() <= t.callback_metrics["robustness/clean_acc"].item()


def test_console_lines_say_what_is_active_and_what_it_spent(caplog, monkeypatch):
    import logging

    # Lightning stops its logger propagating when it is first imported without a root handler, and other
    # libraries' tests adjust levels (which depends on test order): open the chain from Lightning's
    # rank-zero logger up to caplog's root handler for this test
    name = f"{NAMESPACE}.utilities.rank_zero"
    for logger_name in (NAMESPACE.split(".")[0], NAMESPACE, f"{NAMESPACE}.utilities", name):
        logger = logging.getLogger(logger_name)
        monkeypatch.setattr(logger, "propagate", True)
        monkeypatch.setattr(logger, "disabled", False)
        monkeypatch.setattr(logger, "level", logging.NOTSET)
    from importlib import import_module

    monkeypatch.setattr(import_module(f"{NAMESPACE}.utilities.rank_zero").rank_zero_only, "rank", 0)
    cb = SharpnessMonitor()
    with caplog.at_level(logging.INFO):
        trainer(max_steps=4, callbacks=[cb]).fit(LitDigits(), loader())
    text = caplog.text
    assert "SharpnessMonitor measures lambda_max, eos_ratio" in text and "training steps per check" in text
    assert f"made {cb.monitor.schedule.n_checks} checks" in text and "monitor/overhead_pct" in text
    assert cb.monitor.schedule.n_checks >= 1  # the default schedule checks early


def test_manual_optimization_modules_get_the_default_loss_and_are_told():
    class Manual(LitDigits):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return loss

    cb = SharpnessMonitor(every_n_steps=2, measures=("lambda_max",), alerts=None)
    with pytest.warns(UserWarning, match="manual optimization"):
        trainer(max_steps=2, callbacks=[cb]).fit(Manual(), loader())
    assert cb.monitor.history.values("sharpness/lambda_max")
