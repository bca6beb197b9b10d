"""The README lists what the package has: every extra of pyproject.toml, every example, the short forms of
``sam=``, ``RobustnessMonitor(bounds=None)``; [all] installs every user-facing extra; and what the LoRA example
says about attention is true (SDPA gives the same Hessian as eager attention)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
USER_EXTRAS = sorted(set(EXTRAS) - {"bench", "test", "all"})  # bench and test are for developers


@pytest.mark.parametrize("extra", USER_EXTRAS + ["all"])
def test_readme_lists_every_extra(extra):
    assert f'"sharpguard[{extra}]"' in README


def test_all_installs_every_user_extra():
    (spec,) = EXTRAS["all"]
    listed = set(re.fullmatch(r"sharpguard\[(.*)\]", spec).group(1).split(","))
    assert listed == set(USER_EXTRAS)


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_readme_lists_every_example(example):
    assert f"examples/{example}" in README


def test_documented_short_forms_are_accepted():
    from sharpguard.optim import SAMConfig

    assert "sam=0.05" in README and "sam=0.05" in (ROOT / "docs" / "huggingface.md").read_text()
    assert SAMConfig.coerce(0.05) == SAMConfig.coerce({"rho": 0.05})
    assert SAMConfig.coerce("asam") == SAMConfig.coerce({"variant": "asam"})
    assert "bounds=None" in README


def test_lora_example_uses_sdpa_and_its_hessian_equals_eager_attention():
    import importlib.util

    import sharpguard as sg

    spec = importlib.util.spec_from_file_location("lora_example", ROOT / "examples" / "lora_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build_model()
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids}]
    sdpa_run = sg.hessian_eigenvalues(model, batches, k=1, seed=0)
    assert sdpa_run.hvp_method == "autograd+math_sdpa"  # the fused kernel has no double backward: math kernel
    sdpa = sdpa_run.eigenvalues[0]
    model.config._attn_implementation = "eager"  # the same weights through the eager attention
    for module_ in model.modules():
        if hasattr(module_, "config") and module_ is not model:
            module_.config._attn_implementation = "eager"
    eager_run = sg.hessian_eigenvalues(model, batches, k=1, seed=0)
    assert eager_run.hvp_method == "autograd"  # the switch reached the attention layers
    eager = eager_run.eigenvalues[0]
    assert sdpa == pytest.approx(eager, rel=1e-5)
