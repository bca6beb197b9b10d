"""A SAM variant is declared once and registered by its class: adding one is one class (one file).

The variant below is defined here, in the test module, and never named anywhere in sharpguard; make_sam,
SAMConfig and the Lightning callback build it by name, and its step is checked against a float64 hand
computation. It is removed from the registry afterwards.
"""

from __future__ import annotations

import ast
import inspect
import math
import pathlib
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch

import sharpguard
from sharpguard.errors import ConfigurationError
from sharpguard.optim import SAM, SAMConfig, VARIANTS, make_sam
from sharpguard.optim import registry
from sharpguard.optim.factory import canonical_variant

OPTIM = pathlib.Path(sharpguard.__file__).parent / "optim"

#: every variant sharpguard ships, with its aliases
SHIPPED = [
    "sam", "asam", "gsam", "looksam", "momentum_sam", "friendly_sam", "wsam", "rwp", "arwp", "esam", "flat_lora",
    "gam", "bsam",
]


def _scaled_sam_class() -> type[SAM]:
    """SAM whose step gradient is ``factor`` times the gradient at ``w + e`` (a toy variant, one knob more)."""

    class ScaledSAM(SAM):
        variant: ClassVar[str] = "scaled_sam_for_tests"
        aliases: ClassVar[tuple[str, ...]] = ("ssam_tests",)

        @classmethod
        def _configure(cls, *, rho: float = 0.2, factor: float = 0.5) -> dict[str, Any]:  # type: ignore[override]
            if not isinstance(factor, float) or not 0.0 < factor <= 1.0:
                raise ConfigurationError(f"factor must be a float in (0, 1], got {factor!r}; pass e.g. 0.5.")
            return {"rho": SAM._configure(rho=rho)["rho"], "factor": factor, "adaptive": False, "interval": 1}

        def _after_perturbed_pass(self, params, grads):
            torch._foreach_mul_(grads, self.factor)

    return ScaledSAM


@pytest.fixture
def scaled_sam():
    cls = _scaled_sam_class()
    try:
        yield cls
    finally:
        registry.unregister(cls)
    assert "scaled_sam_for_tests" not in VARIANTS
    with pytest.raises(ConfigurationError, match="unknown SAM variant"):
        canonical_variant("ssam_tests")


A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
B = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
W0 = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)


def _gradient(w: torch.Tensor) -> torch.Tensor:
    return A @ w - B  # of L(w) = w^T A w / 2 - b^T w


def _hand_step(w: torch.Tensor, rho: float, factor: float, lr: float) -> torch.Tensor:
    g = _gradient(w)
    e = rho * g / math.sqrt(float(g @ g))
    return w - lr * factor * _gradient(w + e)


def _run(opt: SAM, w: torch.nn.Parameter, steps: int) -> None:
    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w - B @ w
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)


@pytest.mark.parametrize("name", ["scaled_sam_for_tests", "SSAM-tests", "Scaled-SAM_for-tests"])
def test_a_variant_defined_outside_sharpguard_is_built_by_name_and_steps_as_declared(scaled_sam, name):
    w = torch.nn.Parameter(W0.clone())
    opt = make_sam(torch.optim.SGD([w], lr=0.1), name, factor=0.25)
    assert type(opt) is scaled_sam and opt.knob_defaults() == {"rho": 0.2, "factor": 0.5}
    _run(opt, w, 3)
    expected = W0.clone()
    for _ in range(3):
        expected = _hand_step(expected, 0.2, 0.25, 0.1)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)


def test_samconfig_and_the_constructor_agree_on_the_new_variant(scaled_sam):
    config = SAMConfig.coerce({"variant": "ssam_tests", "rho": 0.1, "factor": 1.0})
    assert config.variant == "scaled_sam_for_tests" and config.resolved_knobs() == {"rho": 0.1, "factor": 1.0}
    assert config.describe() == "ScaledSAM(rho=0.1, factor=1.0): 2 forward/backward passes per step"
    w1, w2 = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(W0.clone())
    built = config.build(torch.optim.SGD([w1], lr=0.05))
    constructed = scaled_sam([w2], torch.optim.SGD, rho=0.1, factor=1.0, lr=0.05)
    _run(built, w1, 2)
    _run(constructed, w2, 2)
    assert torch.equal(w1, w2)
    # factor=1 is SAM itself
    w3 = torch.nn.Parameter(W0.clone())
    _run(SAM([w3], torch.optim.SGD, rho=0.1, lr=0.05), w3, 2)
    assert torch.equal(w1, w3)


def test_the_new_variant_shows_its_knobs_and_refuses_bad_ones_in_one_sentence(scaled_sam):
    params = list(inspect.signature(scaled_sam).parameters.values())
    assert [p.name for p in params] == [
        "params", "base_optimizer_cls", "rho", "factor", "model", "sync_perturbation", "nonfinite", "base_kwargs",
    ]
    assert params[3].default == 0.5 and params[3].kind is inspect.Parameter.KEYWORD_ONLY
    w = torch.nn.Parameter(W0.clone())
    for call, needle in (
        (lambda: make_sam(torch.optim.SGD([w], lr=0.1), "ssam_tests", factr=0.5), "did you mean 'factor'?"),
        (lambda: scaled_sam([w], torch.optim.SGD, lr=0.1, factr=0.5), "did you mean 'factor'?"),
        (lambda: scaled_sam([w], torch.optim.SGD, lr=0.1, factor=2.0), "factor must be a float in (0, 1]"),
        (lambda: scaled_sam([w], torch.optim.SGD, lr=0.1, rho=float("nan")), "rho must be a finite number"),
    ):
        with pytest.raises(ConfigurationError) as info:
            call()
        message = str(info.value)
        assert needle in message and "\n" not in message and message.endswith((".", "?"))
    assert torch.equal(w.detach(), W0)


def test_the_lightning_callback_takes_the_new_variant_by_name(scaled_sam):
    from integrations.lightning import SharpnessAwareMinimization

    callback = SharpnessAwareMinimization(variant="SSAM-tests", factor=0.75)
    assert callback.config.variant == "scaled_sam_for_tests" and callback.config.resolved_knobs()["factor"] == 0.75


def test_a_taken_name_is_refused_and_the_registry_is_unchanged(scaled_sam):
    before = dict(VARIANTS)
    with pytest.raises(ConfigurationError, match="'gsam' .* is taken by GSAM"):
        type("Impostor", (SAM,), {"variant": "gsam", "__module__": __name__})
    with pytest.raises(ConfigurationError, match="'msam' .* is taken by MomentumSAM"):
        type("Impostor", (SAM,), {"variant": "impostor", "aliases": ("msam",), "__module__": __name__})
    assert VARIANTS == before


def test_a_subclass_that_keeps_its_parents_name_is_no_new_variant():
    from sharpguard.optim import GSAM

    class TunedGSAM(GSAM):
        pass

    assert VARIANTS["gsam"] is GSAM
    assert inspect.signature(TunedGSAM).parameters["alpha"].default == 0.4


def test_every_shipped_variant_validates_without_an_instance_and_by_the_constructors_rule():
    assert list(VARIANTS)[: len(SHIPPED)] == SHIPPED
    for cls in (VARIANTS[name] for name in SHIPPED):
        defaults = cls.knob_defaults()
        init = inspect.signature(cls).parameters
        assert {k: init[k].default for k in defaults} == defaults, cls.__name__
        knobs = {"num_data": 10} if cls.__name__ == "BSAM" else {}
        values = cls.validate_knobs(**knobs)
        assert list(values) == list(defaults), cls.__name__
        with pytest.raises(ConfigurationError, match="did you mean"):
            cls.validate_knobs(**knobs, **{next(iter(defaults)) + "_": 1.0})
        first = next(iter(defaults))
        with pytest.raises(ConfigurationError, match=first):
            cls.validate_knobs(**{**knobs, first: float("nan")})


def test_a_knob_assigned_between_steps_goes_through_the_same_rule():
    from sharpguard.optim import GAM, LookSAM

    w = torch.nn.Parameter(W0.clone())
    opt = LookSAM([w], torch.optim.SGD, lr=0.1, k=3)
    opt.k = 4
    assert (opt.k, opt.interval, opt.cost) == (4, 4, (1.25, 1.25))
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigurationError, match="k must be an integer >= 1"):
            opt.k = bad
    assert opt.k == 4
    gam = GAM([w], torch.optim.SGD, lr=0.1)
    gam.beta2 = -0.5  # GAM's own rule (|beta2|) where the name means a decay rate elsewhere
    with pytest.raises(ConfigurationError, match="beta1 must be >= 0"):
        gam.beta1 = -0.1
    assert (gam.beta1, gam.beta2) == (0.6, -0.5)


def test_the_registry_is_complete_at_import_and_config_and_factory_do_not_import_each_other():
    code = "import sharpguard.optim as o; print(','.join(o.VARIANTS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == SHIPPED

    def imported(path: pathlib.Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names.add(node.module or "")
                names.update(alias.name for alias in node.names if node.module is None)
        return names

    config, factory, registry_imports = (imported(OPTIM / f) for f in ("config.py", "factory.py", "registry.py"))
    assert "factory" not in config and "config" in factory
    assert registry_imports == set()  # the classes come to the registry, it imports none of optim


def test_old_import_paths_keep_working():
    import sharpguard.optim as o
    from sharpguard.optim.lora import FlatLoRA, lora_layers, lora_parameters
    from sharpguard.optim.variants import GSAM, FriendlySAM, LookSAM, MomentumSAM
    from sharpguard.optim.variants_extra import ARWP, ESAM, RWP, WSAM
    from sharpguard.optim.variants_multi import BSAM, GAM

    for cls in (GSAM, FriendlySAM, LookSAM, MomentumSAM, ARWP, ESAM, RWP, WSAM, BSAM, GAM, FlatLoRA):
        assert getattr(o, cls.__name__) is cls is VARIANTS[cls.variant]
        assert getattr(sharpguard, cls.__name__) is cls
    assert o.lora_parameters is lora_parameters and callable(lora_layers)
