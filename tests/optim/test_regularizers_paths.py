"""MESA, SAF and SharpnessDataSelection live in sharpguard.regularizers; every old import path still works.

Each import runs in a fresh interpreter, so the order in which the packages are first imported (the
regularizers read the optim package's pass flag; the optim package re-exports them) cannot hide a cycle.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

NAMES = ("MESA", "SAF", "SharpnessDataSelection")

# (statement, the name it binds) for every documented way to reach the three classes
IMPORTS = [
    *[(f"from sharpguard.regularizers import {n} as got", n) for n in NAMES],
    ("from sharpguard.regularizers.mesa import MESA as got", "MESA"),
    ("from sharpguard.regularizers.saf import SAF as got", "SAF"),
    ("from sharpguard.regularizers.data_selection import SharpnessDataSelection as got", "SharpnessDataSelection"),
    *[(f"from sharpguard.optim import {n} as got", n) for n in NAMES],
    ("from sharpguard.optim.mesa import MESA as got", "MESA"),
    ("from sharpguard.optim.saf import SAF as got", "SAF"),
    ("from sharpguard.optim.data_selection import SharpnessDataSelection as got", "SharpnessDataSelection"),
    *[(f"import sharpguard; got = sharpguard.{n}", n) for n in NAMES],
    *[(f"import sharpguard.optim; got = sharpguard.optim.{n}", n) for n in NAMES],
]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("statement", "name"), IMPORTS, ids=[s for s, _ in IMPORTS])
def test_every_old_and_new_import_path_gives_the_class_defined_in_regularizers(statement, name):
    module = {"MESA": "mesa", "SAF": "saf", "SharpnessDataSelection": "data_selection"}[name]
    code = (
        f"{statement}\n"
        f"import sharpguard.regularizers.{module} as home\n"
        f"assert got is home.{name}, (got, home.{name})\n"
        f"assert got.__module__ == 'sharpguard.regularizers.{module}', got.__module__\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr


def test_the_default_gamma_is_importable_from_both_modules():
    from sharpguard.optim.data_selection import DEFAULT_GAMMA as old
    from sharpguard.regularizers.data_selection import DEFAULT_GAMMA as new

    assert old == new == 0.5


def test_importing_the_optim_package_does_not_import_the_regularizers():
    """The layering runs one way: the loss terms build on optim (its pass flag, its optimizer unwrap)."""
    out = _run("import sys, sharpguard.optim; print(sorted(m for m in sys.modules if 'regularizers' in m))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_an_unknown_name_of_the_optim_package_still_raises_attribute_error():
    import sharpguard.optim

    with pytest.raises(AttributeError, match="no attribute 'NotAVariant'"):
        sharpguard.optim.NotAVariant  # noqa: B018


def test_mesa_trains_the_module_inside_a_ddp_wrapper():
    """MESA's student and teacher are the module DDP wraps (one gloo process), not the wrapper."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from sharpguard.regularizers import MESA

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = nn.Linear(3, 2)
        mesa = MESA(nn.parallel.DistributedDataParallel(inner))
        assert mesa.model is inner
        assert type(mesa.teacher) is nn.Linear and mesa.teacher is not inner
        torch.testing.assert_close(mesa.teacher.weight, inner.weight, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
