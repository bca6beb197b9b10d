"""SharpGuardTrainer(adversarial=...): FreeLB and SMART through the Trainer, alone and with SAM."""

from __future__ import annotations

import copy

import pytest
import torch

import transformers  # noqa: F401
import accelerate  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, params_of, tiny_bert, trainer_args  # noqa: E402

from sharpguard.adversarial import make_method  # noqa: E402
from sharpguard.errors import ConfigurationError  # noqa: E402
from sharpguard.integrations.huggingface import SharpGuardTrainer  # noqa: E402


def _args(tmp_path, **kw):
    return trainer_args(
        tmp_path, **{"max_steps": 2, "learning_rate": 5e-5, "lr_scheduler_type": "constant", "max_grad_norm": 0.0, **kw}
    )


class RecordingTrainer(SharpGuardTrainer):
    def training_step(self, model, inputs, *args, **kwargs):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, *args, **kwargs)


def _train(tmp_path, adversarial, sam=None, lr=0.5):
    model = tiny_bert()
    trainer = RecordingTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=FirstTokenTask(32),
        optimizers=(torch.optim.SGD(model.parameters(), lr=lr), None),
        adversarial=adversarial,
        sam=sam,
    )
    trainer.seen = []
    trainer.train()
    return trainer


# SMART's defaults (eps=1e-5) barely move a 16-wide model in two steps: use a visible radius.
SETTINGS = {"freelb": {"seed": 0}, "smart": {"seed": 0, "eps": 0.5, "step_size": 0.5, "noise": 0.1, "weight": 5.0}}


@pytest.mark.parametrize("name", ["freelb", "smart"])
def test_adversarial_training_step_is_the_methods_gradient(tmp_path, name):
    """Each optimizer step uses exactly the gradient of method(model, batch) (an SGD reference)."""
    trainer = _train(tmp_path, {"method": name, **SETTINGS[name]})
    reference = tiny_bert()
    reference.train()
    method = make_method(name, **SETTINGS[name])
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_losses = []
    for batch in trainer.seen:
        opt.zero_grad()
        loss = method(reference, batch)
        loss.backward()
        opt.step()
        ref_losses.append(float(loss.detach()))
    got, want = params_of(trainer.model), params_of(reference)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(ref_losses, rel=1e-5)
    # and it is not plain training
    plain = tiny_bert()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    for batch in trainer.seen:
        plain_opt.zero_grad()
        plain(**batch).loss.backward()
        plain_opt.step()
    assert any(not torch.allclose(got[k], params_of(plain)[k], atol=1e-7) for k in got)
    # evaluation keeps the model's own loss
    metrics = trainer.evaluate(eval_dataset=FirstTokenTask(16, seed=1))
    model = copy.deepcopy(trainer.model).eval()
    data = FirstTokenTask(16, seed=1)
    with torch.no_grad():
        want_eval = float(model(**{k: torch.stack([data[i][k] for i in range(16)]) for k in data[0]}).loss)
    assert metrics["eval_loss"] == pytest.approx(want_eval, rel=1e-5)


@pytest.mark.parametrize(
    "adversarial",
    [
        # FreeLB's radius is relative to the embedding norm: this model's embeddings have norm ~0.08
        {"method": "freelb", "steps": 2, "alpha": 0.01, "init_mag": 0.002, "seed": 0},
        {"method": "smart", "seed": 0},
    ],
    ids=["freelb", "smart"],
)
def test_adversarial_training_learns_the_synthetic_task(tmp_path, adversarial):
    data = FirstTokenTask(64)
    trainer = SharpGuardTrainer(
        model=tiny_bert(),
        args=_args(tmp_path, max_steps=30, learning_rate=1e-2, logging_steps=10),
        train_dataset=data,
        adversarial=adversarial,
    )
    before = trainer.evaluate(eval_dataset=data)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(eval_dataset=data)["eval_loss"]
    assert before > 0.68 and after < 0.25


def test_sam_and_adversarial_together(tmp_path):
    both = _train(tmp_path / "both", {"method": "smart", **SETTINGS["smart"]}, sam={"rho": 0.5})
    alone = _train(tmp_path / "alone", {"method": "smart", **SETTINGS["smart"]})
    a, b = params_of(both.model), params_of(alone.model)
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    # the first logged loss is the adversarial loss at w in both runs
    la = [h["loss"] for h in both.state.log_history if "loss" in h]
    lb = [h["loss"] for h in alone.state.log_history if "loss" in h]
    assert la[0] == pytest.approx(lb[0], rel=1e-6)


def test_bad_adversarial_settings(tmp_path):
    with pytest.raises(ConfigurationError):
        SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=FirstTokenTask(8), adversarial="nope")
    with pytest.raises(ConfigurationError, match="method"):
        SharpGuardTrainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=FirstTokenTask(8),
                          adversarial={"steps": 2})
