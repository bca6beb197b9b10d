"""Write one named section of benchmarks/RESULTS.md, leaving the other scripts' sections alone."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def machine() -> str:
    """One line describing where the numbers came from."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} ({threads} intra-op threads), "
        f"{gpu}, Python {platform.python_version()}"
    )


def example(name: str) -> ModuleType:
    """The module ``examples/<name>.py`` (examples/ is a folder of scripts, not a package), imported once
    under its own name so that what it defines can be pickled like any module's."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn``, one sample per call."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section ``## name`` in RESULTS.md with ``markdown``."""
    text = RESULTS.read_text() if RESULTS.exists() else _HEADER
    block = f"## {name}\n\n{markdown.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    RESULTS.write_text(text.rstrip() + "\n")
