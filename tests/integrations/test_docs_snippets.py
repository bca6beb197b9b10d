"""Every ```python block of README.md and docs/*.md runs as written, with the repository's environment,
offline, each in its own empty folder and its own process (forked from one interpreter that has imported
torch, transformers, Lightning, Accelerate, peft and sharpguard, so the imports are paid once).

The markdown says what a block assumes, in HTML comments just before it (not rendered):

- ``<!-- snippet: given ... -->``: code that makes the objects the block names (a small model, a batch,
  a loader, ...), run before it; ``<!-- snippet: page-given ... -->`` does so for every later block of
  the page.
- ``<!-- snippet: continue -->``: the block goes on from the previous runnable block of the page (one
  program shown in pieces); the pieces run together, once.
- ``<!-- snippet: skip REASON -->``: not run (a signature listing, a GPU-only block); every such block is
  listed by ``test_skipped_blocks_are_listed``.
- ``<!-- snippet: slow -->``: marked ``@pytest.mark.slow``.

A ``transformers.Trainer`` a block builds and leaves untrained is trained afterwards (``trainer.train()``
is what a user does next with it): that is where the plain-Trainer monitor block once failed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOKEN = re.compile(r"<!--\s*snippet:\s*(?P<kind>[\w-]+)(?P<arg>.*?)-->|^```python\n(?P<code>.*?)^```", re.S | re.M)
KINDS = {"given", "page-given", "continue", "skip", "slow"}

# run after the program: train what a block built but left untrained, as a user would next
EPILOGUE = textwrap.dedent("""
    def _train_untrained_trainers(namespace):
        import sys
        if "transformers" not in sys.modules:
            return
        from transformers import Trainer
        for value in list(namespace.values()):
            if isinstance(value, Trainer) and value.state.global_step == 0:
                value.train()
    _train_untrained_trainers(dict(globals()))
    print("snippet ran")
""")


@dataclass
class Snippet:
    page: str
    lines: list[int]
    code: str  # the program run: givens, the joined blocks
    skip: str | None = None
    slow: bool = False
    blocks: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{'+'.join(map(str, self.lines))}"


def collect(pages=PAGES) -> list[Snippet]:
    """Every python block of ``pages``, joined and given as the markdown's snippet comments say."""
    out: list[Snippet] = []
    for page in pages:
        text = page.read_text()
        name = page.relative_to(ROOT).as_posix()
        page_given, pending, last = "", [], None
        for m in TOKEN.finditer(text):
            if m.group("kind"):
                kind, arg = m.group("kind"), m.group("arg")
                if kind not in KINDS:
                    raise ValueError(f"{name}: unknown snippet comment {kind!r} (known: {sorted(KINDS)})")
                if kind == "page-given":
                    page_given += textwrap.dedent(arg).strip("\n") + "\n"
                else:
                    pending.append((kind, arg))
                continue
            line = text.count("\n", 0, m.start()) + 1
            block = m.group("code")
            kinds = dict(pending)
            pending = []
            given = textwrap.dedent(kinds.get("given", "")).strip("\n")
            if "skip" in kinds:
                reason = kinds["skip"].strip()
                if not reason:
                    raise ValueError(f"{name}:{line}: a skipped block must say why")
                out.append(Snippet(name, [line], block, skip=reason))
                continue
            if "continue" in kinds:
                if last is None:
                    raise ValueError(f"{name}:{line}: 'continue' with no runnable block before it")
                out.remove(last)
                last = Snippet(name, [*last.lines, line], f"{last.code}\n{given}\n{block}",
                               slow=last.slow or "slow" in kinds, blocks=[*last.blocks, block])
            else:
                last = Snippet(name, [line], f"{page_given}\n{given}\n{block}", slow="slow" in kinds, blocks=[block])
            out.append(last)
    return out


SNIPPETS = collect()


ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0",
       "WANDB_MODE": "disabled"}

# Runs each program in a child forked from one interpreter that has imported the heavy libraries once (the
# imports are most of a small block's time): each child starts from that state, in its own empty folder,
# with its own stdout/stderr; nothing a block does reaches the next.
DRIVER = textwrap.dedent("""
    import json, os, sys, traceback
    import torch, transformers, accelerate, peft, pytorch_lightning, sharpguard  # noqa: F401
    import sharpguard.integrations.huggingface, sharpguard.integrations.lightning  # noqa: F401
    import sharpguard.integrations.accelerate  # noqa: F401
    results = {}
    for folder in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            os.chdir(folder)
            os.dup2(os.open("stdout", os.O_WRONLY | os.O_CREAT), 1)
            os.dup2(os.open("stderr", os.O_WRONLY | os.O_CREAT), 2)
            code = 0
            try:
                program = os.path.abspath("snippet.py")
                exec(compile(open(program).read(), program, "exec"), {"__name__": "__main__"})
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[folder] = os.waitstatus_to_exitcode(status)
    print(json.dumps(results))
""")


def run_programs(codes: dict[str, str], workdir: Path, timeout: float = 1200) -> dict[str, tuple[int, str, str]]:
    """Run each program (id -> code, the epilogue appended) in its own folder under ``workdir``; return
    id -> (exit code, stdout, stderr)."""
    folders = {}
    for n, (key, code) in enumerate(codes.items()):
        folder = workdir / f"snippet{n}"
        folder.mkdir(parents=True)
        (folder / "snippet.py").write_text(code + "\n" + EPILOGUE)
        folders[key] = folder
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([str(f) for f in folders.values()])],
                          cwd=workdir, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes_by_folder = json.loads(proc.stdout.strip().splitlines()[-1])
    return {key: (codes_by_folder[str(f)], (f / "stdout").read_text(), (f / "stderr").read_text())
            for key, f in folders.items()}


def run_program(code: str, workdir: Path) -> tuple[int, str, str]:
    return run_programs({"one": code}, workdir)["one"]


def _params():
    for s in SNIPPETS:
        if s.skip is None:
            yield pytest.param(s, id=s.id, marks=[pytest.mark.slow] if s.slow else [])


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every block not marked slow, run once through one driver."""
    return run_programs({s.id: s.code for s in SNIPPETS if s.skip is None and not s.slow},
                        tmp_path_factory.mktemp("snippets"))


@pytest.mark.parametrize("snippet", list(_params()))
def test_snippet_runs_as_written(snippet: Snippet, request, tmp_path):
    if snippet.slow:
        code, out, err = run_program(snippet.code, tmp_path)
    else:
        code, out, err = request.getfixturevalue("quick_results")[snippet.id]
    assert code == 0 and "snippet ran" in out, f"{snippet.id} failed:\n{err[-4000:]}\n--- program ---\n{snippet.code}"


# the blocks that are not run, by page and the first word of their reason; a new skip is added here on purpose
SKIPPED = [
    ("docs/cost_model.md", "signatures"),
    ("docs/lightning.md", "signature"),
    ("docs/lightning.md", "signature"),
    ("docs/monitors.md", "signatures"),
    ("docs/optim.md", "CUDA"),
    ("docs/optim.md", "protocol"),
    ("docs/optim.md", "protocol"),
]


def test_skipped_blocks_are_listed():
    skipped = [s for s in SNIPPETS if s.skip is not None]
    run = sum(len(s.lines) for s in SNIPPETS if s.skip is None)
    listing = "\n".join(f"{s.id}: {s.skip}" for s in skipped)
    print(f"{len(skipped)} of {len(skipped) + run} python blocks not run:\n{listing}")
    assert sorted((s.page, s.skip.split()[0]) for s in skipped) == sorted(SKIPPED), listing


def test_every_page_block_is_collected():
    """No python block escapes the runner (a fence the pattern missed would go untested)."""
    for page in PAGES:
        fences = len(re.findall(r"^```python$", page.read_text(), flags=re.M))
        name = page.relative_to(ROOT).as_posix()
        assert fences == sum(len(s.lines) for s in SNIPPETS if s.page == name), name


def test_the_runner_fails_on_the_old_plain_trainer_block(tmp_path):
    """The docs/huggingface.md block of the plain Trainer once built the trainer and stopped; training
    it raised (the callback refused to run without set_trainer). The runner trains what a block leaves
    untrained, so that failure is caught: here with the old refusal put back."""
    (page,) = [s for s in SNIPPETS if s.page == "docs/huggingface.md" and "Trainer(model=model" in s.code
               and "SharpnessMonitorCallback(measures" in s.code]
    old_block = textwrap.dedent("""
        from transformers import Trainer
        from sharpguard.integrations.huggingface import SharpnessMonitorCallback

        cb = SharpnessMonitorCallback(every_n_steps=200, measures=("lambda_max", "trace"), probe_size=256)
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[cb])
    """)
    old_refusal = textwrap.dedent("""
        from sharpguard.errors import ConfigurationError
        from sharpguard.integrations.huggingface import SharpnessMonitorCallback as _C
        def _refuse(self, args, state, control, **kw):
            if self.trainer is None:
                raise ConfigurationError("SharpnessMonitorCallback logs through Trainer.log, and callbacks are not "
                                         "given the Trainer: call callback.set_trainer(trainer) before trainer.train()")
        _C.on_train_begin = _refuse
    """)
    given = page.code[: page.code.index(page.blocks[0])]
    results = run_programs({"old": given + old_refusal + old_block, "today": given + old_block}, tmp_path)
    code, _, err = results["old"]
    assert code != 0 and "call callback.set_trainer(trainer)" in err
    code, out, err = results["today"]  # today's callback: the same block trains
    assert code == 0 and "snippet ran" in out, err[-3000:]
