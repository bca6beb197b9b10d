"""SharpGuardTrainer: sam= and adversarial= on a one-layer BERT and a synthetic text task (CPU)."""

from __future__ import annotations

import pytest
import torch

import transformers  # noqa: F401
import accelerate  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, params_of, sam_reference, tiny_bert, trainer_args  # noqa: E402
from transformers import Trainer  # noqa: E402

from sharpguard.errors import ConfigurationError  # noqa: E402
from sharpguard.integrations.huggingface import SAMConfig, SharpGuardTrainer  # noqa: E402


def _args(tmp_path, **kw):
    return trainer_args(tmp_path, **kw)


class _Recording:
    """Records the micro-batches the Trainer's loop hands to training_step (the replays bypass it)."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


class RecordingSAMTrainer(_Recording, SharpGuardTrainer):
    seen: list


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sam_changes_training_and_logs_the_clean_loss(tmp_path):
    data = FirstTokenTask(48)
    plain = Trainer(model=tiny_bert(), args=_args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    sam = SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path / "sam"), train_dataset=data, sam={"rho": 0.5})
    sam.train()

    p_plain, p_sam = params_of(plain.model), params_of(sam.model)
    assert any(not torch.equal(p_plain[k], p_sam[k]) for k in p_plain)
    # First step: same weights, same batch -> the logged loss is the loss at w, not at w + e.
    assert _losses(sam)[0] == pytest.approx(_losses(plain)[0], rel=1e-6)
    assert all(torch.isfinite(v).all() for v in p_sam.values())


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_sam_with_gradient_accumulation_equals_hand_written_sam(tmp_path, max_grad_norm):
    """GA=2: both micro-batches are replayed at w + e; the Trainer clips the final (SAM) gradient."""
    model = tiny_bert()
    start = tiny_bert()
    lr, rho = 0.5, 0.2
    args = _args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="constant",
    )
    trainer = RecordingSAMTrainer(
        model=model,
        args=args,
        train_dataset=FirstTokenTask(32),
        optimizers=(torch.optim.SGD(model.parameters(), lr=lr), None),
        sam={"rho": rho},
    )
    # BERT's forward takes **kwargs, so the Trainer assumes the loss is already normalised over the
    # accumulation window and does not divide it; say it is a per-batch mean so GA averages.
    trainer.loss_is_scaled_for_ga = False
    trainer.seen = []
    trainer.train()

    assert len(trainer.seen) == 4  # 2 steps x 2 micro-batches went through the loop once each
    windows = [trainer.seen[0:2], trainer.seen[2:4]]
    ref = sam_reference(start, windows, lr=lr, rho=rho, max_grad_norm=max_grad_norm)
    got, want = params_of(trainer.model), params_of(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # a plain SGD step on the same batches ends elsewhere
    plain = sam_reference(start, windows, lr=lr, rho=0.0, max_grad_norm=max_grad_norm)
    assert any(not torch.allclose(got[k], params_of(plain)[k], atol=1e-6) for k in want)


def test_sam_config_object_and_mixin_on_a_user_trainer(tmp_path):
    class UserTrainer(Trainer):
        """A user's own Trainer subclass that already overrides compute_loss."""

        calls = 0

        def compute_loss(self, model, inputs, *args, **kwargs):
            UserTrainer.calls += 1
            return super().compute_loss(model, inputs, *args, **kwargs)

    from sharpguard.integrations.huggingface import SharpGuardTrainerMixin

    class MyTrainer(SharpGuardTrainerMixin, UserTrainer):
        pass

    trainer = MyTrainer(
        model=tiny_bert(), args=_args(tmp_path, max_steps=2), train_dataset=FirstTokenTask(32), sam=SAMConfig(rho=0.1)
    )
    trainer.train()
    assert UserTrainer.calls == 4  # clean + perturbed pass per step, through the user's override


def test_bad_sam_settings_are_refused_before_training(tmp_path):
    args = _args(tmp_path)
    with pytest.raises(ConfigurationError, match="rho"):
        SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(8), sam={"rho": -1})
    with pytest.raises(ConfigurationError, match="variant"):
        SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(8), sam={"variant": "nope"})
    with pytest.raises(ConfigurationError, match="mapping"):
        SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(8), sam=["sam"])
    with pytest.raises(ConfigurationError, match="did you mean 'alpha'"):  # a typo is refused with the fix
        SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(8),
                          sam={"variant": "gsam", "alpah": 0.1})
    with pytest.raises(ConfigurationError, match="eta"):  # a knob's value is checked by the variant's own rule
        SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(8),
                          sam={"variant": "asam", "eta": -1})


def test_deepspeed_is_refused(tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(ConfigurationError, match="DeepSpeed"):
        SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=FirstTokenTask(8), sam={"rho": 0.05})


@pytest.mark.parametrize(
    "sam",
    [
        {"variant": "asam"},
        {"variant": "gsam", "alpha": 0.2},
        {"variant": "looksam", "k": 2},
        {"variant": "momentum_sam"},
        {"variant": "friendly_sam"},
    ],
    ids=lambda s: s["variant"],
)
def test_every_variant_runs_through_the_trainer(tmp_path, sam):
    data = FirstTokenTask(32)
    plain = Trainer(model=tiny_bert(), args=_args(tmp_path / "p", max_steps=3), train_dataset=data)
    plain.train()
    trainer = SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path / "s", max_steps=3), train_dataset=data, sam=sam)
    trainer.train()
    got, want = params_of(trainer.model), params_of(plain.model)
    assert all(torch.isfinite(v).all() for v in got.values())
    assert any(not torch.equal(got[k], want[k]) for k in got)
    assert trainer.state.global_step == 3


def test_unknown_variant_knob_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigurationError, match="no setting 'alpah'"):
        SharpGuardTrainer(
            model=tiny_bert(), args=_args(tmp_path), train_dataset=FirstTokenTask(8),
            sam={"variant": "gsam", "alpah": 0.1}
        )


def test_missing_transformers_names_the_extra(monkeypatch):
    import importlib
    import sys

    from sharpguard.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "transformers", None)  # "not installed"
    monkeypatch.delitem(sys.modules, "sharpguard.integrations.huggingface", raising=False)
    with pytest.raises(MissingDependencyError, match=r"sharpguard\[hf\]"):
        importlib.import_module("sharpguard.integrations.huggingface")


@pytest.mark.parametrize("how", ["path", "last"])
def test_resume_restores_the_sam_variants_own_state_bitwise(tmp_path, how):
    """LookSAM k=2: step 3 (0-based) reuses the g_v of step 2, so a resume from checkpoint-3 equals the
    uninterrupted run only if g_v and the step counter come back with the checkpoint. (A plain Trainer
    resumes bitwise here too: it restores model, optimizer, scheduler and RNG state.)"""
    out = tmp_path / "run"
    args = _args(out, max_steps=4, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    sam = {"variant": "looksam", "k": 2, "rho": 0.5}
    data = FirstTokenTask(48)
    full = SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=data, sam=sam)
    full.train()
    saved = torch.load(out / "checkpoint-3" / "sharpguard_sam.pt", weights_only=True)
    assert saved["variant"] == "looksam" and saved["step"] == 3 and saved["buffers"]["gv"]

    if how == "last":  # the Trainer also saved the final step: make checkpoint-3 the last one
        import shutil

        for folder in out.glob("checkpoint-*"):
            if folder.name != "checkpoint-3":
                shutil.rmtree(folder)
    resumed = SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=data, sam=sam)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3") if how == "path" else True)
    a, b = params_of(full.model), params_of(resumed.model)
    assert resumed.state.global_step == 4
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fp16_on_a_cpu_is_said_not_silently_ignored(tmp_path):
    import logging

    import transformers

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # transformers' own logger, its default level
    transformers.logging.add_handler(handler)
    try:
        SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path, fp16=True), train_dataset=FirstTokenTask(8),
                          sam={"rho": 0.05})
    finally:
        transformers.logging.remove_handler(handler)
    assert any("fp16=True cannot act on this device" in m for m in seen)
