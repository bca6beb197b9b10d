"""Periodic, budgeted, side-effect-free sharpness and robustness monitors (framework-agnostic).

A monitor owns a frozen probe set, a schedule, a list of measures, alert rules and a JSON-lines
history. Framework adapters (Lightning, Hugging Face Trainer, Accelerate, a plain loop) only call
the methods below; they never need to know what is measured.

Adapter-facing API
------------------
::

    from sharpguard.monitor import SharpnessMonitor, RobustnessMonitor

    mon = SharpnessMonitor(measures=("lambda_max", "eos_ratio"), every_n_steps=None, budget=0.05,
                           probe=None, probe_size=256, seed=0, history="run/sharpness.jsonl",
                           alerts="default", on_alert="warn")

    # 1. probe set (frozen, seeded). Either given (probe=[batches]) or captured from batches that
    #    training ALREADY drew -- never iterate the training DataLoader again:
    mon.capture(batch)              # copies/detaches examples until probe_size are held; cheap no-op after
    mon.probe_ready -> bool
    #    or taken from a dataset by index with the monitor's own generator:
    mon.set_probe(ProbeSet.from_dataset(dataset, size=256, seed=0, batch_size=64))

    # 2. after every optimizer step (not on accumulation micro-steps), on every rank:
    metrics = mon.on_step_end(step, model, optimizer=None, loss=None, batch=None, started=None)
    #    -> dict[str, float]; empty on steps the schedule skips (cost: one perf_counter()).
    #    `started`: time.perf_counter() when the adapter's hook began; the hook's time up to the
    #    return (and up to mon.schedule.leave(), which the adapter calls after logging) is counted
    #    as the monitor's in monitor/overhead_pct and in the budget, not as training time.
    #    When it runs: {"sharpness/lambda_max": ..., "sharpness/eos_ratio": ..., "monitor/n_hvp": ...,
    #    "monitor/overhead_pct": ..., "alert/eos": 0.0 or 1.0, ...}. Log them with the framework's logger.
    #    `loss` (a tensor, not .item()'d: no host sync on skipped steps) feeds the loss-spike alert;
    #    `batch` is captured if the probe set is not complete yet.
    mon.should_stop -> bool         # True once an alert with action "stop" fired; the adapter stops training
    mon.last_alerts -> list[Alert]  # alerts fired by the latest check (already warned / dispatched)

    # a check now, ignoring the schedule (e.g. at validation end; works under torch.inference_mode):
    metrics = mon.check(step, model, optimizer=None)     # + alerts, history, overhead
    metrics = mon.measure(model, optimizer=None)         # the raw measures only

    # 3. adapters and distributed runs: drive the monitor through the framework-free driver, which owns
    #    step counting (micro-batches ignored), hook timing, rank-0 history, the one schedule-broadcast
    #    rule (rank 0's next step when the schedule changed: collectives at check steps only) and the
    #    averaging of measured values over ranks:
    driver = MonitorDriver(mon, comm=torch_comm(), is_rank_zero=rank == 0)
    metrics = driver.step(model, step=global_step, optimizer=opt, loss=loss, batch=batch, started=t0)
    driver.leave()                  # after logging: the hook's time is the monitor's

    # 4. checkpoints: plain Python / tensor containers, loadable with torch.load(weights_only=True)
    state = mon.state_dict(); mon.load_state_dict(state)

Metric names are exactly docs/design.md's (``sharpness/lambda_max``, ``sharpness/lambda_min``,
``sharpness/trace``, ``sharpness/eos_ratio``, ``sharpness/worst_case``,
``sharpness/adaptive_worst_case``, ``sharpness/average``, ``sharpness/batch``,
``robustness/clean_acc``, ``robustness/fgsm_acc``, ``robustness/pgd_acc``,
``robustness/input_grad_norm``, ``monitor/overhead_pct``, ``monitor/n_hvp``), plus ``alert/<name>``
flags (1.0 while an alert is active). The robustness monitor reports its own share of training time as
``monitor/robustness_overhead_pct`` so two monitors in one run do not overwrite one key.

History: one JSON object per line, ``{"step": int, "metric": str, "value": float, "settings": {...}}``
(:class:`MetricHistory`, :func:`read_history`): the input of ``sharpguard report``.

Promise (docs/design.md, promise 1): a monitor leaves parameters, ``.grad``, ``requires_grad``, buffers, modes and
the global RNG exactly as it found them, so a monitored run trains to bitwise the same weights.
"""

from __future__ import annotations

from .alerts import (
    Alert,
    AlertRule,
    CatastrophicOverfittingAlert,
    EdgeOfStabilityAlert,
    LossSpikeAlert,
    SurgeAlert,
    default_robustness_alerts,
    default_sharpness_alerts,
)
from .base import Monitor
from .driver import Comm, LocalComm, MonitorDriver, torch_comm
from .history import MetricHistory, read_history
from .probe import ProbeSet
from .robustness_monitor import RobustnessMonitor
from .schedule import Schedule
from .sharpness_monitor import SharpnessMonitor

__all__ = [
    "Alert",
    "AlertRule",
    "CatastrophicOverfittingAlert",
    "Comm",
    "LocalComm",
    "MonitorDriver",
    "EdgeOfStabilityAlert",
    "LossSpikeAlert",
    "MetricHistory",
    "Monitor",
    "ProbeSet",
    "RobustnessMonitor",
    "Schedule",
    "SharpnessMonitor",
    "SurgeAlert",
    "default_robustness_alerts",
    "default_sharpness_alerts",
    "read_history",
    "torch_comm",
]
