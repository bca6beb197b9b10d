"""No line of a tracked ``.py`` file is longer than the line length set once, in pyproject.toml's
``[tool.ruff] line-length`` (issue #22). ``ruff check`` enforces the same number (rule E501); this test
keeps it where ruff is not installed, and names every offending ``file:line``.

The files are those git lists (tracked, plus new files it does not ignore); without git, every ``.py``
file under the repository root outside ``.venv``, ``build``, ``.git`` and other hidden folders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".venv", "venv", "build", "dist", ".git", "__pycache__"}


def configured_line_length(pyproject: Path = ROOT / "pyproject.toml") -> int:
    """``[tool.ruff] line-length`` of pyproject.toml (tomllib, else tomli, else a plain reading of that line)."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib as toml
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as toml
        except ModuleNotFoundError:
            toml = None
    if toml is not None:
        return int(toml.loads(text)["tool"]["ruff"]["line-length"])
    section = re.search(r"^\[tool\.ruff\]\s*$(.*?)(?=^\[)", text + "\n[", re.M | re.S)
    assert section is not None, "pyproject.toml has no [tool.ruff] section"
    found = re.search(r"^line-length\s*=\s*(\d+)", section.group(1), re.M)
    assert found is not None, "pyproject.toml's [tool.ruff] sets no line-length"
    return int(found.group(1))


def long_lines(text: str, limit: int) -> list[tuple[int, int]]:
    """``(line number, length in characters)`` of each line of ``text`` longer than ``limit``."""
    return [
        (number, len(line))
        for number, line in enumerate(text.split("\n"), start=1)
        if len(line.rstrip("\r")) > limit
    ]


def python_files(root: Path = ROOT) -> list[Path]:
    """The repository's ``.py`` files: git's list where git answers, else a walk of the folder."""
    if shutil.which("git") is not None and (root / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
            cwd=root, capture_output=True, text=True, check=False,
        )
        if listed.returncode == 0:
            paths = {root / name for name in listed.stdout.split("\0") if name}
            return sorted(path for path in paths if path.is_file())
    return sorted(
        path for path in root.rglob("*.py")
        if not any(part in SKIPPED_DIRS or part.startswith(".") for part in path.relative_to(root).parts[:-1])
    )


def report(files: list[Path], limit: int, root: Path = ROOT) -> list[str]:
    """``path:line: N characters`` for every line over ``limit`` in ``files``."""
    out = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        out += [f"{name}:{number}: {length} characters" for number, length in long_lines(text, limit)]
    return out


def test_no_line_longer_than_the_configured_length():
    limit = configured_line_length()
    files = python_files()
    assert len(files) > 50, f"found only {len(files)} .py files under {ROOT}: the file listing is broken"
    offenders = report(files, limit)
    assert not offenders, (
        f"{len(offenders)} line(s) over {limit} characters (pyproject.toml [tool.ruff] line-length); wrap them:\n"
        + "\n".join(offenders)
    )


def test_the_checker_reports_a_line_one_character_too_long(tmp_path):
    limit = configured_line_length()
    assert limit > 2
    good, bad = "x" * limit, "# " + "y" * (limit - 1)
    assert len(bad) == limit + 1
    assert long_lines(f"{good}\n{bad}\n{good}\r\n", limit) == [(2, limit + 1)]
    assert long_lines(f"{good}\r\n", limit) == []  # a Windows line end is not a character of the line
    (tmp_path / "ok.py").write_text(f"{good}\n", encoding="utf-8")
    (tmp_path / "long.py").write_text(f"a = 1\n{bad}\n", encoding="utf-8")
    files = python_files(tmp_path)  # no git here: the folder walk
    assert [path.name for path in files] == ["long.py", "ok.py"]
    assert report(files, limit, root=tmp_path) == [f"long.py:2: {limit + 1} characters"]
