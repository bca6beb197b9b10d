"""Monitor callbacks on any Trainer: bitwise side-effect free, metrics in log_history, resume."""

from __future__ import annotations

import json

import pytest
import torch

import transformers  # noqa: F401
import accelerate  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, params_of, tiny_bert, trainer_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from sharpguard.integrations.huggingface import (  # noqa: E402
    RobustnessMonitorCallback,
    SharpGuardTrainer,
    SharpnessMonitorCallback,
)


def _args(tmp_path, **kw):
    return trainer_args(tmp_path, **{"max_steps": 4, **kw})


def _monitor(**kw):
    return SharpnessMonitorCallback(every_n_steps=2, measures=("lambda_max",), probe_size=16, alerts=None, **kw)


def test_monitored_plain_trainer_equals_unmonitored_bitwise_and_logs_lambda_max(tmp_path):
    data = FirstTokenTask(48)
    plain = Trainer(model=tiny_bert(), args=_args(tmp_path / "a"), train_dataset=data)
    plain.train()
    cb = _monitor()
    # a plain transformers.Trainer: callbacks are not given their Trainer, so the user hands it over
    monitored = Trainer(model=tiny_bert(), args=_args(tmp_path / "b"), train_dataset=data, callbacks=[cb])
    cb.set_trainer(monitored)
    monitored.train()

    a, b = params_of(plain.model), params_of(monitored.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [(h["step"],
               h["sharpness/lambda_max"]) for h in monitored.state.log_history if "sharpness/lambda_max" in h]
    assert [s for s, _ in logged] == [2, 4]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in logged)
    assert cb.trainer is monitored
    # the losses logged by the Trainer are untouched too
    assert [h["loss"] for h in plain.state.log_history if "loss" in h] == [
        h["loss"] for h in monitored.state.log_history if "loss" in h
    ]

    # The value is the top Hessian eigenvalue of model(**batch).loss on the probe (through SDPA
    # attention): measure the final model directly on the same probe set.
    from sharpguard.sharpness import hessian_eigenvalues

    r = hessian_eigenvalues(monitored.model, cb.monitor.probe.batches, k=1, tol=1e-6, max_iter=200)
    assert logged[-1][1] == pytest.approx(r.eigenvalues[0], rel=1e-3, abs=1e-4)


def test_monitor_history_survives_checkpoint_resume(tmp_path):
    data = FirstTokenTask(48)
    out = tmp_path / "run"
    full_cb = _monitor()
    full = SharpGuardTrainer(
        model=tiny_bert(), args=_args(out, save_strategy="steps", save_steps=2), train_dataset=data, callbacks=[full_cb]
    )
    full.train()
    # the state lives in transformers' own callback state: trainer_state.json's stateful_callbacks
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    entry = saved["SharpnessMonitorCallback"]
    assert entry["args"] == {"restore_into": full_cb.state_key}
    assert [r["step"] for r in entry["attributes"]["sharpguard_state"]["monitor"]["history"]["records"]
            if r["metric"] == "sharpness/lambda_max"] == [2]

    resumed_cb = _monitor()
    resumed = SharpGuardTrainer(
        model=tiny_bert(), args=_args(out, save_strategy="steps", save_steps=2), train_dataset=data,
        callbacks=[resumed_cb]
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    want = full_cb.monitor.history.values("sharpness/lambda_max")
    got = resumed_cb.monitor.history.values("sharpness/lambda_max")
    assert [s for s, _ in got] == [2, 4]
    assert got[0] == want[0]  # step 2 comes from the checkpoint, not re-measured
    assert got[1][1] == pytest.approx(want[1][1], rel=1e-4)
    # the probe set is drawn again from the dataset with the same seed: same examples
    assert resumed_cb.monitor.probe.fingerprint == full_cb.monitor.probe.fingerprint


def test_restore_callback_states_flag_restores_the_live_callback_in_place(tmp_path):
    """With restore_callback_states_from_checkpoint=True the Trainer rebuilds callbacks from their
    state's args: the user's configured instance is reused, not replaced by a default one."""
    data = FirstTokenTask(48)
    out = tmp_path / "run"
    SharpGuardTrainer(model=tiny_bert(), args=_args(out, save_strategy="steps", save_steps=2), train_dataset=data,
                      callbacks=[_monitor(name="flag")]).train()
    cb = _monitor(name="flag")
    trainer = SharpGuardTrainer(model=tiny_bert(),
                                args=_args(tmp_path / "new", restore_callback_states_from_checkpoint=True),
                                train_dataset=data, callbacks=[cb])
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert cb in trainer.callback_handler.callbacks
    assert [s for s, _ in cb.monitor.history.values("sharpness/lambda_max")] == [2, 4]


def test_plain_trainer_without_set_trainer_logs_into_log_history(tmp_path):
    """The one line works: without its trainer the callback writes the rows Trainer.log would write
    (tests/integrations/test_frontend_messages.py checks what it says about the rest)."""
    cb = _monitor()
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=FirstTokenTask(48), callbacks=[cb])
    trainer.train()
    rows = [h for h in trainer.state.log_history if "sharpness/lambda_max" in h]
    assert [r["step"] for r in rows] == [2, 4] and all("epoch" in r for r in rows)
    assert [v for _,
            v in cb.monitor.history.values("sharpness/lambda_max")] == [r["sharpness/lambda_max"] for r in rows]


def test_robustness_callback_clean_accuracy_on_a_text_model(tmp_path):
    cb = RobustnessMonitorCallback(
        every_n_steps=2, measures=("clean_acc",), probe_size=16, alerts=None, input_key="input_ids"
    )
    trainer = SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path, max_steps=2), train_dataset=FirstTokenTask(32),
                                callbacks=[cb])
    trainer.train()
    acc = [h["robustness/clean_acc"] for h in trainer.state.log_history if "robustness/clean_acc" in h]
    assert len(acc) == 1
    # independent check: accuracy of the final model on the probe examples (no attention mask: all ones)
    batches = cb.monitor.probe.batches
    assert sum(len(y) for _, y in batches) == 16
    model = trainer.model.eval()
    with torch.no_grad():
        hits = sum(int((model(input_ids=x).logits.argmax(-1) == y).sum()) for x, y in batches)
    want = hits / 16
    assert acc[0] == pytest.approx(want)


def test_robustness_callback_refuses_input_attacks_on_token_ids(tmp_path):
    from sharpguard.errors import ConfigurationError

    cb = RobustnessMonitorCallback(every_n_steps=1, measures=("pgd_acc",), probe_size=8, input_key="input_ids")
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, max_steps=1), train_dataset=FirstTokenTask(16),
                      callbacks=[cb])
    cb.set_trainer(trainer)
    with pytest.raises(ConfigurationError, match="token ids"):
        trainer.train()


def test_monitor_history_resumes_from_a_checkpoint_stored_outside_output_dir(tmp_path):
    """The state comes with the trainer_state.json of the folder training resumes from, wherever it is,
    for SharpGuardTrainer and for a plain Trainer alike."""
    import shutil

    data = FirstTokenTask(48)
    full_cb = _monitor()
    SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path / "run", save_strategy="steps", save_steps=2),
                      train_dataset=data, callbacks=[full_cb]).train()
    elsewhere = tmp_path / "archive" / "step2"
    shutil.move(str(tmp_path / "run" / "checkpoint-2"), str(elsewhere))
    want = full_cb.monitor.history.values("sharpness/lambda_max")

    for kind in ("sharpguard", "plain"):
        cb = _monitor()
        cls = SharpGuardTrainer if kind == "sharpguard" else Trainer
        trainer = cls(model=tiny_bert(), args=_args(tmp_path / kind), train_dataset=data, callbacks=[cb])
        cb.set_trainer(trainer)
        trainer.train(resume_from_checkpoint=str(elsewhere))
        got = cb.monitor.history.values("sharpness/lambda_max")
        assert [s for s, _ in got] == [2, 4] and got[0] == want[0], kind  # step 2 from the checkpoint
