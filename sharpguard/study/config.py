"""Settings of ``sharpguard study``: the methods it compares, their hyperparameters, and the measurement.

The defaults are chosen so the whole default study (10 methods x 3 seeds, an ensemble, every measurement)
finishes within about five minutes on a 2-core CPU; ``quick=True`` shrinks everything for a smoke test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import ConfigurationError

METHODS: dict[str, dict[str, str]] = {
    "sgd": {"summary": "SGD with momentum, cross entropy", "reference": "baseline",
            "cost": "1 forward + 1 backward"},
    "sam": {"summary": "Sharpness-Aware Minimization, SharpnessAwareMinimization callback",
            "reference": "Foret et al., ICLR 2021, arXiv:2010.01412", "cost": "2 forward + 2 backward"},
    "asam": {"summary": "Adaptive SAM (perturbation scaled by |w|), SharpnessAwareMinimization(adaptive=True)",
             "reference": "Kwon et al., ICML 2021, arXiv:2102.11600", "cost": "2 forward + 2 backward"},
    "pgd-at": {"summary": "PGD adversarial training (cross entropy at PGD examples), AdversarialTraining callback",
               "reference": "Madry et al., ICLR 2018, arXiv:1706.06083",
               "cost": "(K+1) forward + (K+1) backward, K PGD steps"},
    "trades": {"summary": "TRADES: clean CE + beta * KL(clean || adversarial), AdversarialTraining callback",
               "reference": "Zhang et al., ICML 2019, arXiv:1901.08573", "cost": "(K+2) forward + (K+1) backward"},
    "fast-at": {"summary": "FGSM adversarial training from a random start, AdversarialTraining callback",
                "reference": "Wong et al., ICLR 2020, arXiv:2001.03994", "cost": "2 forward + 2 backward"},
    "weight-decay": {"summary": "SGD with L2 weight decay", "reference": "Krogh & Hertz, NeurIPS 1991",
                     "cost": "1 forward + 1 backward"},
    "dropout": {"summary": "dropout after each hidden layer", "reference": "Srivastava et al., JMLR 2014",
                "cost": "1 forward + 1 backward"},
    "spectral-norm": {"summary": "spectral normalization of every linear layer (Lipschitz control)",
                      "reference": "Miyato et al., ICLR 2018, arXiv:1802.05957",
                      "cost": "1 forward + 1 backward (+ power iteration)"},
    "distillation": {"summary": "defensive distillation: a student trained on a temperature-T teacher's soft labels",
                     "reference": "Papernot et al., IEEE S&P 2016, arXiv:1511.04508",
                     "cost": "teacher run + 2 forward + 1 backward"},
}
ENSEMBLE = "ensemble"
ENSEMBLE_INFO = {"summary": "averaged logits of the sgd models", "reference": "Lakshminarayanan et al., NeurIPS 2017",
                 "cost": "K models' training"}

EPS_RATIONALE = (
    "digits pixels take 17 gray levels (0..16), i.e. steps of 1/16 = 0.0625 after scaling to [0, 1]. "
    "The CIFAR-style 8/255 = 0.031 is half a gray level: rounding to the data's own grid would undo it, so it "
    "is not a meaningful threat here. eps = 0.1 allows a change of 1.6 gray levels per pixel, the budget "
    "commonly used for MNIST-scale data below the 0.3 of Madry et al.: small enough that the digit stays "
    "recognizable, large enough to break an undefended model."
)


@dataclass
class StudyConfig:
    """Every knob of a study run; all of it is written to ``report.json``'s ``settings``."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: int = 3
    epochs: int = 30
    dataset: str = "digits"
    ensemble: bool = True
    # model and optimizer
    hidden: int = 64
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    # methods
    rho: float = 0.05  # SAM (Foret et al.'s default)
    asam_rho: float = 0.5  # ASAM's rho is relative to |w|; Kwon et al. use 0.5 (with eta = 0.01)
    weight_decay: float = 5e-3
    dropout: float = 0.3
    distillation_temperature: float = 20.0
    trades_beta: float = 6.0
    train_attack_steps: int = 5
    # threat model and evaluation
    eps: float = 0.1
    eval_pgd_steps: int = 20
    # sharpness measurement
    probe_size: int = 512
    sharpness_rho: float = 0.05
    adaptive_sharpness_rho: float = 0.5
    sharpness_steps: int = 10
    trace_hvps: int = 60
    curvature_examples: int = 64  # examples whose input-Hessian top eigenvalue is measured (Lanczos each)
    # monitors during training
    monitor_checks: int = 8  # monitor measurements per run
    monitor_probe_size: int = 256
    # intra-op threads while the study runs: its 9k-parameter MLP gains nothing from more, and on a
    # shared 2-core machine extra threads spin and slow everything down (4x measured)
    threads: int = 1
    quick: bool = False
    subset: tuple[int, int] | None = None  # (n_train, n_test) to shrink the data set

    def __post_init__(self) -> None:
        known = set(METHODS) | {ENSEMBLE}
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ConfigurationError(
                f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(list(METHODS) + [ENSEMBLE])}."
            )
        if not self.methods:
            raise ConfigurationError("no methods selected; pass e.g. --methods sgd,sam.")
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            # A repeated method would train and count every seed twice, inflating n in its statistics.
            raise ConfigurationError(f"method(s) {', '.join(repeated)} listed more than once; name each method once.")
        if ENSEMBLE in self.methods:
            # 'ensemble' is not trained by itself: it needs the sgd models.
            self.methods = [m for m in self.methods if m != ENSEMBLE]
            self.ensemble = True
            if "sgd" not in self.methods:
                self.methods.insert(0, "sgd")
        if self.seeds < 1:
            raise ConfigurationError(f"seeds must be at least 1, got {self.seeds}.")
        if self.threads < 1:
            raise ConfigurationError(f"threads must be at least 1, got {self.threads}.")
        if self.epochs < 1:
            raise ConfigurationError(f"epochs must be at least 1, got {self.epochs}.")
        for name in ("rho", "asam_rho", "eps", "lr", "sharpness_rho", "adaptive_sharpness_rho"):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive, got {getattr(self, name)}.")

    @property
    def eval_pgd_alpha(self) -> float:
        """Step size 2.5 * eps / steps (Madry et al.), so PGD can cross the eps-ball from a random start."""
        return 2.5 * self.eps / self.eval_pgd_steps

    @property
    def train_attack_alpha(self) -> float:
        return 2.5 * self.eps / self.train_attack_steps

    def with_quick(self) -> StudyConfig:
        """A tiny run for smoke tests: fewer epochs, a subset of the data, cheap measurements."""
        return replace(self, quick=True, subset=(256, 128),
                       probe_size=128, sharpness_steps=3, trace_hvps=9, curvature_examples=16, eval_pgd_steps=5,
                       train_attack_steps=2,
                       monitor_checks=2, monitor_probe_size=64)

    def as_settings(self) -> dict[str, Any]:
        s = asdict(self)
        s["eval_pgd_alpha"] = self.eval_pgd_alpha
        s["train_attack_alpha"] = self.train_attack_alpha
        s["eps_rationale"] = EPS_RATIONALE
        s["norm"] = "linf"
        s["confidence_level"] = 0.95
        return s
