"""Atomic file writes: a reader sees the old file or the whole new one, never a torn mix.

The content goes to a temporary file in the destination's own folder (so the rename never crosses a
file system), is flushed and ``fsync``-ed, and then ``os.replace``-d over the destination; the folder
is ``fsync``-ed after the rename where the platform allows, so the new name survives a power cut
(the POSIX recipe, as in ``write(2)``/``rename(2)``; torch.save and open() give no such guarantee).
On any failure the temporary file is removed and the destination is untouched.

Use these for every file sharpguard writes whole: checkpoint parts, reports, summaries. An
append-only log (a JSON-lines history) cannot be renamed into place at every record; it appends.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "fsync_folder",
           "load_tensors_only"]


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the permissions open() would give a new file (mkstemp's are 0600)
_NEW_FILE_MODE = 0o666 & ~_current_umask()


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w", encoding="utf-8") as fh: fh.write(...)`` -- ``path`` appears whole on exit.

    ``mode`` is ``"wb"`` or ``"w"``. If the body raises, ``path`` is left as it was (absent or the old
    file) and the temporary file is removed. ``path`` itself is replaced, never followed: a symbolic
    link planted at ``path`` is replaced by the file, and the link's target is not written.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', got {mode!r}.")
    dest = Path(path)
    folder = dest.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, _NEW_FILE_MODE)
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically: the object is serialised in memory first, so a failure
    while pickling leaves no file at all, and a crash while writing leaves the previous file."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_tensors_only(path: str | os.PathLike[str], *, what: str, to_continue: str) -> Any:
    """Read a checkpoint part with ``torch.load(weights_only=True)``: tensors and plain containers only,
    never code (a pickled ``__reduce__`` payload is refused before it can run).

    A missing, truncated, unreadable or unsafe file raises one :class:`~sharpguard.errors.CheckpointError`
    naming the file, ``what`` it holds, and ``to_continue`` (the way to go on without it).
    """
    import pickle
    import zipfile

    import torch

    from .errors import CheckpointError

    where = os.fspath(path)
    if not os.path.lexists(where):
        problem = "is missing"
    elif not os.path.isfile(where):
        problem = "is not a regular file"
    else:
        try:
            return torch.load(where, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses any global outside torch's allow-list: a crafted payload, or an object
            # sharpguard never writes
            problem = ("holds objects other than tensors and plain containers (refused unread: loading it could "
                       "run code)")
        except (EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError, KeyError, UnicodeDecodeError):
            problem = "is truncated or unreadable (a crash while it was written?)"
    raise CheckpointError(f"{where} {problem}; it holds {what}. {to_continue}")
