"""AutoAttack's cascade (Croce & Hein, ICML 2020): the evaluation a robustness number should survive.

``version="standard"`` is AutoAttack's standard version: APGD-CE (100 steps) -> APGD-T (100 steps, 9
target classes) -> FAB-T (100 steps, 9 target classes) -> Square (5,000 queries, ``p_init`` 0.8),
each attack run only on the points every earlier attack failed on, and a point's first successful
adversarial example kept. For the l1 threat model the APGD stages are l1-APGD (Croce & Hein, ICML
2021) with AutoAttack's l1 settings (5 restarts of APGD-CE, 5 target classes for APGD-T, the
``3 eps, 2 eps, eps`` radius schedule); Square has no l1 version here and is skipped with a note.
``version="fast"`` is the cheap check for monitors: APGD-CE and APGD-T (3 targets), 25 steps each.

Before attacking, the checks of AutoAttack's ``checks.py`` run on the batch (probabilities instead of
logits, randomness across two forwards, zero gradients); after, the "Square beats white-box" check.
Each finding warns with :class:`~sharpguard.attacks.checks.GradientMaskingWarning` (``checks="warn"``),
raises (``"raise"``) or is only recorded in the report (``"off"``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .._batches import logits_of
from ..errors import ConfigurationError
from . import _progress
from . import checks as _checks
from ._context import as_normal_tensor, attack_context, check_label_range, check_labels, check_steps
from .fab import fab_targeted
from .gradient import _threat, apgd, apgd_targeted
from .square import square
from .threat import ThreatModel, default_generator
from .. import _validation as rules

__all__ = ["AutoAttack", "AutoAttackReport", "auto_attack", "VERSIONS"]

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# name -> (apgd and fab steps, APGD-T target classes, square queries or None, run FAB-T)
VERSIONS: dict[str, tuple[int, int, int | None, bool]] = {
    "standard": (100, 9, 5000, True),
    "fast": (25, 3, None, False),
}


@dataclass
class AutoAttackReport:
    """What one cascade did: accuracies after each stage, per-stage seconds, and the checks' findings.

    ``accuracies`` maps ``"clean"`` and each attack's name to the robust accuracy after it (a
    cascade: never increasing). ``flags`` lists the checks' messages, ``skipped`` the stages that
    could not run on this model or input. JSON-ready through :meth:`to_dict`.
    """

    n_examples: int
    accuracies: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def robust_accuracy(self) -> float:
        return list(self.accuracies.values())[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"robust_accuracy": self.robust_accuracy}


class AutoAttack:
    """The AutoAttack cascade as an attack callable ``attack(model, x, y) -> x_adv`` (for :func:`robust_accuracy`).

    ``version``: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"fast"``, or ``"custom"`` with
    ``attacks=[(name, attack), ...]`` (each ``attack(model, x, y) -> x_adv`` in the space ``x`` is given
    in). ``steps`` (APGD and FAB-T iterations), ``n_target_classes`` (APGD-T's; FAB-T keeps 9) and
    ``n_queries`` override the version's settings; ``norm="l1"`` follows AutoAttack's l1 settings. ``checks``:
    ``"warn"``, ``"raise"`` or ``"off"``. Random starts and Square's windows draw from ``generator`` (default:
    derived from the global RNG state, never advancing it). After each call ``last_report`` holds
    an :class:`AutoAttackReport`. ``progress``: show the cascade's progress on stderr (a tqdm bar
    naming the stage, its points and each target class done; one line per stage without tqdm):
    ``None`` (default) when stderr is a terminal, ``True`` always, ``False`` never.
    """

    @rules.checked()
    def __init__(
        self,
        eps: float = 8 / 255,
        norm: str = "linf",
        version: str = "standard",
        *,
        attacks: Sequence[tuple[str, Attack]] | None = None,
        steps: int | None = None,
        n_target_classes: int | None = None,
        n_queries: int | None = None,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        mean=None,
        std=None,
        threat: ThreatModel | None = None,
        generator: torch.Generator | None = None,
        model_mode: str = "eval",
        checks: str = "warn",
        progress: bool | None = None,
    ):
        self.threat = _threat(threat, norm, eps, bounds, mean, std)
        self.checks = _checks.check_mode(checks)
        self.model_mode = model_mode
        self.generator = generator
        self.progress = progress
        self.version = version
        if version == "custom":
            if not attacks:
                raise ConfigurationError("version='custom' needs attacks=[(name, attack), ...] (at least one).")
            names = [name for name, _ in attacks]
            if len(set(names)) != len(names) or "clean" in names:
                raise ConfigurationError(f"attack names must be unique and not 'clean', got {names}.")
            self.attacks = list(attacks)
            return
        if version not in VERSIONS:
            raise ConfigurationError(f"version must be one of {sorted(VERSIONS) + ['custom']}, got {version!r}.")
        if attacks is not None:
            raise ConfigurationError(f"attacks= is only read with version='custom', not with version={version!r}.")
        d_steps, d_targets, d_queries, self.fab_t = VERSIONS[version]
        if self.threat.norm == "l1" and n_target_classes is None and version == "standard":
            d_targets = 5  # AutoAttack's standard l1 setting
        self.steps = check_steps(d_steps if steps is None else steps)
        self.n_target_classes = check_steps(d_targets if n_target_classes is None else n_target_classes,
                                            "n_target_classes")
        self.n_queries = d_queries if n_queries is None else check_steps(n_queries, "n_queries")

    def _stages(self, x: torch.Tensor, n_classes: int, gen: torch.Generator,
                skipped: list[str]) -> list[tuple[str, Attack]]:
        if self.version == "custom":
            return self.attacks
        common = dict(threat=self.threat, generator=gen, model_mode=self.model_mode, check_range=False)
        l1 = self.threat.norm == "l1"
        restarts = 5 if l1 and self.version == "standard" else 1  # AutoAttack's l1 APGD-CE: 5 restarts
        stages: list[tuple[str, Attack]] = [
            ("apgd-ce", lambda m, a, b: apgd(m, a, b, steps=self.steps, loss="ce", restarts=restarts, **common)),
        ]
        if n_classes >= 4:
            stages.append(("apgd-t", lambda m, a, b: apgd_targeted(
                m, a, b, steps=self.steps, n_target_classes=self.n_target_classes, **common)))
        else:
            skipped.append(f"apgd-t: its targeted DLR loss needs at least 4 classes, the model has {n_classes}.")
        if self.fab_t:
            if n_classes < 4:
                skipped.append("fab-t: the targeted stages run on models with at least 4 classes, the model has "
                               f"{n_classes}.")
            elif self.threat.bounds is None:
                skipped.append("fab-t: it projects onto the input box and the threat model has bounds=None.")
            else:
                stages.append(("fab-t", lambda m, a, b: fab_targeted(
                    m, a, b, steps=self.steps, n_target_classes=9, **common)))
        if self.n_queries is not None:
            if l1:
                skipped.append("square: Square is implemented for linf and l2 only; the l1 cascade ends at FAB-T.")
            elif x.dim() == 4:
                # AutoAttack runs Square with the unscaled schedule (resc_schedule=False).
                stages.append(("square", lambda m, a, b: square(
                    m, a, b, n_queries=self.n_queries, p_init=0.8, rescale_schedule=False, **common)))
            else:
                skipped.append(f"square: it attacks (N, C, H, W) images, the inputs have shape {tuple(x.shape)}.")
        return stages

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0 or not x.dtype.is_floating_point:
            raise ConfigurationError("x must be a non-empty floating-point tensor with the batch in dimension 0.")
        # One guard around the whole cascade (grad on, inference tensors cloned, modes restored); the
        # stages nest their own.
        with attack_context(model, self.model_mode):
            y = check_labels(y, x.shape[0], required=True)
            x = as_normal_tensor(x)
            self.threat.to_pixel(x, check=True)  # the range check, once; the stages skip theirs
            return self._cascade(model, x, y)

    def _cascade(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = self.generator if self.generator is not None else default_generator(x.device)
        report = AutoAttackReport(n_examples=x.shape[0])

        def flag(message: str | None) -> None:
            if message is not None:
                report.flags.append(message)
                _checks.report_flag(message, self.checks)

        u = x.detach().requires_grad_(True)
        logits = logits_of(model(u))
        check_label_range(y, logits.shape[-1])
        flag(_checks.check_probability_output(logits))
        flag(_checks.check_zero_gradients(logits, u, y))
        with torch.no_grad():
            flag(_checks.check_randomness(lambda: logits_of(model(x)), y))
        robust = logits.detach().argmax(-1) == y
        x_adv = x.clone()
        report.accuracies["clean"] = float(robust.float().mean())

        stages = self._stages(x, logits.shape[-1], gen, report.skipped)
        bar = _progress.ProgressBar(len(stages),
                                    f"AutoAttack {self.version}") if _progress.wanted(self.progress) else None
        try:
            for name, attack in stages:
                index = robust.nonzero().squeeze(1)
                if index.numel() == 0:
                    break
                if bar is not None:
                    bar.stage(name, index.numel())
                start = time.perf_counter()
                with _progress.reporting(bar):
                    adv = attack(model, x[index], y[index])
                with torch.no_grad():
                    broken = logits_of(model(adv)).argmax(-1) != y[index]
                x_adv[index[broken]] = adv[broken].to(x_adv.dtype)
                robust[index[broken]] = False
                report.seconds[name] = time.perf_counter() - start
                report.accuracies[name] = float(robust.float().mean())
                if bar is not None:
                    bar.done(f"robust accuracy {report.accuracies[name]:.3f}")
        finally:
            if bar is not None:
                bar.close()

        self.last_report = report
        if self.checks != "off":
            for note in report.skipped:
                warnings.warn(f"AutoAttack stage skipped: {note}", UserWarning, stacklevel=3)
        flag(_checks.check_square_beats_white_box(report.accuracies))
        return x_adv.detach()


@rules.checked()
def auto_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 8 / 255,
    norm: str = "linf",
    version: str = "standard",
    **settings: Any,
) -> torch.Tensor:
    """Run the AutoAttack cascade on one batch and return ``x_adv`` (see :class:`AutoAttack` for ``settings``).

    ``robust_accuracy(model, batches, AutoAttack(eps=..., version="fast"))`` measures with it; the
    class keeps the last :class:`AutoAttackReport`. Side-effect free: parameters, ``.grad``, modes,
    BN statistics and the global RNG are as they were.
    """
    return AutoAttack(eps, norm, version, **settings)(model, x, y)
