"""Resume is all or nothing, and every file sharpguard writes whole is written atomically.

A checkpoint whose sharpguard part is missing, truncated or malformed is refused with one sentence
naming the file and the way to continue without it (``sam_resume="current"`` / ``resume="current"``),
before anything is loaded -- in the Hugging Face Trainer, Lightning (``ckpt_path``) and Accelerate
(``load_state``) alike; ``"current"`` continues and says so. Real frameworks throughout: a BERT built
from a config, Lightning's ``BoringModel``, an ``Accelerator`` on CPU.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accelerate  # noqa: F401
import transformers  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, params_of, tiny_bert, trainer_args
from sharpguard._atomic import atomic_open, atomic_torch_save, atomic_write_text, load_tensors_only
from sharpguard.errors import CheckpointError, ConfigurationError


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncate(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------
def test_atomic_write_keeps_the_old_file_when_the_disk_fails(tmp_path, monkeypatch):
    path = tmp_path / "part.txt"
    atomic_write_text(path, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new and longer")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.txt"]  # no temporary file left behind


def test_atomic_write_of_a_body_that_raises_leaves_no_file(tmp_path):
    path = tmp_path / "report.json"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write("{\"a\": ")
            raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []


def test_atomic_torch_save_of_an_unpicklable_object_leaves_the_previous_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"step": 2, "fn": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_atomic_write_replaces_a_planted_symlink_instead_of_following_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "summary.json").symlink_to(outside)
    atomic_write_text(folder / "summary.json", "{}")
    assert outside.read_text() == "keep me"
    assert not (folder / "summary.json").is_symlink() and (folder / "summary.json").read_text() == "{}"


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "not a checkpoint", "a folder"])
def test_load_tensors_only_names_the_file_and_the_way_on(tmp_path, damage):
    path = tmp_path / "part.pt"
    atomic_torch_save({"w": torch.arange(1000.0)}, path)
    if damage == "missing":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        _truncate(path)
    elif damage == "a folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_text("hello")
    with pytest.raises(CheckpointError) as info:
        load_tensors_only(path, what="the test's state", to_continue="Do X to go on.")
    msg = str(info.value)
    assert str(path) in msg and "the test's state" in msg and msg.endswith("Do X to go on.")
    assert ("missing" in msg) == (damage == "missing")
    assert isinstance(info.value, ConfigurationError)  # one family of sharpguard errors


_SAM_PART = None


def _sam_part_bytes() -> bytes:
    """A real SAM part (LookSAM with its g_v buffer), as sharpguard_state_dict writes it."""
    global _SAM_PART
    if _SAM_PART is None:
        import io

        import sharpguard as sg

        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        opt = sg.LookSAM(model.parameters(), torch.optim.SGD, k=2, rho=0.1, lr=0.1)
        x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        buf = io.BytesIO()
        torch.save(opt.sharpguard_state_dict(), buf)
        _SAM_PART = buf.getvalue()
    return _SAM_PART


@settings(max_examples=60, deadline=None)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_torn_part_is_refused_whole_at_every_cut(cut):
    """Law: a prefix of a checkpoint part never loads as a state -- it is refused, as one CheckpointError,
    wherever the write stopped."""
    import tempfile

    data = _sam_part_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sharpguard_sam.pt")
        with open(path, "wb") as fh:
            fh.write(data[: int(len(data) * cut)])
        with pytest.raises(CheckpointError, match="truncated or unreadable"):
            load_tensors_only(path, what="x", to_continue="y")
        with open(path, "wb") as fh:
            fh.write(data)
        assert load_tensors_only(path, what="x", to_continue="y")["step"] == 1


# --------------------------------------------------------------------------------------------------
# Hugging Face Trainer: checkpoint-N/sharpguard_sam.pt
# --------------------------------------------------------------------------------------------------
SAM = {"variant": "looksam", "k": 2, "rho": 0.5}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A 4-step LookSAM run that saved checkpoint-2 and checkpoint-4."""
    from sharpguard.integrations.huggingface import SharpGuardTrainer

    out = tmp_path_factory.mktemp("hf") / "run"
    args = trainer_args(out, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(48), sam=SAM).train()
    return out


def _hf_resume(hf_run, tmp_path, damage, **kw):
    from sharpguard.integrations.huggingface import SharpGuardTrainer

    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    ckpt = run / "checkpoint-2"
    part = ckpt / "sharpguard_sam.pt"
    if damage == "missing":
        part.unlink()
    elif damage == "truncated":
        _truncate(part)
    args = trainer_args(run, max_steps=4, save_strategy="no", learning_rate=1e-2)
    trainer = SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(48), sam=SAM, **kw)
    return trainer, ckpt, part


def test_hf_checkpoint_folders_hold_no_temporary_files(hf_run):
    for folder in hf_run.glob("checkpoint-*"):
        assert (folder / "sharpguard_sam.pt").is_file()
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_hf_resume_without_a_readable_sam_part_is_refused_before_anything_loads(hf_run, tmp_path, damage):
    """Before: a missing part resumed silently with SAM's counter at 0 where the Trainer was at 2; a torn
    one died with a raw ``OSError: [Errno 22]``."""
    trainer, ckpt, part = _hf_resume(hf_run, tmp_path, damage)
    before = params_of(trainer.model)
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume_from_checkpoint=str(ckpt))
    msg = str(info.value)
    assert str(part) in msg and "sam_resume='current'" in msg
    assert ("is missing" in msg) == (damage == "missing") and ("truncated" in msg) == (damage == "truncated")
    assert trainer.state.global_step == 0 and _same(params_of(trainer.model), before)  # nothing was loaded


def test_hf_resume_true_finds_the_last_checkpoint_and_refuses_it_too(hf_run, tmp_path):
    trainer, _, _ = _hf_resume(hf_run, tmp_path, "none")
    (tmp_path / "run" / "checkpoint-4" / "sharpguard_sam.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-4/sharpguard_sam\.pt is missing"):
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_hf_sam_resume_current_continues_without_the_part_and_says_so(hf_run, tmp_path, damage):
    trainer, ckpt, part = _hf_resume(hf_run, tmp_path, damage, sam_resume="current")
    with pytest.warns(RuntimeWarning, match="sam_resume='current': continuing with SAM's state started afresh"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 4
    assert trainer._sg_engine.sam._step == 2  # counted from the resume: the part was not there to read


def test_hf_intact_part_resumes_the_sam_counter(hf_run, tmp_path):
    trainer, ckpt, _ = _hf_resume(hf_run, tmp_path, "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 4 and trainer._sg_engine.sam._step == 4


def test_hf_monitor_state_missing_from_the_checkpoint_is_refused_or_restarted_when_asked(hf_run, tmp_path):
    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    run = tmp_path / "run"
    shutil.copytree(hf_run, run)  # saved without any monitor
    args = trainer_args(run, max_steps=4, save_strategy="no", learning_rate=1e-2)

    def trainer(**kw):
        cb = SharpnessMonitorCallback(every_n_steps=100, measures=("batch",), probe_size=8, **kw)
        return SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(48), sam=SAM,
                                 callbacks=[cb])

    with pytest.raises(CheckpointError,
                       match=r"holds no state for SharpnessMonitorCallback\[batch\].*resume='current'"):
        trainer().train(resume_from_checkpoint=str(run / "checkpoint-2"))
    with pytest.warns(RuntimeWarning, match="resume='current': the monitor's history and schedule restart"):
        t = trainer(resume="current")
        t.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert t.state.global_step == 4


# --------------------------------------------------------------------------------------------------
# Lightning: ckpt_path with the callback state missing, emptied or corrupt
# --------------------------------------------------------------------------------------------------
def _fit(callbacks, max_steps, ckpt_path=None):
    from pytorch_lightning.demos import boring_classes

    from sharpguard.integrations._lightning_namespace import pl

    torch.manual_seed(0)
    module = boring_classes.BoringModel()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, module


@pytest.fixture(scope="module")
def lightning_ckpts(tmp_path_factory):
    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

    folder = tmp_path_factory.mktemp("pl")
    plain, _ = _fit([], 3)
    plain.save_checkpoint(folder / "plain.ckpt")
    sam, _ = _fit([SharpnessAwareMinimization(variant="looksam", k=2),
                   SharpnessMonitor(every_n_steps=100, measures=("batch",))], 3)
    sam.save_checkpoint(folder / "sam.ckpt")
    return folder


def _edited(src, dst, edit):
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return str(dst)


def _sam_key(ckpt):
    return next(k for k in ckpt["callbacks"] if k.startswith("SharpnessAwareMinimization"))


def test_lightning_sam_resume_from_a_checkpoint_without_its_state_is_refused(lightning_ckpts):
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    path = str(lightning_ckpts / "plain.ckpt")
    with pytest.raises(CheckpointError) as info:
        _fit([SharpnessAwareMinimization(variant="looksam", k=2)], 5, ckpt_path=path)
    msg = str(info.value)
    assert path in msg and "holds no state for SharpnessAwareMinimization" in msg and "resume='current'" in msg
    cb = SharpnessAwareMinimization(variant="looksam", k=2, resume="current")
    with pytest.warns(RuntimeWarning, match="resume='current': continuing with SharpnessAwareMinimization's state"):
        trainer, _ = _fit([cb], 5, ckpt_path=path)
    assert trainer.global_step == 5 and cb.sam._step == 2  # afresh from the resume, and said


@pytest.mark.parametrize("damage", ["emptied", "no sam entry"])
def test_lightning_sam_state_emptied_or_incomplete_is_refused(lightning_ckpts, tmp_path, damage):
    """Lightning skips an empty callback entry without a word; an entry without its 'sam' part used to load
    as 'no state' silently."""
    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

    def edit(ckpt):
        key = _sam_key(ckpt)
        if damage == "emptied":
            ckpt["callbacks"][key] = {}
        else:
            del ckpt["callbacks"][key]["sam"]

    path = _edited(lightning_ckpts / "sam.ckpt", tmp_path / "damaged.ckpt", edit)
    monitor = SharpnessMonitor(every_n_steps=100, measures=("batch",))
    with pytest.raises(CheckpointError, match="holds no state for SharpnessAwareMinimization"):
        _fit([SharpnessAwareMinimization(variant="looksam", k=2), monitor], 5, ckpt_path=path)


def test_lightning_sam_state_corrupt_is_refused_naming_the_field(lightning_ckpts, tmp_path):
    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

    def edit(ckpt):
        ckpt["callbacks"][_sam_key(ckpt)]["sam"]["step"] = -4

    path = _edited(lightning_ckpts / "sam.ckpt", tmp_path / "corrupt.ckpt", edit)
    with pytest.raises(ConfigurationError, match="step must be an integer >= 0, got -4"):
        _fit([SharpnessAwareMinimization(variant="looksam", k=2),
              SharpnessMonitor(every_n_steps=100, measures=("batch",))],
             5, ckpt_path=path)


def test_lightning_monitor_resume_from_a_checkpoint_without_its_state_is_refused(lightning_ckpts):
    from sharpguard.integrations.lightning import SharpnessMonitor

    path = str(lightning_ckpts / "plain.ckpt")
    with pytest.raises(CheckpointError, match=r"holds no state for SharpnessMonitor .*resume='current'"):
        _fit([SharpnessMonitor(every_n_steps=100, measures=("batch",))], 5, ckpt_path=path)
    with pytest.warns(RuntimeWarning, match="resume='current'"):
        trainer, _ = _fit([SharpnessMonitor(every_n_steps=100, measures=("batch",), resume="current")], 5,
                          ckpt_path=path)
    assert trainer.global_step == 5


def test_lightning_intact_checkpoint_resumes_both_callbacks(lightning_ckpts):
    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

    cb, monitor = SharpnessAwareMinimization(variant="looksam",
                                             k=2), SharpnessMonitor(every_n_steps=100, measures=("batch",))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds no state.*")
        _fit([cb, monitor], 5, ckpt_path=str(lightning_ckpts / "sam.ckpt"))
    assert cb.sam._step == 5
    # every_n_steps=100: no check on either side of the save; the first run's notes (its partial probe at step
    # 3, written before the save) came back with the state, and the resumed run adds only its own notes
    records = monitor.monitor.history.records
    assert (3, "probe-partial") in {(r["step"], r["settings"].get("key")) for r in records}
    assert all(r["metric"] == "monitor/note" for r in records)


# --------------------------------------------------------------------------------------------------
# Accelerate: register_for_checkpointing + save_state / load_state
# --------------------------------------------------------------------------------------------------
def _accelerate_loop():
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
    from sharpguard.monitor import SharpnessMonitor

    accelerator = Accelerator(cpu=True)
    model = tiny_bert()
    loader = torch.utils.data.DataLoader(FirstTokenTask(32), batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, variant="looksam", k=2, rho=0.5)
    monitor = MonitorStep(accelerator, SharpnessMonitor(measures=("batch",), every_n_steps=100,
                                                        probe=[next(iter(loader))]))
    accelerator.register_for_checkpointing(sam, monitor)
    batches = [b for _, b in zip(range(3), loader)]

    def step(n):
        for batch in batches[:n]:
            with accelerator.accumulate(model):
                sam.backward(batch)
                optimizer.step()
                optimizer.zero_grad()
                monitor.step(model, optimizer=optimizer)

    return accelerator, model, sam, monitor, step


@pytest.mark.parametrize("index, damage", [(0, "missing"), (0, "truncated"), (1, "missing"), (1, "truncated"),
                                           (0, "malformed"), (1, "malformed"), (1, "malformed step")])
def test_accelerate_load_state_refuses_a_damaged_part_before_anything_loads(tmp_path, index, damage):
    accelerator, model, sam, monitor, step = _accelerate_loop()
    step(2)
    accelerator.save_state(str(tmp_path))
    step(1)  # the live run moves on: a refused load must leave it exactly here
    part = tmp_path / f"custom_checkpoint_{index}.pkl"
    if damage == "missing":
        part.unlink()
    elif damage == "truncated":
        _truncate(part)
    else:
        state = torch.load(part, weights_only=True)
        if index == 0:
            state["sam"]["step"] = -1
        elif damage == "malformed step":  # the driver's own field, checked before anything loads too
            state["global_step"] = -5
        else:
            state["monitor"]["seed"] = "zero"
        torch.save(state, part)
    before = params_of(accelerator.unwrap_model(model))
    sam_step, monitor_step = sam.sam._step, monitor.global_step
    with pytest.raises(CheckpointError) as info:
        accelerator.load_state(str(tmp_path))
    msg = str(info.value)
    assert str(part) in msg and ("SharpnessAwareMinimization" if index == 0 else "MonitorStep") in msg
    if not damage.startswith("malformed"):
        assert "register_for_checkpointing" in msg  # the way to go on without it
    assert _same(params_of(accelerator.unwrap_model(model)), before)  # the model was not loaded either
    assert sam.sam._step == sam_step == 3 and monitor.global_step == monitor_step == 3


def test_accelerate_intact_folder_round_trips(tmp_path):
    accelerator, model, sam, monitor, step = _accelerate_loop()
    step(2)
    accelerator.save_state(str(tmp_path))
    saved = params_of(accelerator.unwrap_model(model))
    step(1)
    accelerator.load_state(str(tmp_path))
    assert _same(params_of(accelerator.unwrap_model(model)), saved)
    assert sam.sam._step == 2 and monitor.global_step == 2


def test_accelerate_resume_policy_of_the_sam_object_reaches_load_state(tmp_path):
    """load_state calls load_state_dict without arguments: the object's own resume= decides."""
    from sharpguard.integrations.accelerate import SharpnessAwareMinimization

    accelerator, model, sam, _, step = _accelerate_loop()
    step(2)
    accelerator.save_state(str(tmp_path))
    state = torch.load(tmp_path / "custom_checkpoint_0.pkl", weights_only=True)
    state["sam"]["knobs"]["k"] = 3
    torch.save(state, tmp_path / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="k: checkpoint 3 vs now 2"):
        accelerator.load_state(str(tmp_path))
    with pytest.raises(ConfigurationError, match="resume must be one of"):
        SharpnessAwareMinimization(accelerator, model, sam.optimizer, resume="later")
    sam.resume = "checkpoint"
    accelerator.load_state(str(tmp_path))
    assert sam.sam.k == 3 and sam.sam._step == 2


@pytest.mark.parametrize("damage", ["dtype", "shape"])
def test_hf_monitor_state_corrupt_in_trainer_state_json_is_one_sentence(tmp_path, damage):
    """The monitor's state is JSON (trainer_state.json's stateful_callbacks): a corrupt tensor entry used
    to end in a raw ValueError/RuntimeError from the decoder."""
    import json

    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    def trainer(out, steps):
        cb = SharpnessMonitorCallback(every_n_steps=1, measures=("batch",), probe_size=8)
        args = trainer_args(out, max_steps=steps, save_strategy="steps", save_steps=2)
        return SharpGuardTrainer(model=tiny_bert(), args=args, train_dataset=FirstTokenTask(24), callbacks=[cb])

    trainer(tmp_path / "run", 2).train()
    state_file = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    entry = state["stateful_callbacks"]["SharpnessMonitorCallback"]
    entry = entry[-1] if isinstance(entry, list) else entry
    # a tensor entry as the codec writes them, with an unknown dtype or a shape its values cannot fill
    entry["attributes"]["sharpguard_state"]["monitor"]["loss"] = (
        {"__tensor__": [1.0], "dtype": "load", "shape": [1]} if damage == "dtype"
        else {"__tensor__": [1.0, 2.0], "dtype": "float32", "shape": [7, 7]})
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state.json holds a corrupt state for SharpnessMonitorCallback"):
        trainer(tmp_path / "run", 4).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_accelerate_the_way_on_the_sentence_gives_works(tmp_path):
    """SAM's part torn, the monitor's intact: follow the sentence and the run continues with the model,
    optimizer and monitor restored, SAM's own state afresh."""
    accelerator, model, sam, monitor, step = _accelerate_loop()
    step(2)
    accelerator.save_state(str(tmp_path / "state"))
    saved = params_of(accelerator.unwrap_model(model))
    _truncate(tmp_path / "state" / "custom_checkpoint_0.pkl")
    with pytest.raises(CheckpointError, match="move the folder's custom_checkpoint_\\*.pkl files out of it"):
        _accelerate_loop()[0].load_state(str(tmp_path / "state"))

    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import MonitorStep, SharpnessAwareMinimization
    from sharpguard.monitor import SharpnessMonitor

    aside = tmp_path / "aside"
    aside.mkdir()
    for part in (tmp_path / "state").glob("custom_checkpoint_*.pkl"):
        part.rename(aside / part.name)
    accelerator = Accelerator(cpu=True)
    model2 = tiny_bert(seed=1)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    model2, optimizer2 = accelerator.prepare(model2, optimizer2)
    accelerator.load_state(str(tmp_path / "state"))
    sam2 = SharpnessAwareMinimization(accelerator, model2, optimizer2, variant="looksam", k=2, rho=0.5)
    monitor2 = MonitorStep(accelerator, SharpnessMonitor(measures=("batch",), every_n_steps=100,
                                                         probe=monitor.monitor.probe.batches))
    monitor2.load_state_dict(torch.load(aside / "custom_checkpoint_1.pkl", weights_only=True))
    accelerator.register_for_checkpointing(sam2, monitor2)
    assert _same(params_of(accelerator.unwrap_model(model2)), saved)
    assert monitor2.global_step == 2 and sam2.sam._step == 0


def test_lightning_validate_from_a_checkpoint_without_callback_state_is_not_a_resume(lightning_ckpts):
    """validate(ckpt_path=...) reads weights: a checkpoint saved without the callbacks is fine there."""
    from pytorch_lightning.demos import boring_classes

    from sharpguard.integrations._lightning_namespace import pl
    from sharpguard.integrations.lightning import SharpnessAwareMinimization, SharpnessMonitor

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=2,
                         callbacks=[SharpnessAwareMinimization(),
                                    SharpnessMonitor(every_n_steps=100, measures=("batch",))])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds no state.*")
        trainer.validate(boring_classes.BoringModel(), ckpt_path=str(lightning_ckpts / "plain.ckpt"))
    assert trainer.state.finished
