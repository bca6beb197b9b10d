"""The metric history a monitor keeps: JSON lines, one ``{"step", "metric", "value", "settings"}`` each.

The file is the input of ``sharpguard report``. Each check's records go to the file in one write, each
record on a line of its own (a line that a failed write left torn is closed first), so a crashed run keeps
what it measured; a write that fails (a full disk) is said once and counted, and never stops training.
A resumed run appends to the same file, and :func:`read_history` keeps the last record of each
``(step, metric)`` pair (a step measured twice around a resume counts once) and drops torn lines, saying
how many. Non-finite values are written as JSON ``null`` (strict JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from .. import _validation as rules

from ..errors import ConfigurationError

__all__ = [
    "HistoryFormatError",
    "HistoryRecords",
    "HistoryWarning",
    "MetricHistory",
    "decode_state",
    "encode_state",
    "parse_history",
    "read_history",
]

#: longest line a history reader accepts: a record is a few hundred bytes, its settings included
MAX_LINE_BYTES = 1 << 20
#: longest metric name a history may hold (sharpguard's own are under 40 characters)
MAX_METRIC_NAME = 256
#: largest step a history may hold (an int64 step counter)
MAX_STEP = 2**63 - 1
#: how every record the writer writes begins: a line that begins so (or is the start of it) and is not
#: valid JSON is a record cut short
RECORD_START = '{"step": '


class HistoryFormatError(ConfigurationError):
    """A history file holds a line that is not a monitor record (the message names the file and the line)."""


class HistoryWarning(UserWarning):
    """A history write failed (training goes on), or a reader left out torn lines of a crashed run."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def encode_state(value: Any) -> Any:
    """A state dict as plain JSON: tensors as ``{"__tensor__": values, "dtype", "shape"}``, tuples,
    mappings with non-string keys and non-finite floats tagged so :func:`decode_state` restores them
    exactly. The one codec of monitor state (the HF callback state in ``trainer_state.json`` uses it)."""
    import torch

    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {"__tensor__": t.reshape(-1).tolist(), "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape)}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v) for k, v in value.items()}
        return {"__mapping__": [[encode_state(k), encode_state(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v) for v in value]}
    if isinstance(value, list):
        return [encode_state(v) for v in value]
    if isinstance(value, deque):
        return [encode_state(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    return value


def decode_state(value: Any) -> Any:
    """Inverse of :func:`encode_state`."""
    import torch

    if isinstance(value, list):
        return [decode_state(v) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, str(value.get("dtype")), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown tensor dtype {value.get('dtype')!r} in a monitor state.")
            return torch.tensor(value["__tensor__"], dtype=dtype).reshape(value["shape"])
        if "__mapping__" in value:
            return {decode_state(k): decode_state(v) for k, v in value["__mapping__"]}
        if "__tuple__" in value:
            return tuple(decode_state(v) for v in value["__tuple__"])
        if "__float__" in value:
            return float(value["__float__"])
        return {k: decode_state(v) for k, v in value.items()}
    return value


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may take fewer bytes than offered)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_lines(path: Path, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` in one write, first closing a line a failed write left open.

    A record therefore always starts on a line of its own, whatever the file ended with (a torn record
    from a full disk or a crash is left as one line of its own that readers drop).
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)  # O_APPEND still writes at the end
            if os.read(fd, 1) != b"\n":
                text = "\n" + text
        _write_all(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


class MetricHistory:
    """Records of one monitor, kept in memory (the last ``tail`` ones) and appended to ``path``.

    ``enabled=False`` keeps the in-memory tail but writes nothing (non-zero ranks). A write that fails
    (a full disk, a lost mount) never raises into training: it is said once in a warning and as a
    ``monitor/note`` record, counted in ``write_failures`` (also in :meth:`state_dict`), and the records
    it could not write (up to ``tail`` of them) are written with the next batch that succeeds.
    """

    @rules.checked()
    def __init__(self, path: str | os.PathLike[str] | None = None, *, tail: int = 1000, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        self.records: deque[dict[str, Any]] = deque(maxlen=tail)
        #: failed writes of this process, the last one's error, and the records not yet written
        self.write_failures = 0
        self.last_write_error: str | None = None
        self.unwritten: deque[dict[str, Any]] = deque(maxlen=tail)
        #: records that could not be written and no longer fit in ``unwritten`` (lost)
        self.records_lost = 0

    def append(self, step: int, metrics: Mapping[str, float],
               settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Add one record per metric (``settings[metric]`` or ``{}``); write them if a path is set."""
        settings = settings or {}
        new = [
            {"step": int(step), "metric": name, "value": _jsonable(float(value)),
             "settings": _jsonable(settings.get(name, {}))}
            for name, value in metrics.items()
        ]
        self.records.extend(new)
        if self.enabled and self.path is not None and new:
            self._write(int(step), new)
        return new

    def _write(self, step: int, new: list[dict[str, Any]]) -> None:
        pending = [*self.unwritten, *new]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_lines(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in pending))
        except OSError as exc:
            self._failed(step, new, exc)
        else:
            self.unwritten.clear()

    def _failed(self, step: int, new: list[dict[str, Any]], exc: OSError) -> None:
        self.write_failures += 1
        self.last_write_error = f"{type(exc).__name__}: {exc}"
        if self.write_failures == 1:
            reason = (f"cannot write the history to {str(self.path)!r} ({self.last_write_error}); training goes "
                      "on, the records stay in memory and are written once a write succeeds again (failed writes "
                      "are counted in history.write_failures).")
            warnings.warn(f"sharpguard history: {reason}", HistoryWarning, stacklevel=4)
            note = {"step": step, "metric": "monitor/note", "value": 1.0,
                    "settings": {"reason": reason, "key": "history-write-failed"}}
            self.records.append(note)
            new = [*new, note]
        overflow = len(self.unwritten) + len(new) - (self.unwritten.maxlen or 0)
        self.records_lost += max(overflow, 0)
        self.unwritten.extend(new)

    def values(self, metric: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of ``metric`` from the in-memory tail."""
        return [(r["step"], r["value"]) for r in self.records if r["metric"] == metric]

    def state_dict(self) -> dict[str, Any]:
        """The in-memory tail; ``write_failures`` and ``records_lost`` report this process's failed writes
        (not restored by :meth:`load_state_dict`)."""
        return {"path": str(self.path) if self.path is not None else None, "records": list(self.records),
                "write_failures": self.write_failures, "records_lost": self.records_lost}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records.clear()
        self.records.extend(state["records"])


class HistoryRecords(list):
    """The records :func:`read_history` kept (a list), and ``dropped``: ``(line, reason)`` of each torn line
    it left out (a write cut short by a crash or a full disk)."""

    dropped: list[tuple[int, str]]

    def __init__(self, records: Iterable[dict[str, Any]] = (), dropped: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(records)
        self.dropped = list(dropped)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile file must not echo megabytes into a message)."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    if isinstance(value, (list, dict)):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {len(str(value))} digits"
    text = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "a JSON array", dict: "a JSON object"}.get(
        type(value), type(value).__name__)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_record(rec: Any) -> str | None:
    """What is wrong with one decoded line as a monitor record (None: nothing)."""
    if not isinstance(rec, dict):
        return f"is {_kind(rec)}, not a record; each line must be one object with 'step', 'metric' and 'value'"
    missing = [k for k in ("step", "metric", "value") if k not in rec]
    if missing:
        return f"needs 'step', 'metric' and 'value' (missing {', '.join(repr(k) for k in missing)})"
    step, name, value = rec["step"], rec["metric"], rec["value"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        return f"'step' must be an integer from 0 to 2**63 - 1, got {_short(step)}"
    if not isinstance(name, str):
        return f"'metric' must be a string, got {_kind(name)} ({_short(name)})"
    if not 0 < len(name) <= MAX_METRIC_NAME:
        return f"'metric' must be a name of 1 to {MAX_METRIC_NAME} characters, got {len(name)} characters"
    if not name.isascii() and not _encodable(name):
        return "'metric' holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), which no text file can hold"
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"'value' must be a number or null, got {_kind(value)} ({_short(value)})"
        if isinstance(value, int):
            try:
                float(value)
            except OverflowError:
                return f"'value' is {_short(value)}, beyond the range of a float (about 1.8e308)"
    if not isinstance(rec.get("settings", {}), dict):
        return f"'settings' must be an object, got {_kind(rec['settings'])}"
    return None


def parse_history(path: str | os.PathLike[str], metrics: Iterable[str] | None = None) -> HistoryRecords:
    """Parse a history file: the last record of each ``(step, metric)``, sorted by step, and the torn lines left out.

    A torn line (a record cut short by a crash or a full disk: a line that begins as every record begins,
    ``{"step": ``, and is not valid JSON; or zero bytes a crash left unfilled) is dropped and listed; a
    record glued onto a torn line by an older writer is recovered. Anything else malformed raises
    :class:`HistoryFormatError` naming the file, the line and the problem, without echoing the line; the
    file is read in bounded time and memory (lines of at most ``MAX_LINE_BYTES``).
    """
    wanted = set(metrics) if metrics is not None else None
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    dropped: list[tuple[int, str]] = []
    name = os.fspath(path)
    name = name if name.isprintable() else repr(name)  # the message stays one line

    def fail(lineno: int, problem: str) -> HistoryFormatError:
        return HistoryFormatError(f"{name}:{lineno} {problem}.")

    with open(path, "rb") as fh:
        lineno = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise fail(lineno, f"is longer than {MAX_LINE_BYTES} bytes; a monitor record is a few hundred "
                                   "bytes, so this is not a monitor history")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise fail(lineno, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                   "a monitor history is JSON lines") from None
            text = text.strip()
            if not text:
                continue
            if not text.strip("\x00"):  # a block the file system allocated but the crash never filled
                dropped.append((lineno, "zero bytes where a write was lost (a crash before the data reached the disk)"))
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                if not (text.startswith(RECORD_START) or RECORD_START.startswith(text)):
                    raise fail(lineno, f"is not valid JSON ({exc.msg} at column {exc.colno}); each line must be "
                                       "one object") from None
                rec = _glued_record(text)
                dropped.append((lineno, "a record cut short (a crash or a full disk during a write)"))
                if rec is None:
                    continue
            except RecursionError:
                raise fail(lineno, "is nested too deeply to be a monitor record") from None
            except ValueError as exc:  # an integer of more digits than int() converts (sys.get_int_max_str_digits)
                raise fail(lineno, f"is not a usable JSON record ({_short(str(exc), 120)})") from None
            problem = _check_record(rec)
            if problem is not None:
                raise fail(lineno, problem)
            key = (rec["step"], rec["metric"])
            if wanted is not None and key[1] not in wanted:
                continue
            rec["value"] = math.nan if rec["value"] is None else float(rec["value"])
            rec.setdefault("settings", {})
            latest.pop(key, None)
            latest[key] = rec
    return HistoryRecords(sorted(latest.values(), key=lambda r: r["step"]), dropped)


def _glued_record(text: str) -> dict[str, Any] | None:
    """The complete record an older writer appended onto a torn line (``{"step": 1, "met{"step": 2, ...}``)."""
    start = text.find(RECORD_START, 1)
    while start != -1:
        try:
            rec = json.loads(text[start:])
        except (ValueError, RecursionError):
            rec = None
        if isinstance(rec, dict) and _check_record(rec) is None:
            return rec
        start = text.find(RECORD_START, start + 1)
    return None


def read_history(path: str | os.PathLike[str], metrics: Iterable[str] | None = None) -> HistoryRecords:
    """Read a history file: a list of records sorted by step, the last one kept per ``(step, metric)``.

    ``metrics`` keeps only the named metrics. ``null`` values come back as ``nan``. Every complete record
    of a crashed run is kept: a torn line is dropped, listed in the result's ``dropped`` and said in one
    warning. Anything else malformed raises :class:`HistoryFormatError` (a ``ValueError``) naming the line.
    """
    records = parse_history(path, metrics)
    if records.dropped:
        warnings.warn(dropped_message(path, records), HistoryWarning, stacklevel=2)
    return records


def dropped_message(path: str | os.PathLike[str], records: HistoryRecords) -> str:
    """One sentence: how many torn lines of ``path`` were left out, where, and how many records were kept."""
    lines = [n for n, _ in records.dropped]
    where = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
    return (f"{os.fspath(path)}: dropped {len(lines)} torn line{'s' if len(lines) != 1 else ''} (line "
            f"{where}: a record cut short by a crash or a full disk); kept the {len(records)} complete records.")
