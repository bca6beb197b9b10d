"""No code from a checkpoint: a crafted pickle is refused, never run, through every documented path.

The payload is an object whose ``__reduce__`` makes unpickling call ``open(marker, "w")``: if any
loader runs it, the marker file appears. Each front end gets it where it reads sharpguard's state --
the plain optimizer and monitor (``torch.load(weights_only=True)``), the Hugging Face Trainer's resume,
Lightning's ``ckpt_path``, Accelerate's ``load_state`` with ``register_for_checkpointing`` -- and, for
the framework resumes, in place of every pickled file of the checkpoint folder. A control shows the
payload is live: Accelerate's own loader of registered objects (``weights_only=False``) runs it.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import accelerate  # noqa: F401
import transformers  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, tiny_bert, trainer_args
from sharpguard.errors import CheckpointError


class Payload:
    """Unpickling this calls ``open(marker, "w")`` -- a harmless stand-in for any code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, wrap: bool = True) -> None:
    """Replace ``path`` by a torch.save file whose pickle runs the payload (inside a plausible dict)."""
    torch.save({"sam": {"step": 1, "knobs": {}, "buffers": {},
                        "payload": Payload(marker)}} if wrap else Payload(marker),
               path)


def test_the_payload_is_live(tmp_path):
    """Negative control: an unrestricted load (what Accelerate does for registered objects) runs it."""
    from accelerate.checkpointing import load_custom_state

    class Plain:
        def load_state_dict(self, state):
            self.state = state

    from accelerate import PartialState

    PartialState(cpu=True)  # accelerate's logging needs its state
    marker = tmp_path / "ran"
    _plant(tmp_path / "custom_checkpoint_0.pkl", marker)
    load_custom_state(Plain(), str(tmp_path), 0)
    assert marker.exists()


# --------------------------------------------------------------------------------------------------
# plain PyTorch: SAM.state_dict / load_state_dict and a monitor's state, loaded weights_only
# --------------------------------------------------------------------------------------------------
def test_plain_sam_and_monitor_state_refuse_the_payload(tmp_path):
    import pickle

    import sharpguard as sg
    from sharpguard.monitor import SharpnessMonitor

    model = torch.nn.Linear(3, 2)
    opt = sg.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    monitor = SharpnessMonitor(measures=("batch",), every_n_steps=10,
                               probe=[(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))])
    marker = tmp_path / "ran"
    for name, state in (("sam.pt", opt.state_dict()), ("monitor.pt", monitor.state_dict())):
        state = dict(state)
        state["payload"] = Payload(marker)
        torch.save(state, tmp_path / name)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(tmp_path / name, weights_only=True)  # the documented load (docs/optim.md, monitors.md)
    assert not marker.exists()
    # and what sharpguard itself writes loads that way
    opt.load_state_dict(torch.load(_saved(tmp_path / "ok.pt", opt.state_dict()), weights_only=True))
    monitor.load_state_dict(torch.load(_saved(tmp_path / "ok2.pt", monitor.state_dict()), weights_only=True))


def _saved(path, obj):
    torch.save(obj, path)
    return path


# --------------------------------------------------------------------------------------------------
# Hugging Face Trainer: train(resume_from_checkpoint=...)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    out = tmp_path_factory.mktemp("hf") / "run"
    args = trainer_args(out, max_steps=2, save_strategy="steps", save_steps=2)
    cb = SharpnessMonitorCallback(every_n_steps=100, measures=("batch",), probe_size=8)
    SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(24),
                      sam={"variant": "looksam", "k": 2},
                      callbacks=[cb]).train()
    return out


def _pickled_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl"))


def test_hf_checkpoint_holds_the_files_the_next_test_crafts(hf_run):
    names = _pickled_files(hf_run / "checkpoint-2")
    assert "sharpguard_sam.pt" in names and "optimizer.pt" in names and "rng_state.pth" in names


@pytest.mark.parametrize("name", ["sharpguard_sam.pt", "optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_hf_resume_refuses_a_crafted_file(hf_run, tmp_path, name):
    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    marker = tmp_path / "ran"
    _plant(run / "checkpoint-2" / name, marker)
    args = trainer_args(run, max_steps=3, save_strategy="no")
    cb = SharpnessMonitorCallback(every_n_steps=100, measures=("batch",), probe_size=8)
    trainer = SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(24),
                                sam={"variant": "looksam", "k": 2}, callbacks=[cb])
    with pytest.raises(Exception) as info:
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert not marker.exists()
    if name == "sharpguard_sam.pt":  # sharpguard's own part: one sentence naming the file
        assert isinstance(info.value, CheckpointError)
        assert f"{name} holds objects other than tensors and plain containers" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Lightning: trainer.fit(ckpt_path=...)
# --------------------------------------------------------------------------------------------------
def _fit(callbacks, max_steps, ckpt_path=None):
    from pytorch_lightning.demos import boring_classes

    from sharpguard.integrations._lightning_namespace import pl

    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(boring_classes.BoringModel(), ckpt_path=ckpt_path)
    return trainer


def _callbacks():
    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

    return [SharpnessAwareMinimization(variant="looksam", k=2),
            SharpnessMonitor(every_n_steps=100, measures=("batch",))]


@pytest.mark.parametrize("which", ["SharpnessAwareMinimization", "SharpnessMonitor"])
def test_lightning_ckpt_path_refuses_a_crafted_callback_state(tmp_path, which):
    trainer = _fit(_callbacks(), 2)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    key = next(k for k in ckpt["callbacks"] if k.startswith(which))
    marker = tmp_path / "ran"
    ckpt["callbacks"][key] = {"variant": "looksam", "n_steps": 2,
                              "sam": Payload(marker)} if which.startswith("Sharpness" "Aware") \
        else {"monitor": Payload(marker)}
    torch.save(ckpt, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        _fit(_callbacks(), 4, ckpt_path=str(path))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Accelerate: register_for_checkpointing(sam, monitor) + load_state
# --------------------------------------------------------------------------------------------------
def _accelerate_loop():
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
    from sharpguard.monitor import SharpnessMonitor

    accelerator = Accelerator(cpu=True)
    model = tiny_bert()
    loader = torch.utils.data.DataLoader(FirstTokenTask(16), batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, variant="looksam", k=2, rho=0.5)
    monitor = MonitorStep(accelerator,
                          SharpnessMonitor(measures=("batch",), every_n_steps=100, probe=[next(iter(loader))]))
    accelerator.register_for_checkpointing(sam, monitor)
    for batch in [b for _, b in zip(range(2), loader)]:
        with accelerator.accumulate(model):
            sam.backward(batch)
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(model, optimizer=optimizer)
    return accelerator


@pytest.fixture(scope="module")
def accelerate_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("acc") / "state"
    _accelerate_loop().save_state(str(folder))
    return folder


def test_accelerate_folder_holds_the_files_the_next_test_crafts(accelerate_folder):
    names = _pickled_files(accelerate_folder)
    assert {"custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin", "random_states_0.pkl"} <= set(names)


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "optimizer.bin",
                                  "random_states_0.pkl"])
def test_accelerate_load_state_refuses_a_crafted_file(accelerate_folder, tmp_path, name):
    """Before: a crafted custom_checkpoint_<i>.pkl of a registered sharpguard object ran in load_state."""
    folder = tmp_path / "state"
    shutil.copytree(accelerate_folder, folder)
    marker = tmp_path / "ran"
    _plant(folder / name, marker)
    accelerator = _accelerate_loop()
    if name.startswith("custom_checkpoint_"):  # sharpguard's parts: refused, one sentence naming the file
        with pytest.raises(CheckpointError) as info:
            accelerator.load_state(str(folder))
        who = "SharpnessAwareMinimization" if name.endswith("0.pkl") else "MonitorStep"
        assert (f"{name} holds objects other than tensors and plain containers" in str(info.value)
                and who in str(info.value))
    else:  # Accelerate's own files: its weights_only load refuses them (the RNG state's failure it only logs)
        try:
            accelerator.load_state(str(folder))
        except Exception as exc:  # noqa: BLE001 - whichever error Accelerate raises, the payload must not run
            assert "Weights only load failed" in str(exc)
    assert not marker.exists()


def test_accelerate_without_sharpguards_guard_would_run_the_payload(accelerate_folder, tmp_path):
    """The refusal above is the guard's doing: detach it and Accelerate's own load runs the payload."""
    folder = tmp_path / "state"
    shutil.copytree(accelerate_folder, folder)
    marker = tmp_path / "ran"
    _plant(folder / "custom_checkpoint_0.pkl", marker)
    accelerator = _accelerate_loop()
    for obj in accelerator._custom_objects:
        obj._load_guard.remove()
    with pytest.raises(Exception):  # the planted dict is no SAM state; the payload ran while reading it
        accelerator.load_state(str(folder))
    assert marker.exists()
