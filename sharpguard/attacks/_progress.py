"""Progress of long attacks, without a monitor: the attacks' loops call :func:`tick` once per unit of work
(a target class, a restart, a block of Square queries) and whoever runs them decides what, if anything, to
show by installing a hook with :func:`reporting`.

Nothing is shown unless a hook is installed, so a plain ``apgd_targeted(...)`` call stays silent; a
context variable (not a global) holds the hook, so threads and nested attacks do not see each other's.
:class:`ProgressBar` is the hook the AutoAttack cascade installs: a tqdm bar (as ``sharpguard study``
shows) when tqdm is installed, one line per stage on stderr when it is not.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

_HOOK: ContextVar[Callable[[str], None] | None] = ContextVar("sharpguard_attack_progress", default=None)


def tick(event: str) -> None:
    """Tell the installed hook (if any) that one unit of work is done; ``event`` says which."""
    hook = _HOOK.get()
    if hook is not None:
        hook(event)


@contextmanager
def reporting(hook: Callable[[str], None] | None) -> Iterator[None]:
    """Install ``hook`` for the attacks run inside the block (``None``: silence)."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default ``sys.stderr``) is a terminal a person is watching."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def wanted(progress: bool | None) -> bool:
    """``progress=True``/``False`` as given; ``None``: show it when stderr is a terminal."""
    return interactive() if progress is None else bool(progress)


class ProgressBar:
    """A progress display over ``total`` stages, on ``stream`` (default stderr).

    :meth:`stage` starts a stage, :meth:`__call__` (the hook) counts a unit of work inside it, :meth:`done`
    closes a stage with its result. With tqdm the bar advances per stage and its postfix names the current
    stage, its points and units of work; without tqdm one line per stage is printed.
    """

    def __init__(self, total: int, desc: str, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.desc = desc
        self._stage = ""
        self._units = 0
        self._start = time.perf_counter()
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._bar: Any = None
        else:
            self._bar = tqdm(total=total, desc=desc, unit="stage", file=self.stream, dynamic_ncols=True,
                             leave=True)

    def stage(self, name: str, points: int) -> None:
        self._stage, self._units, self._points, self._start = name, 0, points, time.perf_counter()
        self._show(f"{name} on {points} points")

    def __call__(self, event: str) -> None:
        self._units += 1
        self._show(f"{self._stage} on {self._points} points: {event}")

    def done(self, result: str) -> None:
        seconds = time.perf_counter() - self._start
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._stage}: {result} ({seconds:.0f} s)", refresh=False)
            self._bar.update()
        else:
            print(f"{self.desc}: {self._stage} on {self._points} points: {result} ({seconds:.1f} s)",
                  file=self.stream, flush=True)

    def _show(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
