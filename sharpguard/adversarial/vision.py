"""Adversarial training for images (batches ``(inputs, labels)``): PGD-AT, TRADES, MART, fast AT, AWP,
defensive distillation, and spectral normalization.

Attack generation runs with every module in eval mode by default (``attack_mode="eval"``, the
TRADES/AutoAttack convention: BatchNorm uses running statistics and is not updated, dropout is
off); the training objective runs in the model's own modes. ``attack_mode="train"`` follows
Madry/Wong (batch statistics during the attack, running statistics restored afterwards).
Inputs may be normalized outside the model: declare ``mean``/``std`` and ``eps``, ``alpha`` and
``bounds`` stay in pixel units (:class:`~sharpguard.attacks.ThreatModel`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._batches import logits_of
from .._state import preserve_buffers, preserve_modes, side_effect_free
from ..attacks import geometry
from ..attacks._context import attack_context, check_label_range, check_steps
from ..attacks.gradient import pgd
from ..attacks.losses import wide
from ..attacks.threat import ThreatModel, make_generator
from ..errors import ConfigurationError, SharpGuardError
from ..optim.functional import perturbation_scale
from ._names import build_method, method_key
from .base import AdversarialMethod, check_positive, image_batch, threat_from
from .. import _validation as rules

__all__ = [
    "PGDAT",
    "TRADES",
    "MART",
    "FastAT",
    "AWP",
    "DefensiveDistillation",
    "CatastrophicOverfittingDetector",
    "CatastrophicOverfitting",
    "spectral_normalize",
    "trades_kl",
]


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i KL(softmax(clean_i) || softmax(adv_i))`` (float32 or wider), gradient through both sides."""
    log_clean = F.log_softmax(wide(clean_logits), dim=-1)
    log_adv = F.log_softmax(wide(adv_logits), dim=-1)
    return F.kl_div(log_adv, log_clean, reduction="sum", log_target=True) / clean_logits.shape[0]


class _ImageMethod(AdversarialMethod):
    """Shared settings: the threat model and the PGD attack that generates ``x_adv``."""

    attack_loss = "ce"
    start = True

    @rules.checked()
    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool | str | None = None,
        *,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        mean=None,
        std=None,
        threat: ThreatModel | None = None,
        attack_mode: str = "eval",
        seed: int | None = None,
    ):
        super().__init__(seed=seed)
        self.threat = threat_from(threat, norm, eps, bounds, mean, std)
        self.alpha = check_positive("alpha", alpha)
        self.steps = check_steps(steps)
        self.random_start = self.start if random_start is None else random_start
        if attack_mode not in ("eval", "train", "keep"):
            raise ConfigurationError(f"attack_mode must be 'eval', 'train' or 'keep', got {attack_mode!r}.")
        self.attack_mode = attack_mode
        self._range_checked = False

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = image_batch(batch)
        x_adv = pgd(
            model, x, y, alpha=self.alpha, steps=self.steps, random_start=self.random_start,
            loss=self.attack_loss, threat=self.threat, generator=self.generator(x.device),
            model_mode=self.attack_mode,
            check_range=not self._range_checked,  # the first batch only: no device sync in later steps
        )
        self._range_checked = True
        return x_adv

    @property
    def attack_cost(self) -> tuple[int, int]:
        return (self.steps, self.steps)


class PGDAT(_ImageMethod):
    """PGD adversarial training (Madry et al., ICLR 2018, eq. 2.1): ``CE(f(x_adv), y)``.

    Cost per step: ``(K+1)`` forwards, ``(K+1)`` backwards (K attack steps, input-only gradients).
    """

    name = "pgd-at"
    replaces_inputs = True

    def objective(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> torch.Tensor:
        _, y = image_batch(batch)
        return F.cross_entropy(logits_of(model(x_adv)), y)


class TRADES(_ImageMethod):
    """TRADES (Zhang et al., ICML 2019, eq. 5): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))``.

    The attack maximises the KL to the clean prediction (computed once, not at every step as in the
    official code), starting at ``x + 0.001 N(0, 1)``. Cost: ``(K+3)`` forwards, ``(K+2)``
    backwards (the final ``backward()`` runs through the clean and the adversarial forward).
    """

    name = "trades"
    attack_loss = "kl"
    start = "normal"

    @rules.checked()
    def __init__(self, beta: float = 6.0, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, **kwargs: Any):
        super().__init__(eps, alpha, steps, **kwargs)
        self.beta = check_positive("beta", beta)

    @property
    def attack_cost(self) -> tuple[int, int]:
        return (self.steps + 1, self.steps)  # + the clean reference logits

    @property
    def objective_cost(self) -> tuple[int, int]:
        return (2, 2)  # clean and adversarial forwards; backward() runs through both

    def objective(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> torch.Tensor:
        x, y = image_batch(batch)
        clean = logits_of(model(x))
        adv = logits_of(model(x_adv))
        return F.cross_entropy(clean, y) + self.beta * trades_kl(clean, adv)


class MART(_ImageMethod):
    """MART (Wang et al., ICLR 2020, eq. 8): boosted CE on ``x_adv`` plus ``beta * KL * (1 - p_y(x))``.

    ``BCE = CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv))``; the KL is weighted per example by
    the clean probability of the wrong answer (constants as in the authors' code). Cost: ``(K+2)`` F, ``(K+2)`` B.
    """

    name = "mart"

    @rules.checked()
    def __init__(self, beta: float = 6.0, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, **kwargs: Any):
        super().__init__(eps, alpha, steps, **kwargs)
        self.beta = check_positive("beta", beta)

    @property
    def objective_cost(self) -> tuple[int, int]:
        return (2, 2)  # clean and adversarial forwards; backward() runs through both

    def objective(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> torch.Tensor:
        x, y = image_batch(batch)
        adv = wide(logits_of(model(x_adv)))
        clean = wide(logits_of(model(x)))
        adv_probs = F.softmax(adv, dim=1)
        top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
        wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        bce = F.cross_entropy(adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), wrong)
        clean_probs = F.softmax(clean, dim=1)
        true_probs = clean_probs.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), clean_probs, reduction="none").sum(1)
        return bce + self.beta * (kl * (1.0000001 - true_probs)).mean()


class CatastrophicOverfitting(SharpGuardError):
    """Raised by :class:`CatastrophicOverfittingDetector` with ``on_detect="raise"``."""


class CatastrophicOverfittingDetector:
    """Watch a fixed probe batch for catastrophic overfitting of single-step AT (Wong et al. 2020, section 5.3).

    Every ``every`` training steps it measures PGD accuracy on the probe (the first batch seen, at
    most ``max_examples`` examples, unless ``probe`` is given) with a fixed-seed random start, and
    flags overfitting when it falls more than ``drop`` below the best value seen (the Fast-AT
    early-stopping rule, 0.2). With ``grad_align=True`` it also records GradAlign's cosine
    (Andriushchenko & Flammarion, NeurIPS 2020, eq. 6) between the input gradients at ``x`` and at
    ``x + U(-eps, eps)``: it collapses as CO sets in. Each check is side-effect free (RNG, modes,
    BN statistics, ``.grad``). ``on_detect``: ``"warn"``, ``"raise"`` or a callable ``(record) -> None``.
    ``history`` holds one dict per check; ``detected`` stays True once set.
    """

    @rules.checked()
    def __init__(
        self,
        probe: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        every: int = 100,
        drop: float = 0.2,
        steps: int = 10,
        grad_align: bool = False,
        max_examples: int = 128,
        on_detect: str | Callable[[dict], None] = "warn",
        seed: int = 0,
    ):
        self.every = check_steps(every, "every")
        self.drop = check_positive("drop", drop)
        self.steps = check_steps(steps)
        self.grad_align = bool(grad_align)
        self.max_examples = check_steps(max_examples, "max_examples")
        if not (on_detect in ("warn", "raise") or callable(on_detect)):
            raise ConfigurationError("on_detect must be 'warn', 'raise' or a callable(record).")
        self.on_detect = on_detect
        self.seed = seed
        self.probe = None if probe is None else tuple(t.detach().clone() for t in image_batch(probe))
        self.history: list[dict[str, Any]] = []
        self.best: float | None = None
        self.detected = False
        self._step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "best": self.best, "detected": self.detected, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.best, self.detected, self._step = state["best"], state["detected"], state["step"]

    def observe(self, model: nn.Module, batch: Any, threat: ThreatModel) -> dict[str, Any] | None:
        """Count one training step; run a check when due and return its record (else ``None``)."""
        if self.probe is None:
            x, y = image_batch(batch)
            self.probe = (x[: self.max_examples].detach().clone(), y[: self.max_examples].detach().clone())
        step, self._step = self._step, self._step + 1
        if step % self.every:
            return None
        return self.check(model, threat, step)

    def check(self, model: nn.Module, threat: ThreatModel, step: int | None = None) -> dict[str, Any]:
        x, y = self.probe  # type: ignore[misc]
        record: dict[str, Any] = {"step": step}
        with side_effect_free(model, train=False, parameters=False):
            gen = make_generator(x.device, self.seed)  # the same random start at every check
            alpha = 2.5 * threat.eps / self.steps  # Madry et al.'s rule: the ball's radius is reachable
            x_adv = pgd(model, x, y, alpha=alpha, steps=self.steps, threat=threat, generator=gen)
            with torch.no_grad():
                record["pgd_acc"] = float((logits_of(model(x_adv)).argmax(-1) == y).float().mean())
            if self.grad_align:
                record["grad_cosine"] = self._grad_cosine(model, x, y, threat, gen)
        if self.best is None or record["pgd_acc"] > self.best:
            self.best = record["pgd_acc"]
        record["best_pgd_acc"] = self.best
        record["detected"] = self.best - record["pgd_acc"] > self.drop
        self.history.append(record)
        if record["detected"] and not self.detected:
            self.detected = True
            message = (
                f"catastrophic overfitting: PGD accuracy on the probe fell from {self.best:.3f} to "
                f"{record['pgd_acc']:.3f} (more than {self.drop}); stop or restore the last good checkpoint."
            )
            if self.on_detect == "raise":
                raise CatastrophicOverfitting(message)
            if self.on_detect == "warn":
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            else:
                self.on_detect(record)  # type: ignore[operator]
        return record

    @staticmethod
    def _grad_cosine(model, x, y, threat: ThreatModel, gen) -> float:
        with attack_context(model, "eval"):
            u0 = threat.to_pixel(x.detach())
            grads = []
            noise = geometry.random_in_ball(u0.shape, "linf", threat.eps, gen, device=u0.device, dtype=u0.dtype)
            for u in (u0, threat.clamp(u0 + noise)):
                u = u.detach().requires_grad_(True)
                loss = F.cross_entropy(logits_of(model(threat.from_pixel(u))), y, reduction="sum")
                grads.append(torch.autograd.grad(loss, u)[0].flatten(1))
            return float(F.cosine_similarity(grads[0], grads[1], dim=1, eps=1e-12).mean())


class FastAT(_ImageMethod):
    """Fast adversarial training, FGSM with random start (Wong et al., ICLR 2020, Algorithm 3).

    ``delta ~ U(-eps, eps)``, one signed step of ``alpha = 1.25 eps``, projected; loss ``CE(f(x + delta), y)``.
    Cost: 2 forwards, 2 backwards. ``detector``: a :class:`CatastrophicOverfittingDetector` (or
    ``True`` for a default one) observed at every call; its checks run outside the step's cost.
    """

    name = "fast-at"
    replaces_inputs = True

    @rules.checked()
    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        *,
        detector: CatastrophicOverfittingDetector | bool | None = None,
        **kwargs: Any,
    ):
        if "steps" in kwargs and rules.positive_int("steps", kwargs.pop("steps")) != 1:
            raise ConfigurationError(
                "fast-at takes one step by definition (FGSM with a random start); leave steps out, "
                "or use 'pgd-at' for several steps."
            )
        kwargs.setdefault("random_start", True)
        super().__init__(eps, 0.0, 1, **kwargs)
        self.alpha = check_positive("alpha", 1.25 * self.threat.eps if alpha is None else alpha)
        self.detector = CatastrophicOverfittingDetector() if detector is True else (detector or None)

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        if self.detector is not None:
            self.detector.observe(model, batch, self.threat)
        return super().generate(model, batch)

    def objective(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> torch.Tensor:
        _, y = image_batch(batch)
        return F.cross_entropy(logits_of(model(x_adv)), y)


class _Reparametrized:
    """``model`` called with some parameters replaced by tensors (``torch.func.functional_call``)."""

    @rules.checked()
    def __init__(self, model: nn.Module, replacements: dict[str, torch.Tensor]):
        self.model = model
        self.replacements = replacements

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.replacements, args, kwargs, strict=False)


class AWP(AdversarialMethod):
    """Adversarial weight perturbation (Wu et al., NeurIPS 2020, eq. 9-11) on top of PGD-AT, TRADES or MART.

    After the base method builds ``x_adv``, one ascent pass (BN statistics frozen) gives
    ``g_l = d objective / d w_l`` for every weight with ``dim > 1``; the perturbation is layer-wise
    relative, ``v_l = gamma ||w_l|| / ||g_l|| g_l`` (one ``_foreach_norm`` per list, scales from the SAM
    kernel's ``perturbation_scale``), and the returned loss is the objective at ``w + v``. The weights
    are never written: the perturbed forward uses ``torch.func.functional_call`` with ``w + v``
    (``v`` constant), so ``backward()`` puts ``grad L(w + v)`` into ``w.grad`` and there is nothing to
    restore, even after an exception (the authors' proxy model and add/subtract restore are not needed).
    ``warmup``: number of calls that use the base objective only (they cost what the base method costs; ``cost``
    is the cost after warmup). Cost: base cost plus one more
    evaluation of the objective (PGD-AT base: ``(K+2, K+2)``; TRADES base: ``(K+5, K+4)``).
    """

    name = "awp"

    @rules.checked()
    def __init__(self, base: AdversarialMethod | str = "pgd-at", gamma: float = 1e-2, *, warmup: int = 0,
                 **base_kwargs: Any):
        super().__init__()
        if isinstance(base, str):
            key = method_key(base)
            bases = {"pgd-at": PGDAT, "trades": TRADES, "mart": MART}
            if key not in bases:
                raise ConfigurationError(f"AWP supports pgd-at, trades and mart as base, got {base!r}.")
            base = build_method(key, bases[key], base_kwargs)
        elif base_kwargs:
            raise ConfigurationError("pass base settings either in the base method or as keywords with a base "
                                     "name, not both.")
        if not isinstance(base, (PGDAT, TRADES, MART)):
            raise ConfigurationError(f"AWP supports pgd-at, trades and mart as base, got {type(base).__name__}.")
        self.base = base
        self.gamma = check_positive("gamma", gamma)
        self.warmup = int(warmup)
        self._calls = 0

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor:
        self._calls += 1
        return self.base.generate(model, batch)

    @property
    def attack_cost(self) -> tuple[int, int]:
        return self.base.attack_cost

    @property
    def objective_cost(self) -> tuple[int, int]:
        f, b = self.base.objective_cost
        return (2 * f, 2 * b)  # the ascent pass, then the pass at w + v

    def weight_perturbation(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: v}`` for the perturbed weights (one extra forward/backward, BN statistics frozen)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
        if not named:
            raise ConfigurationError("AWP perturbs weights with dim > 1 and the model has none that require grad.")
        names, weights = zip(*named)
        with preserve_buffers(model):
            ascent = self.base.objective(model, batch, x_adv)
            grads = torch.autograd.grad(ascent, list(weights), allow_unused=True)
        with torch.no_grad():
            grads = [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
            acc = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
            w_norms = torch.stack([n.to(acc) for n in torch._foreach_norm([w.detach() for w in weights])])
            g_norms = torch.stack([n.to(acc) for n in torch._foreach_norm(grads)])
            scales = perturbation_scale(g_norms, self.gamma * w_norms, eps=1e-20)
            v = torch._foreach_mul(grads, [s.to(g.dtype) for s, g in zip(scales.unbind(), grads)])
        return dict(zip(names, v))

    def objective(self, model: nn.Module, batch: Any, x_adv: torch.Tensor) -> torch.Tensor:
        if self._calls <= self.warmup or self.gamma == 0:
            return self.base.objective(model, batch, x_adv)
        v = self.weight_perturbation(model, batch, x_adv)
        params = dict(model.named_parameters())
        perturbed = dict(zip(v, torch._foreach_add([params[n] for n in v], list(v.values()))))
        return self.base.objective(_Reparametrized(model, perturbed), batch, x_adv)  # type: ignore[arg-type]


class DefensiveDistillation(AdversarialMethod):
    """Defensive distillation (Papernot et al., IEEE S&P 2016, section IV).

    Without ``teacher``: trains the teacher, ``CE(z / T, y)``. With ``teacher``: trains the
    distilled network on the teacher's soft labels at the same temperature,
    ``-sum_k softmax(z_teacher / T)_k log softmax(z / T)_k``. The deployed network uses ``T = 1``,
    which makes its softmax saturate: cross-entropy gradients vanish (gradient masking) while a
    margin loss on the logits still finds adversarial examples (Carlini & Wagner, 2017).
    Cost: ``(2, 1)`` with a teacher (its forward), ``(1, 1)`` without.
    """

    name = "defensive-distillation"

    @rules.checked()
    def __init__(self, temperature: float = 20.0, teacher: nn.Module | None = None):
        super().__init__()
        self.temperature = check_positive("temperature", temperature, strict=True)
        self.teacher = teacher

    def generate(self, model: nn.Module, batch: Any) -> torch.Tensor | None:
        x, y = image_batch(batch)
        if self.teacher is None:
            return None
        with torch.no_grad(), preserve_modes(self.teacher, train=False):
            teacher = logits_of(self.teacher(x))
        check_label_range(y, teacher.shape[-1])  # before the student's training forward
        return F.softmax(wide(teacher) / self.temperature, dim=-1)

    @property
    def attack_cost(self) -> tuple[int, int]:
        return (0, 0) if self.teacher is None else (1, 0)

    def objective(self, model: nn.Module, batch: Any, soft_labels: torch.Tensor | None) -> torch.Tensor:
        x, y = image_batch(batch)
        logits = logits_of(model(x)) if soft_labels is not None else self.checked_logits(model, x, y)
        scaled = wide(logits) / self.temperature
        if soft_labels is None:
            return F.cross_entropy(scaled, y)
        return -(soft_labels * F.log_softmax(scaled, dim=-1)).sum(-1).mean()


_SPECTRAL_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)


@rules.checked(eps=rules.positive)
def spectral_normalize(
    model: nn.Module,
    *,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Put spectral normalization (Miyato et al., ICLR 2018) on every linear and convolutional layer.

    Uses ``torch.nn.utils.parametrizations.spectral_norm`` (weights divided by their largest singular
    value, estimated by power iteration at each training forward). For convolutions this bounds the
    reshaped ``(out, in * k * k)`` weight matrix, not the convolution operator itself. Modules whose
    qualified name starts with an entry of ``exclude`` are skipped, as are those already
    parametrized. Returns ``model`` (modified in place).
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm

    check_steps(n_power_iterations, "n_power_iterations")
    targets = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, _SPECTRAL_TYPES)
        and not any(name == e or name.startswith(e + ".") for e in exclude)
        and not parametrize.is_parametrized(m, "weight")
    ]
    if not targets:
        raise ConfigurationError("spectral_normalize found no Linear or Conv layer to normalize (check exclude=).")
    for _, module in targets:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
        spectral_norm(module, n_power_iterations=n_power_iterations, eps=eps, dim=dim)
    return model
