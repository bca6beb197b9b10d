"""History files under faults: a write that fails (a full disk) is said once, counted and never stops
training; every record starts on a line of its own whatever the file ended with; readers keep every
complete record of a crashed run and say how many torn lines they dropped."""

from __future__ import annotations

import errno
import json
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.monitor import history as history_module
from sharpguard.monitor.history import HistoryFormatError, HistoryWarning, MetricHistory, read_history

REAL_WRITE_ALL = history_module._write_all


class FullDisk:
    """``_write_all`` that fails the writes numbered in ``failing`` with ENOSPC after writing ``keep`` of the
    bytes (a torn record, as a disk that fills up mid-write leaves), and writes the others whole."""

    def __init__(self, failing: set[int], keep: float = 0.5) -> None:
        self.failing, self.keep, self.calls = failing, keep, 0

    def __call__(self, fd: int, data: bytes) -> None:
        self.calls += 1
        if self.calls in self.failing:
            REAL_WRITE_ALL(fd, data[: int(len(data) * self.keep)])
            raise OSError(errno.ENOSPC, "No space left on device")
        REAL_WRITE_ALL(fd, data)


def _lines(path):
    return path.read_bytes().split(b"\n")


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------- the writer
def test_a_failed_write_is_said_once_counted_and_the_records_follow_on_a_fresh_line(tmp_path, monkeypatch):
    path = tmp_path / "h.jsonl"
    disk = FullDisk(failing={2, 3})
    monkeypatch.setattr(history_module, "_write_all", disk)
    h = MetricHistory(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            h.append(step, {"sharpness/lambda_max": float(step), "monitor/n_hvp": 10.0 + step})
    said = [w for w in caught if issubclass(w.category, HistoryWarning)]
    assert len(said) == 1 and "No space left on device" in str(said[0].message)
    assert h.write_failures == 2 and h.state_dict()["write_failures"] == 2 and h.records_lost == 0
    assert h.last_write_error == "OSError: [Errno 28] No space left on device"
    assert not h.unwritten  # written with the fourth batch, once space returned
    # the file: two torn lines, each alone on its line; every other line one whole record
    lines = [line for line in _lines(path) if line]
    torn = [line for line in lines if not _is_record(line)]
    assert len(torn) == 2 and all(line.startswith(b'{"step": ') for line in torn)
    # each failed batch wrote its first record whole and cut the second
    with pytest.warns(HistoryWarning, match=r"dropped 2 torn lines \(line 3, 6: .*kept the 11 complete records"):
        records = read_history(path)
    assert [n for n, _ in records.dropped] == [3, 6]
    values = {(r["step"], r["metric"]): r["value"] for r in records}
    assert values == {**{(s, "sharpness/lambda_max"): float(s) for s in range(1, 6)},
                      **{(s, "monitor/n_hvp"): 10.0 + s for s in range(1, 6)},
                      (2, "monitor/note"): 1.0}
    note = next(r for r in records if r["metric"] == "monitor/note")
    assert note["settings"]["key"] == "history-write-failed" and "training goes on" in note["settings"]["reason"]


def test_records_that_never_fit_are_counted_as_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(history_module, "_write_all", FullDisk(failing=set(range(1, 100)), keep=0.0))
    h = MetricHistory(tmp_path / "h.jsonl", tail=4)
    with pytest.warns(HistoryWarning):
        for step in range(1, 4):
            h.append(step, {"a": 1.0, "b": 2.0})
    # 6 records and the note; the last 4 wait for a write that succeeds, 3 are lost
    assert (h.write_failures, len(h.unwritten), h.records_lost) == (3, 4, 3)


def test_a_resumed_run_appends_on_a_fresh_line_after_a_torn_tail(tmp_path):
    path = tmp_path / "h.jsonl"
    whole = json.dumps({"step": 1, "metric": "m", "value": 1.0, "settings": {}})
    path.write_text(whole + "\n" + whole[:17])  # the crash cut the second record short
    MetricHistory(path).append(2, {"m": 2.0})
    assert _lines(path)[1] == whole[:17].encode() and json.loads(_lines(path)[2])["step"] == 2
    with pytest.warns(HistoryWarning, match="dropped 1 torn line "):
        records = read_history(path)
    assert [(r["step"], r["value"]) for r in records] == [(1, 1.0), (2, 2.0)] and records.dropped[0][0] == 2


def test_a_write_cut_by_the_kernel_file_size_limit(tmp_path):
    """A real short write, not a patched one: RLIMIT_FSIZE makes the kernel write part of a batch and fail
    the rest with EFBIG, as a full disk does. Training code (here a loop of appends) goes on."""
    path = tmp_path / "h.jsonl"
    script = textwrap.dedent(f"""
        import resource, signal, warnings
        from sharpguard.monitor.history import MetricHistory
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        h = MetricHistory({str(path)!r})
        h.append(1, {{"m": 1.0}})
        resource.setrlimit(resource.RLIMIT_FSIZE, (150, resource.RLIM_INFINITY))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2, 5):
                h.append(step, {{"m": float(step), "n": float(step)}})
        print(h.write_failures, len(caught), h.last_write_error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    failures, said, error = done.stdout.split(maxsplit=2)
    assert failures == "3" and said == "1" and "File too large" in error
    size = path.stat().st_size
    assert size == 150  # the first batch whole, the second cut at the limit: its first record whole
    with pytest.warns(HistoryWarning, match="dropped 1 torn line "):
        records = read_history(path)
    assert [(r["step"], r["metric"]) for r in records] == [(1, "m"), (2, "m")]
    # space returns (no limit in this process): the next append closes the torn line first
    MetricHistory(path).append(5, {"m": 5.0})
    with pytest.warns(HistoryWarning, match="dropped 1 torn line "):
        assert [(r["step"], r["value"]) for r in read_history(path, ["m"])] == [(1, 1.0), (2, 2.0), (5, 5.0)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0)), min_size=1, max_size=8), st.booleans())
def test_whatever_fails_every_record_is_read_back_once_space_returns(tmp_path_factory, writes, torn_start):
    """Law: any pattern of failed writes (cut at any byte), on a file that may start torn, followed by one
    write that succeeds, reads back exactly the records appended, and the file's torn lines are the
    writes that were cut mid-record."""
    path = tmp_path_factory.mktemp("h") / "h.jsonl"
    if torn_start:
        path.write_text('{"step": 0, "metric": "m", "val')
    failing = {i + 1 for i, (fails, _) in enumerate(writes) if fails}
    cuts = iter([keep for fails, keep in writes if fails])

    class Cut(FullDisk):
        def __call__(self, fd, data):
            self.keep = next(cuts) if self.calls + 1 in self.failing else 1.0
            super().__call__(fd, data)

    h = MetricHistory(path)
    expected = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryWarning)
        history_module._write_all = Cut(failing)
        try:
            for step in range(1, len(writes) + 1):
                h.append(step, {"m": float(step), "k": -float(step)})
                expected.update({(step, "m"): float(step), (step, "k"): -float(step)})
        finally:
            history_module._write_all = REAL_WRITE_ALL
        h.append(len(writes) + 1, {"m": 0.5})
        expected[(len(writes) + 1, "m")] = 0.5
        records = read_history(path)
    got = {(r["step"], r["metric"]): r["value"] for r in records if r["metric"] != "monitor/note"}
    assert got == expected
    assert h.write_failures == len(failing) and not h.unwritten
    assert all(line == b"" or line.startswith(b"{") for line in _lines(path))
    assert len(records.dropped) == sum(1 for line in _lines(path) if line and not _is_record(line))


# ----------------------------------------------------------------------------------------- the reader
def test_the_reader_keeps_every_complete_record_around_torn_lines(tmp_path):
    rec = [json.dumps({"step": s, "metric": "m", "value": float(s), "settings": {}}) for s in range(1, 6)]
    path = tmp_path / "h.jsonl"
    # a torn line in the middle, one glued by an older writer (torn start + a whole record), a torn tail
    path.write_text("\n".join([rec[0], rec[1][:20], rec[2], rec[3][:9] + rec[3], rec[4][:30]]))
    with pytest.warns(HistoryWarning, match=r"dropped 3 torn lines \(line 2, 4, 5"):
        records = read_history(path)
    assert [(r["step"], r["value"]) for r in records] == [(1, 1.0), (3, 3.0), (4, 4.0)]
    assert [n for n, _ in records.dropped] == [2, 4, 5]


def test_zero_bytes_a_crash_left_are_dropped_and_a_resume_writes_after_them(tmp_path):
    """After a power loss a file system may keep the file's new size with the data never written: zeros."""
    path = tmp_path / "h.jsonl"
    path.write_bytes(json.dumps({"step": 1, "metric": "m", "value": 1.0}).encode() + b"\n" + b"\x00" * 64)
    MetricHistory(path).append(2, {"m": 2.0})
    with pytest.warns(HistoryWarning, match="dropped 1 torn line "):
        records = read_history(path)
    assert [(r["step"], r["value"]) for r in records] == [(1, 1.0), (2, 2.0)]
    assert "zero bytes" in records.dropped[0][1]


@pytest.mark.parametrize("line", [b"{garbage", b'{"metric": "m", "value": 1', b"step: 1"])
def test_a_line_the_writer_never_starts_is_an_error_not_a_torn_record(tmp_path, line):
    path = tmp_path / "h.jsonl"
    path.write_bytes(json.dumps({"step": 1, "metric": "m", "value": 1.0}).encode() + b"\n" + line + b"\n")
    with pytest.raises(HistoryFormatError, match=":2 is not valid JSON"):
        read_history(path)


@pytest.mark.parametrize("line, problem", [
    (b"\xff\xfe{}", "is not UTF-8 text (byte 0xff at column 1)"),
    (b"[1, 2]", "is a JSON array, not a record"),
    (b"not json", "is not valid JSON"),
    (b'{"step": 1, "metric": 3, "value": 1}', "'metric' must be a string, got a number"),
    (b'{"step": 1, "metric": "m", "value": true}', "'value' must be a number or null, got a boolean"),
    (b'{"step": 1, "metric": "m", "value": 1' + b"0" * 400 + b"}", "an integer of 401 digits, beyond the range"),
    (b'{"step": -1, "metric": "m", "value": 1}', "'step' must be an integer from 0"),
    (b'{"step": 1, "metric": "m", "value": 1, "settings": [1]}', "'settings' must be an object"),
    (b'{"step": 1, "metric": "' + b"x" * 300 + b'", "value": 1}', "1 to 256 characters, got 300"),
])
def test_a_line_that_is_not_a_record_is_named_with_the_file_and_line(tmp_path, line, problem):
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"step": 1, "metric": "m", "value": 1.0}\n' + line + b"\n")
    with pytest.raises(HistoryFormatError) as err:
        read_history(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2 ") and problem in message and "\n" not in message
    assert isinstance(err.value, ValueError)  # read_history raised ValueError before


def test_a_200_mb_value_is_refused_by_its_length_without_being_echoed(tmp_path):
    path = tmp_path / "h.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"step": 1, "metric": "m", "value": "')
        fh.write(b"9" * (200 << 20))
        fh.write(b'"}\n')
    with pytest.raises(HistoryFormatError, match=r":1 is longer than 1048576 bytes") as err:
        read_history(path)
    assert len(str(err.value)) < 300


def test_a_monitor_run_writes_what_read_history_reads(tmp_path):
    """The core monitor on a plain loop: the file it writes reads back without a dropped line."""
    from sharpguard.monitor import SharpnessMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    probe = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    mon = SharpnessMonitor(measures=("lambda_max",), probe=probe, alerts=None, every_n_steps=2,
                           history=str(tmp_path / "h.jsonl"))
    for step in range(1, 7):
        mon.on_step_end(step, model)
    records = read_history(tmp_path / "h.jsonl", ["sharpness/lambda_max"])
    assert [r["step"] for r in records] == [2, 4, 6] and not records.dropped
    assert all(math.isfinite(r["value"]) for r in records)


# ------------------------------------------------------------------------------------ real front ends
def test_a_full_disk_never_stops_a_plain_monitored_loop(tmp_path, monkeypatch):
    from sharpguard.monitor import SharpnessMonitor
    from sharpguard.monitor.driver import MonitorDriver

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    mon = SharpnessMonitor(measures=("lambda_max",), probe=[(x, y)], alerts=None, every_n_steps=2,
                           history=str(tmp_path / "h.jsonl"))
    driver = MonitorDriver(mon)
    monkeypatch.setattr(history_module, "_write_all", FullDisk(failing={1, 2}))
    with pytest.warns(HistoryWarning, match="training goes on"):
        for step in range(1, 9):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            driver.step(model, step=step, optimizer=opt, loss=loss.detach())
            driver.leave()
    assert mon.history.write_failures == 2
    with pytest.warns(HistoryWarning, match="dropped 2 torn lines"):
        steps = [r["step"] for r in read_history(tmp_path / "h.jsonl", ["sharpness/lambda_max"])]
    assert steps == [s for s, _ in mon.history.values("sharpness/lambda_max")] and len(steps) >= 3


def test_a_full_disk_never_stops_lightning_training(tmp_path, monkeypatch):
    """A Lightning demo module (BoringModel on its RandomDataset) with a SharpnessMonitor whose disk fills
    up at its second and third checks: training runs to the last step, the failure is said once, the
    counter is in the checkpointed monitor state, and the history holds every check once space returned."""
    import pytorch_lightning as pl
    from pytorch_lightning.demos import boring_classes
    from torch.utils.data import DataLoader

    from sharpguard.integrations.lightning import SharpnessMonitor

    torch.manual_seed(0)
    path = tmp_path / "s.jsonl"
    cb = SharpnessMonitor(measures=("lambda_max",), every_n_steps=2, history=str(path))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[cb])
    monkeypatch.setattr(history_module, "_write_all", FullDisk(failing={2, 3}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(boring_classes.BoringModel(), DataLoader(boring_classes.RandomDataset(32, 64), batch_size=4))
    assert trainer.global_step == 12 and trainer.state.finished
    said = [w for w in caught if issubclass(w.category, HistoryWarning)]
    assert len(said) == 1 and "cannot write the history" in str(said[0].message)
    assert cb.monitor.state_dict()["history"]["write_failures"] == 2
    with pytest.warns(HistoryWarning, match="dropped 2 torn lines"):
        records = read_history(path, ["sharpness/lambda_max"])
    measured = [s for s, _ in cb.monitor.history.values("sharpness/lambda_max")]
    assert [r["step"] for r in records] == measured and len(measured) == 6
