"""``pip install "sharpguard[study]"`` installs everything the study imports.

The check, offline and in a fresh virtual environment: ``python -m venv --without-pip`` makes a venv whose
only third-party packages are those of the test environment, seen through a ``.pth`` file. Inside it a
script reads the ``study`` extra and the core dependencies from pyproject.toml, resolves their transitive
closure over the installed distributions' own ``Requires-Dist`` metadata (markers evaluated, as pip does),
maps the closure to the top-level modules those distributions provide, and compares that with every
top-level module that ``sharpguard/study/*.py`` imports (``import``/``from`` statements anywhere in the
file, ``require("module", ...)`` calls, and the modules imported by the sharpguard modules the study
imports). Without ``pytorch-lightning`` in the extra the study's Lightning import is reported missing.
"""

from __future__ import annotations

import json
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent(r'''
    import ast, importlib.metadata as md, json, re, sys, tomllib
    from pathlib import Path
    from packaging.requirements import Requirement

    root = Path(sys.argv[1])
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["study"]]

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
    closure, missing, todo = set(), [], list(wanted)
    while todo:
        req = todo.pop()
        key = norm(req.name)
        if key in closure:
            continue
        dist = installed.get(key)
        if dist is None:
            missing.append(str(req))
            continue
        closure.add(key)
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    provides = {}
    for module, dists in md.packages_distributions().items():
        for d in dists:
            provides.setdefault(module, set()).add(norm(d))

    def imports_of(path):
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {(a.name, 0) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                found.add((node.module or "", node.level))
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
                  and isinstance(node.args[0], ast.Constant)):
                found.add((node.args[0].value, 0))
        return found

    def resolve(module, level, here):
        if level == 0:
            return module
        base = here.split(".")[: -level]
        return ".".join(base + ([module] if module else []))

    def source_of(module):
        parts = module.split(".")
        if parts[0] != "sharpguard":
            return None
        if len(parts) > 1 and parts[1] == "integrations":
            rel = Path("integrations", *parts[2:])
        else:
            rel = Path(*parts)
        for cand in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
            if cand.exists():
                return cand
        return None

    seen_files, third_party = set(), set()
    todo = [(p, "sharpguard.study." + p.stem if p.stem != "__init__" else "sharpguard.study.__init__")
            for p in sorted((root / "sharpguard" / "study").glob("*.py"))]
    while todo:
        path, name = todo.pop()
        if path in seen_files:
            continue
        seen_files.add(path)
        for module, level in imports_of(path):
            full = resolve(module, level, name)
            top = full.split(".")[0]
            if top == "sharpguard":
                src = source_of(full)
                if src is not None:
                    todo.append((src, full if src.name != "__init__.py" else full + ".__init__"))
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                third_party.add(top)
    uncovered = sorted(m for m in third_party if not (provides.get(m, set()) & closure))
    print(json.dumps({"third_party": sorted(third_party), "closure": sorted(closure), "uncovered": uncovered,
                      "missing": missing, "files": len(seen_files)}))
''')


def _fresh_venv(tmp_path: Path) -> Path:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(env)
    py = env / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the fresh venv sees the test environment's installed distributions, and nothing else
    (Path(site) / "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


@pytest.mark.slow
def test_study_extra_provides_every_module_the_study_imports(tmp_path):
    py = _fresh_venv(tmp_path)
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    done = subprocess.run([str(py), str(script), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["files"] > len(list((ROOT / "sharpguard" / "study").glob("*.py")))  # followed sharpguard imports
    assert {"torch", "numpy", "scipy", "matplotlib", "sklearn", "tqdm",
            "pytorch_lightning"} <= set(result["third_party"])
    assert result["missing"] == []
    assert result["uncovered"] == [], (f"the study imports {result['uncovered']}, which sharpguard[study] does "
                                       "not install")


@pytest.mark.slow
def test_the_check_would_catch_a_missing_lightning(tmp_path):
    """The same check against a pyproject whose study extra lacks pytorch-lightning (as before issue 15)."""
    import tomllib

    py = _fresh_venv(tmp_path)
    fake = tmp_path / "fake_root"
    (fake / "sharpguard").mkdir(parents=True)
    (fake / "sharpguard" / "study").symlink_to(ROOT / "sharpguard" / "study")
    for name in ("__init__.py", "errors.py", "_batches.py", "_state.py"):
        (fake / "sharpguard" / name).symlink_to(ROOT / "sharpguard" / name)
    (fake / "integrations").symlink_to(ROOT / "integrations")
    for sub in ("attacks", "sharpness", "adversarial", "monitor", "optim"):
        (fake / "sharpguard" / sub).symlink_to(ROOT / "sharpguard" / sub)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    study = [r for r in project["optional-dependencies"]["study"] if "lightning" not in r]
    (fake / "pyproject.toml").write_text(
        "[project]\ndependencies = " + json.dumps(project["dependencies"]) + "\n"
        "[project.optional-dependencies]\nstudy = " + json.dumps(study) + "\n")
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    done = subprocess.run([str(py), str(script), str(fake)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pytorch_lightning" in json.loads(done.stdout)["uncovered"]
