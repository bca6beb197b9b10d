"""The metric history a monitor keeps: JSON lines, one ``{"step", "metric", "value", "settings"}`` each.

The file is the input of ``sharpguard report``. It is appended to and flushed after every check, so a
crashed run keeps what it measured; a resumed run appends to the same file, and :func:`read_history`
keeps the last record of each ``(step, metric)`` pair (a step measured twice around a resume counts once).
Non-finite values are written as JSON ``null`` (strict JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from .. import _validation as rules

__all__ = ["MetricHistory", "decode_state", "encode_state", "read_history"]


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
        return {"__tensor__": t.reshape(-1).tolist(), "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
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


class MetricHistory:
    """Records of one monitor, kept in memory (the last ``tail`` ones) and appended to ``path``.

    ``enabled=False`` keeps the in-memory tail but writes nothing (non-zero ranks).
    """

    @rules.checked()
    def __init__(self, path: str | os.PathLike[str] | None = None, *, tail: int = 1000, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        self.records: deque[dict[str, Any]] = deque(maxlen=tail)

    def append(self, step: int, metrics: Mapping[str, float], settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Add one record per metric (``settings[metric]`` or ``{}``); write them if a path is set."""
        settings = settings or {}
        new = [
            {"step": int(step), "metric": name, "value": _jsonable(float(value)), "settings": _jsonable(settings.get(name, {}))}
            for name, value in metrics.items()
        ]
        self.records.extend(new)
        if self.enabled and self.path is not None and new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                for record in new:
                    fh.write(json.dumps(record, allow_nan=False) + "\n")
        return new

    def values(self, metric: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of ``metric`` from the in-memory tail."""
        return [(r["step"], r["value"]) for r in self.records if r["metric"] == metric]

    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path is not None else None, "records": list(self.records)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records.clear()
        self.records.extend(state["records"])


def read_history(path: str | os.PathLike[str], metrics: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Read a history file: a list of records sorted by step, the last one kept per ``(step, metric)``.

    ``metrics`` keeps only the named metrics. ``null`` values come back as ``nan``.
    """
    wanted = set(metrics) if metrics is not None else None
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                key = (int(record["step"]), str(record["metric"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno} is not a history record ({exc}); expected step/metric/value/settings.") from exc
            if wanted is not None and key[1] not in wanted:
                continue
            record["value"] = math.nan if record.get("value") is None else float(record["value"])
            record.setdefault("settings", {})
            latest.pop(key, None)
            latest[key] = record
    return sorted(latest.values(), key=lambda r: r["step"])
