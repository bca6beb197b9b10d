"""Every knob of every public callable, against bad values: the enumeration comes from the signatures.

For each public callable (the ``__all__`` of sharpguard's public modules and the integrations' public
classes) the numeric knobs are the parameters whose default is an int or a float (bools are not
numbers) or whose annotation says ``int``/``float``; switches are those with a bool default; the
structural ones are the model, the batches, the inputs, the labels, the loss, the parameters, the
optimizer, the generator, the threat model, the bounds, the std and the measures; string knobs with a
string default are choices. Each is called with values no caller can mean (nan, inf, ``True``,
``"1"``, -1, 0 where a positive value is required, a fraction for a count, a probability above 1,
``"no"`` for a switch, the wrong type, an empty batch, float labels) on a tiny model, and every call
must end in a sharpguard error, before anything is changed: the model's parameters, buffers and
modes and the optimizer's state are compared bit for bit. int32 labels are the one valid value in
the list: they must simply work.

Run as a script (``python -m tests.test_bad_arguments``) it prints every case that is not refused
properly and the counts of raw errors, silent acceptances and state changes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.errors import SharpGuardError

MODULES = ["sharpguard.optim", "sharpguard.sharpness", "sharpguard.attacks", "sharpguard.adversarial",
           "sharpguard.monitor"]
INTEGRATIONS = ["integrations.lightning", "integrations.accelerate", "integrations.huggingface"]

# Not knobs: result containers, exceptions, framework mixins and functions that need a live framework
# object to reach their arguments (an Accelerator, a Trainer): their own tests cover them.
SKIP = {
    "NonDeterministicHVPError", "GradientMaskingWarning", "GradientMaskingError", "CatastrophicOverfitting",
    "AdversarialTrainingMixin", "SharpGuardTrainerMixin", "SharpGuardTrainer", "check_distributed_type",
    "MonitorStep", "Comm", "torch_comm",
    "sharded_global_norm", "count_passes", "default_generator", "geometry", "plot_loss_slice",
    "plot_spectral_density", "embedding_ascent", "gradient_carrier", "ShardedHVPOperator",
}

# Values that are legitimate for a knob although they look bad in general: -1 and 0 and > 1.
ZERO_OK = {
    "seed", "eta", "start_step", "warmup", "start_epoch", "weight_decay", "max_norm", "init_mag", "lam", "noise",
    "gamma", "decay", "beta", "beta1", "beta2", "beta3", "momentum", "drop", "lmbda", "alpha", "tiny", "epochs_ago",
    "first_step", "rise", "clear_below", "p_init", "weight", "budget", "threshold", "rho", "eps", "sigma", "damping",
    "s_init", "probe_state_max_bytes", "tail", "optimizer_state_vectors", "alpha_max", "rho_norm", "span", "epsilon",
    "init_mag", "step_size", "resident_bytes", "pass_bytes", "gradient_bytes", "graph_bytes",
}
# (callable, knob) pairs whose value is a probability or a fraction: 1.5 must be refused.
UNIT = {
    ("apgd", "momentum"), ("apgd", "rho"), ("apgd_targeted", "momentum"), ("apgd_targeted", "rho"),
    ("square", "p_init"), ("fab_targeted", "beta"), ("fab_targeted", "alpha_max"),
    ("BSAM", "beta1"), ("BSAM", "beta2"),
    ("RWP", "beta"), ("ARWP", "beta"), ("ESAM", "beta"), ("FriendlySAM", "lmbda"),
    ("RWP", "lmbda"), ("ARWP", "lmbda"), ("WSAM", "gamma"), ("MESA", "decay"),
    ("SurgeAlert", "decay"), ("CatastrophicOverfittingAlert", "drop"), ("CatastrophicOverfittingDetector", "drop"),
    ("SharpnessDataSelection", "gamma"), ("Monitor", "budget"), ("Schedule", "budget"),
}
# (callable, knob) pairs where a negative value is meaningful (GAM uses |beta2|, as its official code).
NEGATIVE_OK = {("GAM", "beta2")}
# String knobs that are free names, not choices.
FREE_STRINGS = {"metric", "curvature", "momentum_key", "input_key", "label_key", "name", "history", "layer"}
STRUCTURAL = {"model", "batches", "batch", "x", "y", "loss_fn", "params", "base_optimizer_cls", "optimizer", "probe",
              "bounds", "generator", "threat", "std", "measures"}


# ---------------------------------------------------------------------------------------------- fixtures


class TinyNet(nn.Module):
    """A BatchNorm classifier on 3x2x2 images: the buffers show any forward in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)  # four classes: APGD-T's DLR loss needs at least four

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class World:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    optimizer: torch.optim.Optimizer
    objects: list[Any] = field(default_factory=list)

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.x, self.y)]


def make_world() -> World:
    torch.manual_seed(0)
    model = TinyNet()
    x = torch.rand(6, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # one step so that the optimizer has state to compare
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
    return World(model, x, y, optimizer)


def snapshot(world: World) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in world.model.state_dict().items()}
    for i, state in enumerate(world.optimizer.state.values()):
        for k, v in state.items():
            if torch.is_tensor(v):
                out[f"opt.{i}.{k}"] = v.detach().clone()
    out["mode"] = torch.tensor([m.training for m in world.model.modules()])
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- the callables


@functools.cache
def public_callables() -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for module_name in MODULES + INTEGRATIONS:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if name in SKIP or not callable(obj) or (inspect.isclass(obj) and issubclass(obj, BaseException)):
                continue
            if is_dataclass(obj) and (name.endswith(("Result", "Report", "Cost", "Curvature", "Density", "Slice"))
                                      or name in {"AdversarialGeometry", "Alert", "CheckMemory", "PassCount",
                                                  "ProductPlan"}):
                continue  # result containers: built by sharpguard, not by callers
            key = name if module_name.startswith("sharpguard") else f"{module_name.split('.')[1]}.{name}"
            found.setdefault(key, obj)
    return found


def parameters_of(obj: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The signature's named parameters; a class whose ``__init__`` forwards ``**kwargs`` to its base
    gets the base's parameters too (``TRADES(..., **kwargs)`` takes ``PGDAT``'s ``norm``)."""
    params: dict[str, inspect.Parameter] = {}
    targets = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if inspect.isclass(obj) else [obj]
    for target in targets:
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            break
        forwards = False
        for p in sig.parameters.values():
            if p.name == "self":
                continue
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL:
                params.setdefault(p.name, p)
        if not forwards:
            break
    return params


def kind_of(p: inspect.Parameter) -> str | None:
    """``"int"``, ``"float"``, ``"bool"``, ``"str"`` from the default's type (or the annotation when
    the default is None or missing), else None."""
    d = p.default
    if isinstance(d, bool):
        return "bool"
    if isinstance(d, int):
        return "int"
    if isinstance(d, float):
        return "float"
    if isinstance(d, str):
        return "str"
    ann = str(p.annotation).replace("'", "")
    first = ann.split("|")[0].strip()
    if first in ("int", "float") and d in (None, inspect.Parameter.empty):
        return first
    return None


# Fast settings, so that a valid call takes milliseconds (the knob under test overrides them).
FAST = {
    "steps": 2, "n_queries": 8, "n_target_classes": 2, "max_iter": 5, "n_iter": 5, "n_hvp": 4, "n_v": 1,
    "n_grid": 20, "n_points": 3, "n_samples": 2, "attack_steps": 2, "n_curvature": 2, "n_examples": 4,
    "max_hvp": 200,
}


def base_call(name: str, obj: Callable[..., Any], world: World, params: dict[str, inspect.Parameter]):
    """A valid call: positional arguments and keyword arguments."""
    m, x, y, b = world.model, world.x, world.y, world.batches
    first = list(params)[:3]
    try:
        own = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        own = {}
    kwargs = {k: v for k, v in FAST.items() if k in own}
    if name in ("EmbeddingPerturbation", "embedding_pgd", "embedding_shape", "input_embeddings", "padding_mask"):
        from tests.helpers.tiny_text import tiny_bert

        bert = tiny_bert(0)
        batch = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
                 "labels": torch.tensor([0, 1])}
        world.model = bert
        return {
            "EmbeddingPerturbation": ((bert,), {}),
            "embedding_pgd": ((bert, batch), kwargs),
            "embedding_shape": ((bert, batch), {}),
            "input_embeddings": ((bert,), {}),
            "padding_mask": ((batch,), {}),
        }[name]
    if first[:2] == ["params", "base_optimizer_cls"]:
        return (m.parameters(), torch.optim.SGD), {"lr": 0.1, **kwargs}
    if name == "MESA":
        return (m, world.optimizer), kwargs
    if name == "SAF":
        return (6,), kwargs
    if name in ("make_sam", "SAMEngine", "unwrap_optimizer"):
        if name == "SAMEngine":
            from sharpguard.optim import SAM

            return (SAM(m.parameters(), torch.optim.SGD, lr=0.1),), kwargs
        return (world.optimizer,), kwargs
    if name == "eos_ratio":
        return (m, b, world.optimizer), kwargs
    if name in ("adversarial_geometry", "robust_sharpness"):
        return (m, b), {"eps": 0.03, **kwargs}
    if first[:2] == ["model", "batches"]:
        return (m, b), kwargs
    if first[:3] == ["model", "x", "y"]:
        return (m, x, y), kwargs
    if name in ("HVPOperator", "ProbeLoss", "ShardedHVPOperator"):
        return (m, b), kwargs
    if name in ("filter_normalized_direction",):
        from sharpguard.sharpness import ProbeLoss

        return (ProbeLoss(m, b), torch.Generator().manual_seed(0)), kwargs
    if name in ("penultimate_linear", "lora_parameters", "is_sharded", "spectral_normalize"):
        return (m,), kwargs
    if name in ("auto_micro_batches", "plan_products"):
        return (m, b), kwargs
    if name == "estimate_check_cost":
        return (1000,), {"step_seconds": 0.1, "step_peak_bytes": 1e6, **kwargs}
    if name == "estimate_check_memory":
        return (), {"step_peak_bytes": 1e6, "resident_bytes": 1e5, "vector_bytes": 1e4, **kwargs}
    if name == "estimate_plan_memory":
        from sharpguard.sharpness import ProductPlan

        return (ProductPlan(micro_batches=2, hvp="autograd", saved_bytes=1e6, saved_math_bytes=2e6, vector_bytes=1e4,
                            gradient_bytes=1e4, slice_fraction=0.5),), kwargs
    if name == "estimate_sam_cost":
        return (1000,), {"step_seconds": 0.1, **kwargs}
    if name in ("per_example_norm",):
        return (x,), kwargs
    if name in ("normalize_per_example", "normalize_per_token"):
        return (x.flatten(2),), kwargs
    if name == "project_per_example":
        return (x,), {"eps": 0.5}
    if name in ("grad_align_cosine", "symmetric_kl", "trades_kl"):
        return (m(x).detach(), m(x).detach()), kwargs
    if name in ("sam_adversarial_closure", "sam_adversarial_step"):
        from sharpguard.adversarial import PGDAT

        if name == "sam_adversarial_step":
            from sharpguard.optim import SAM

            return (SAM(m.parameters(), torch.optim.SGD, lr=0.1), m, PGDAT(steps=1), (x, y)), kwargs
        return (m, PGDAT(steps=1), (x, y)), kwargs
    if name == "make_method":
        return ("pgd-at",), kwargs
    if name == "resolve_loss":
        return ("ce",), kwargs
    if name == "make_generator":
        return ("cpu",), kwargs
    if name == "read_history":
        return ("/nonexistent/history.jsonl",), kwargs
    if name == "MonitorDriver":
        from sharpguard.monitor import SharpnessMonitor

        return (SharpnessMonitor(["lambda_max"], every_n_steps=1),), kwargs
    if name == "accelerate.SharpnessAwareMinimization":
        from accelerate import Accelerator

        return (Accelerator(cpu=True), m, world.optimizer), kwargs
    return (), kwargs


def call_name(key: str) -> str:
    return key if key.startswith("accelerate.") else key.split(".")[-1]


def accepts(key: str, knob: str, default: Any) -> bool:
    """Whether a knob reached through ``**kwargs`` is really taken (its default goes through)."""
    world = make_world()
    obj = public_callables()[key]
    params = parameters_of(obj)
    args, kwargs = base_call(call_name(key), obj, world, params)
    kwargs[knob] = default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            obj(*args, **kwargs)
        except TypeError as exc:
            return "unexpected keyword" not in str(exc)
        except Exception:  # noqa: BLE001 - only the keyword matters here
            return True
    return True


def exercise(name: str, result: Any, world: World) -> None:
    """After construction, use the object once where that is where an argument would bite."""
    from sharpguard.adversarial import AdversarialMethod

    if isinstance(result, AdversarialMethod) and name not in ("FGM", "EmbeddingPGD", "FreeLB", "SMART", "R3F"):
        world.model.train()
        result(world.model, (world.x, world.y))


@dataclass
class Case:
    callable: str
    knob: str
    value: Any
    must_refuse: bool = True  # False: a valid value that must simply work (int32 labels)
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.callable}-{self.knob}={self.label or repr(self.value)[:40]}"


NAN, INF = float("nan"), float("inf")


def numeric_values(callable_name: str, knob: str, kind: str, default: Any) -> list[tuple[Any, bool]]:
    values: list[tuple[Any, bool]] = [(NAN, True), (INF, True), (True, True), (False, True), ("1", True)]
    values.append((-1, (callable_name, knob) not in NEGATIVE_OK))
    if default != 0 and knob not in ZERO_OK:
        values.append((0, True))
    if kind == "int":
        values.append((1.5, True))
    if (callable_name, knob) in UNIT:
        values.append((1.5, True))
    return values


def structural_values(callable_name: str, knob: str, world: World) -> list[tuple[Any, bool, str]]:
    """(value, must be refused, label) for a structural argument."""
    x, y = world.x, world.y
    if knob == "model":
        return [(3, True, "3"), ("model", True, "'model'")]
    if knob == "batches" and callable_name == "ProbeSet":  # a container: its monitor's loss may take any targets
        return [([], True, "[]"), (5, True, "5"), ([(x[:0], y[:0])], True, "empty-batch")]
    if knob == "batches":
        return [([], True, "[]"), (5, True, "5"), ([(x[:0], y[:0])], True, "empty-batch"),
                ([(x, y.float())], True, "float-labels"), ([(x, y.to(torch.int32))], False, "int32-labels")]
    if knob == "batch":
        return [(5, True, "5")]
    if knob == "x":
        return [(x.tolist(), True, "list"), (x[:0], True, "empty")]
    if knob == "y":
        return [(y.float(), True, "float-labels"), (y.to(torch.int32), False, "int32-labels"), (y[:3], True, "short")]
    if knob == "loss_fn":
        return [(3, True, "3")]
    if knob == "params":
        return [([], True, "[]")]
    if knob in ("base_optimizer_cls", "optimizer"):
        return [(3, True, "3")]
    if knob == "probe":
        return [(5, True, "5")]
    if knob == "bounds":
        return [((1.0, 0.0), True, "reversed"), ((0.0, NAN), True, "(0,nan)"), ("01", True, "'01'")]
    if knob in ("generator", "threat"):
        return [(3, True, "3")]
    if knob == "std":
        return [((0.0, 0.0, 0.0), True, "zeros"), ((NAN, 1.0, 1.0), True, "nan")]
    if knob == "measures":
        return [(["not-a-measure"], True, "unknown"), (3, True, "3")]
    return []


def cases() -> list[Case]:
    world = make_world()
    out: list[Case] = []
    for name, obj in sorted(public_callables().items()):
        params = parameters_of(obj)
        try:
            own = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            own = {}
        for knob, p in params.items():
            short = name.split(".")[-1]
            if knob not in own and p.default is not inspect.Parameter.empty and not accepts(name, knob, p.default):
                continue
            if knob in STRUCTURAL:
                for value, refuse, label in structural_values(short, knob, world):
                    out.append(Case(name, knob, value, refuse, label))
                continue
            kind = kind_of(p)
            if kind in ("int", "float"):
                default = p.default if p.default is not inspect.Parameter.empty else None
                for value, refuse in numeric_values(short, knob, kind, default):
                    out.append(Case(name, knob, value, refuse))
            elif kind == "bool":
                out.append(Case(name, knob, "no", True))
                out.append(Case(name, knob, 2.5, True))
            elif kind == "str" and knob not in FREE_STRINGS:
                out.append(Case(name, knob, "not-a-choice", True))
                if "int" not in str(p.annotation):
                    out.append(Case(name, knob, 3, True))
    return out


def run_case(case: Case) -> str:
    """``"ok"``, ``"raw: ..."``, ``"silent"`` or ``"state"``."""
    world = make_world()
    obj = public_callables()[case.callable]
    params = parameters_of(obj)
    args, kwargs = base_call(call_name(case.callable), obj, world, params)
    names = list(params)
    args = list(args)
    index = names.index(case.knob)
    value = case.value
    if index < len(args):
        args[index] = value
    else:
        kwargs[case.knob] = value
    before = snapshot(world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = obj(*args, **kwargs)
            exercise(case.callable, result, world)
        except Exception as exc:  # noqa: BLE001 - the point is to see which
            if not same(before, snapshot(world)):
                return f"state: changed before {type(exc).__name__}: {str(exc)[:150]}"
            if not isinstance(exc, SharpGuardError):
                return f"raw: {type(exc).__name__}: {str(exc)[:150]}"
            return "ok" if case.must_refuse else f"raw: refused a valid value: {str(exc)[:150]}"
    return "silent" if case.must_refuse else "ok"


ALL = cases()


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_argument_is_refused_before_any_change(case: Case) -> None:
    assert run_case(case) == "ok"


# ------------------------------------------------------------------------------- the cases the issue named


def _tiny() -> World:
    return make_world()


NAMED = [
    ("GAM(beta1=-1)", lambda w: __import__("sharpguard.optim", fromlist=["GAM"]).GAM(
        w.model.parameters(), torch.optim.SGD, lr=0.1, beta1=-1), "beta1"),
    ("first_order_sharpness(eta=nan)",
     lambda w: __import__("sharpguard.sharpness", fromlist=["x"]).first_order_sharpness(
        w.model, w.batches, eta=NAN), "eta"),
    ("relative_flatness(max_hvp=2.5)", lambda w: __import__("sharpguard.sharpness", fromlist=["x"]).relative_flatness(
        w.model, w.batches, max_hvp=2.5), "max_hvp"),
    ("apgd(momentum=nan)", lambda w: __import__("sharpguard.attacks", fromlist=["x"]).apgd(
        w.model, w.x, w.y, steps=2, momentum=NAN), "momentum"),
    ("apgd(rho=inf)", lambda w: __import__("sharpguard.attacks", fromlist=["x"]).apgd(
        w.model, w.x, w.y, steps=2, rho=INF), "rho"),
    ("fab_targeted(eta=inf)", lambda w: __import__("sharpguard.attacks", fromlist=["x"]).fab_targeted(
        w.model, w.x, w.y, steps=2, n_target_classes=2, eta=INF), "eta"),
    ("SAM(rho=True)", lambda w: __import__("sharpguard.optim", fromlist=["x"]).SAM(
        w.model.parameters(), torch.optim.SGD, lr=0.1, rho=True), "rho"),
    ("pgd(steps='3')", lambda w: __import__("sharpguard.attacks", fromlist=["x"]).pgd(w.model, w.x, w.y, steps="3"),
     "steps"),
    ("hessian_eigenvalues(train='no')",
     lambda w: __import__("sharpguard.sharpness", fromlist=["x"]).hessian_eigenvalues(
        w.model, w.batches, train="no"), "train"),
    ("clean_accuracy(empty batch)", lambda w: __import__("sharpguard.attacks", fromlist=["x"]).clean_accuracy(
        w.model, [(w.x[:0], w.y[:0])]), "batch"),
    ("input_grad_norm(empty batch)", lambda w: __import__("sharpguard.attacks", fromlist=["x"]).input_grad_norm(
        w.model, [(w.x[:0], w.y[:0])]), "batch"),
    ("SharpnessMonitor(measure_kwargs={'lambda_max': {'tol_': 1e-3}})", lambda w: __import__(
        "sharpguard.monitor", fromlist=["x"]).SharpnessMonitor(measure_kwargs={"lambda_max": {"tol_": 1e-3}}),
     "did you mean 'tol'"),
    ("SharpnessMonitor(measure_kwargs={'trace': {'n_hvp': True}})", lambda w: __import__(
        "sharpguard.monitor", fromlist=["x"]).SharpnessMonitor(["trace"], measure_kwargs={"trace": {"n_hvp": True}}),
     "n_hvp"),
    ("make_method('fast-at', steps=2)", lambda w: __import__("sharpguard.adversarial", fromlist=["x"]).make_method(
        "fast-at", steps=2), "step"),
]


@pytest.mark.parametrize("call, name", [(c, n) for _, c, n in NAMED], ids=[i for i, _, _ in NAMED])
def test_named_cases_are_refused_in_one_sentence_naming_the_argument(call, name):
    world = _tiny()
    before = snapshot(world)
    with pytest.raises(SharpGuardError) as info:
        call(world)
    message = str(info.value)
    assert name in message and "\n" not in message and message.endswith(".") and len(message) < 300
    assert same(before, snapshot(world))


def test_a_huge_value_is_shown_in_a_bounded_message():
    from sharpguard.optim import SAM

    world = _tiny()
    with pytest.raises(SharpGuardError) as info:
        SAM(world.model.parameters(), torch.optim.SGD, lr=0.1, rho="9" * 1_000_000)
    assert len(str(info.value)) < 300 and "(str)" in str(info.value)


def test_numpy_scalars_are_numbers_and_switches():
    import numpy as np

    from sharpguard.optim import SAM

    world = _tiny()
    opt = SAM(world.model.parameters(), torch.optim.SGD, lr=0.1, rho=np.float32(0.1), interval=np.int64(2),
              adaptive=np.True_)
    assert opt.interval == 2 and opt.adaptive
    with pytest.raises(SharpGuardError, match="rho"):
        SAM(world.model.parameters(), torch.optim.SGD, lr=0.1, rho=np.bool_(True))


def test_fast_at_takes_its_one_step_by_name():
    from sharpguard.adversarial import make_method

    assert make_method("fast-at", steps=1).steps == 1


def test_int32_labels_train_exactly_as_int64_and_float_labels_change_nothing():
    """TRADES on a BatchNorm model: int32 labels are class indices (same loss, same statistics, as
    int64); float labels are refused before a forward touches the BatchNorm statistics."""
    from sharpguard.adversarial import TRADES

    results = []
    for labels in (torch.long, torch.int32, torch.uint8):
        world = _tiny()
        world.model.train()
        loss = TRADES(steps=2, seed=0)(world.model, (world.x, world.y.to(labels)))
        results.append((loss.detach(), snapshot(world)))
    for loss, state in results[1:]:
        assert torch.equal(loss, results[0][0]) and same(state, results[0][1])
    world = _tiny()
    world.model.train()
    before = snapshot(world)
    with pytest.raises(SharpGuardError, match="integer class indices"):
        TRADES(steps=2)(world.model, (world.x, world.y.float()))
    assert same(before, snapshot(world))


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "apgd", "square", "fab_targeted", "apgd_targeted"])
def test_int32_labels_give_the_same_adversarial_examples_as_int64(attack):
    import sharpguard.attacks as attacks

    world = _tiny()
    fn = getattr(attacks, attack)
    kwargs = {"fgsm": {}, "pgd": {"steps": 3}, "apgd": {"steps": 3}, "square": {"n_queries": 10},
              "fab_targeted": {"steps": 3, "n_target_classes": 2},
              "apgd_targeted": {"steps": 3, "n_target_classes": 2}}[attack]
    if attack != "fgsm":
        kwargs["generator"] = torch.Generator().manual_seed(1)
    a = fn(world.model, world.x, world.y, **kwargs)
    if "generator" in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(1)
    b = fn(world.model, world.x, world.y.to(torch.int32), **kwargs)
    assert torch.equal(a, b)


def test_checked_keeps_the_signature_the_enumeration_reads():
    from sharpguard.optim import SAM
    from sharpguard.sharpness import hessian_eigenvalues

    assert "rho" in inspect.signature(SAM).parameters
    assert list(inspect.signature(hessian_eigenvalues).parameters)[:3] == ["model", "batches", "loss_fn"]


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30), st.booleans(),
                 st.text(max_size=5), st.none()))
@settings(max_examples=300, deadline=None)
def test_real_accepts_exactly_the_finite_non_bool_numbers(value):
    from sharpguard._validation import real

    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    try:
        out = real("x", value)
    except SharpGuardError:
        assert not number
    else:
        assert number and out == float(value)


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 2**65), st.booleans(),
                 st.text(max_size=3)))
@settings(max_examples=300, deadline=None)
def test_counts_and_seeds_accept_exactly_the_whole_numbers_in_range(value):
    from sharpguard._validation import positive_int, seed

    whole = isinstance(value, int) and not isinstance(value, bool)
    for rule, low, high in ((positive_int, 1, math.inf), (seed, 0, 2**64 - 1)):
        try:
            rule("n", value)
        except SharpGuardError:
            assert not (whole and low <= value <= high)
        else:
            assert whole and low <= value <= high


if __name__ == "__main__":
    from collections import Counter

    counts: Counter[str] = Counter()
    for c in ALL:
        r = run_case(c)
        counts[r.split(":")[0]] += 1
        if r != "ok":
            print(f"{r[:170]:<60}  {c.id}")
    print(len(ALL), dict(counts))
    sys.exit(0)
