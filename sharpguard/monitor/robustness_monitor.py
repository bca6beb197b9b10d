"""Periodic adversarial robustness on a frozen probe set: clean, FGSM and PGD accuracy and the
input-gradient norm (GradAlign's practice: fixed examples, eval mode, PGD with alpha = eps/4; Andriushchenko
& Flammarion, NeurIPS 2020). The catastrophic-overfitting alert watches the PGD accuracy (Wong et al.,
ICLR 2020); the metric ``robustness/pgd_acc`` drives Lightning's ``ModelCheckpoint`` / ``EarlyStopping``
for Rice et al.'s (ICML 2020) early stopping against robust overfitting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._batches import logits_of, split_batch
from .._modules import has_fake_tensors
from .._validation import check_keywords, keywords_of, one_of, positive, positive_int, real
from ..errors import ConfigurationError
from .alerts import AlertRule, default_robustness_alerts
from .base import Monitor
from .. import _validation as rules

__all__ = ["RobustnessMonitor"]


class RobustnessMonitor(Monitor):
    """Robust accuracy on a frozen probe set of ``(inputs, labels)`` batches.

    Measures (metric ``robustness/<name>``): ``clean_acc``, ``fgsm_acc``, ``pgd_acc`` (PGD-``steps``,
    ``restarts`` random starts), ``input_grad_norm`` (mean ``||grad_x L||_2``), ``input_curvature`` (mean
    top eigenvalue of the input Hessian, CURE, Moosavi-Dezfooli et al. 2019), ``adv_confidence`` and
    ``adv_input_curvature`` (the confidence of the misclassified PGD examples and the input curvature at
    the PGD examples: Walter et al. 2026's "confidently wrong in flat regions"; one PGD run serves
    both; :func:`sharpguard.sharpness.adversarial_geometry`). Its share of training
    time is logged as ``monitor/robustness_overhead_pct`` (``monitor/overhead_pct`` is the sharpness
    monitor's). On fake tensors (``FakeTensorMode``) a check is a cost-only run: the same attacks and
    passes, NaN metrics, ``cost_only`` in each measure's settings.

    Args:
        eps / alpha / steps / norm / restarts: the threat model and PGD settings (``alpha`` defaults to
            ``eps / 4``).
        bounds / mean / std: the valid input range and, for models that normalise inside, the
            normalisation (see :class:`sharpguard.attacks.ThreatModel`).
        input_key / label_key: where a batch holds the inputs and labels (mapping keys, or tuple
            positions); default: positions 0 and 1, or the usual names (``pixel_values``/``image``/...,
            ``labels``/``label``/...). Checked on the first captured batch.
        batch_map: instead, a callable ``batch -> (inputs, labels)``.
        Other keywords: see :class:`~sharpguard.monitor.Monitor`.
    """

    MEASURES = ("clean_acc", "fgsm_acc", "pgd_acc", "input_grad_norm", "input_curvature", "adv_confidence",
                "adv_input_curvature")
    DEFAULT_MEASURES = ("clean_acc", "pgd_acc")
    prefix = "robustness"
    overhead_metric = "monitor/robustness_overhead_pct"

    @rules.checked()
    def __init__(
        self,
        measures: Sequence[str] | None = None,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        restarts: int = 1,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_key: str | int | None = None,
        label_key: str | int | None = None,
        batch_map: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        check_keywords("RobustnessMonitor", kwargs,
                       keywords_of(Monitor.__init__) + keywords_of(RobustnessMonitor.__init__))
        # every setting is checked before anything is built
        eps = positive("eps", eps, "; e.g. eps=8/255 for images in [0, 1]")
        alpha = positive("alpha", alpha) if alpha is not None else eps / 4
        steps, restarts = positive_int("steps", steps), positive_int("restarts", restarts)
        one_of("norm", norm, ("linf", "l2"))
        if bounds is not None:
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise ConfigurationError(f"bounds must be (low, high) or None, got {bounds!r}.")
            lo, hi = real("bounds[0]", bounds[0]), real("bounds[1]", bounds[1])
            if not lo < hi:
                raise ConfigurationError(f"bounds must satisfy low < high, got {bounds!r}.")
        for key_name, key in (("input_key", input_key), ("label_key", label_key)):
            if key is not None and (isinstance(key, bool) or not isinstance(key, (str, int))):
                raise ConfigurationError(f"{key_name} must be a mapping key (str) or a tuple position (int), "
                                         f"got {key!r}.")
        if batch_map is not None and not callable(batch_map):
            raise ConfigurationError("batch_map must be a callable batch -> (inputs, labels), got "
                                     f"{type(batch_map).__name__}.")
        if batch_map is not None and (input_key is not None or label_key is not None):
            raise ConfigurationError("pass either batch_map= or input_key=/label_key=, not both.")
        self.input_key, self.label_key, self.batch_map = input_key, label_key, batch_map
        super().__init__(measures, **kwargs)
        if (mean is not None or std is not None) and set(self.measures) & {"adv_confidence", "adv_input_curvature"}:
            raise ConfigurationError(
                "adv_confidence / adv_input_curvature attack raw inputs and do not take mean/std yet; drop mean=/std= "
                "(normalise inside the model on raw [0, 1] inputs) or leave these measures out."
            )
        self.eps = eps
        self.alpha = alpha
        self.steps, self.norm, self.restarts = steps, norm, restarts
        self.bounds, self.mean, self.std = bounds, mean, std

    #: the names a mapping batch's inputs and labels are looked up under when no key is given
    INPUT_KEYS = ("pixel_values", "input", "inputs", "image", "images", "x")
    LABEL_KEYS = ("labels", "label", "target", "targets", "y")

    def pair(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` of a batch: ``batch_map``, ``input_key``/``label_key``, or the usual names."""
        if self.batch_map is not None:
            out = self.batch_map(batch)
            if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
                raise ConfigurationError("batch_map must return (inputs, labels) tensors.")
            return out[0], out[1]
        if isinstance(batch, Mapping):
            xk = (self.input_key if self.input_key is not None
                  else next((k for k in self.INPUT_KEYS if k in batch), None))
            yk = (self.label_key if self.label_key is not None
                  else next((k for k in self.LABEL_KEYS if k in batch), None))
            missing = [name for name, k in (("input_key", xk), ("label_key", yk)) if k is None or k not in batch]
            if missing:
                raise ConfigurationError(
                    f"RobustnessMonitor cannot find the inputs/labels of a batch with keys {sorted(map(str, batch))}; "
                    f"pass {' and '.join(f'{m}=' for m in missing)} (or batch_map=) naming them."
                )
            return batch[xk], batch[yk]
        if isinstance(batch, (tuple, list)):
            # string keys name mapping entries; a tuple batch is (inputs, labels) unless positions are given
            xi = self.input_key if isinstance(self.input_key, int) else 0
            yi = self.label_key if isinstance(self.label_key, int) else 1
            if max(xi, yi) >= len(batch):
                raise ConfigurationError(
                    f"RobustnessMonitor needs (inputs, labels) batches, got a {type(batch).__name__} of {len(batch)} "
                    "items; pass input_key=/label_key= positions or batch_map=."
                )
            return batch[xi], batch[yi]
        raise ConfigurationError(
            f"RobustnessMonitor needs (inputs, labels) batches, got {type(batch).__name__}; pass batch_map=batch -> "
            "(inputs, labels)."
        )

    def capture(self, batch: Any) -> bool:
        if not self.probe.ready and len(self.probe) == 0:
            self.pair(batch)  # a wrong key fails on the first batch, not after an epoch
        return super().capture(batch)

    def default_alerts(self) -> list[AlertRule]:
        return default_robustness_alerts()

    def _runs_on(self, model: nn.Module, batch: Any) -> bool:
        return True  # the attacks treat examples independently: any part of a batch is measurable

    def passes(self) -> float:
        cost = {"clean_acc": 0.5, "fgsm_acc": 1.5, "pgd_acc": self.steps * self.restarts + 0.5, "input_grad_norm": 1.0,
                # Lanczos in input space on up to 64 / 32 examples (~30 products each), then the PGD run
                "input_curvature": 30.0, "adv_confidence": self.steps + 1.0, "adv_input_curvature": 30.0}
        total = sum(cost[m] for m in self.measures)
        if {"adv_confidence", "adv_input_curvature"} <= set(self.measures):
            total -= self.steps + 1.0  # one PGD run serves both
        return total

    #: input-sized tensors an attack holds besides the model's activations (the clean and current inputs,
    #: the step, its gradient, the best point so far, their normalised views): counted on ViT-Base under
    #: FakeTensorMode, PGD at the defaults (benchmarks/simulate.py, ``check:robustness``)
    ATTACK_INPUT_COPIES = 12

    def _attack_parts(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """How many parts each probe batch is attacked in: the fewest that keep an attack's memory, the
        forward's saved tensors ``A`` plus :attr:`ATTACK_INPUT_COPIES` copies of the inputs ``I``, within a
        training step's ``A + G`` (``G``: the parameters' bytes, the gradient a step holds), up to 8 and one
        example each; chosen once per probe (the attacks treat examples independently, so a part is a
        smaller batch of the same problem)."""
        key = tuple(id(b) for b in batches)
        cached = self.__dict__.get("_parts")
        if cached is not None and cached[0] == key:
            return cached[1]
        from ..sharpness.micro import AUTO_MAX_MICRO_BATCHES, AUTO_SLACK_BYTES, _fewest_slices, _saved_bytes

        x, y = max(batches, key=lambda b: len(b[1]))
        n = len(y)
        parts = 1
        if n > 1 and torch.is_tensor(x):
            part = split_batch((x, y), AUTO_MAX_MICRO_BATCHES)[0]

            def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                return nn.functional.cross_entropy(logits_of(m(b[0])), b[1])

            saved = _saved_bytes(model, part, loss) * n / len(part[1])
            inputs = x.numel() * x.element_size()
            grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            parts = _fewest_slices(saved + self.ATTACK_INPUT_COPIES * inputs, saved + grads + AUTO_SLACK_BYTES,
                                   min(AUTO_MAX_MICRO_BATCHES, n))
        self._parts = (key, parts)
        return parts

    def _settings(self, **extra: Any) -> dict[str, Any]:
        return {"eps": self.eps, "norm": self.norm, "bounds": list(self.bounds) if self.bounds else None, **extra}

    def _measure(self, model: nn.Module, batches: list[Any], optimizer: Any | None, batch: Any | None):
        from .. import attacks as A

        common = {"norm": self.norm, "bounds": self.bounds, "mean": self.mean, "std": self.std}
        metrics: dict[str, float] = {}
        settings: dict[str, dict[str, Any]] = {}
        want = set(self.measures)
        device = next(model.parameters()).device
        batches = [self.pair(b) for b in batches]
        clean = batches
        if want - {"clean_acc"}:  # the attacks run on as many parts of each batch as keep within a step's memory
            parts = self._attack_parts(model, batches)
            if parts > 1:
                batches = [piece for b in batches for piece in split_batch(b, parts)]

        def generator() -> torch.Generator:
            # the same random starts at every check: consecutive checks differ only by the weights
            return torch.Generator(device=device).manual_seed(self.seed)

        if "clean_acc" in want:
            self.progress_stage("clean_acc")
            metrics["robustness/clean_acc"] = float(A.robust_accuracy(model, clean, None))
            settings["robustness/clean_acc"] = {"attack": "none"}
            self.progress_done("clean_acc")
        if "fgsm_acc" in want:
            gen = generator()

            def fgsm(m, x, y):
                return A.fgsm(m, x, y, eps=self.eps, generator=gen, **common)

            self.progress_stage("fgsm_acc")
            metrics["robustness/fgsm_acc"] = float(A.robust_accuracy(model, batches, fgsm))
            settings["robustness/fgsm_acc"] = self._settings(attack="fgsm")
            self.progress_done("fgsm_acc")
        if "pgd_acc" in want:
            gen = generator()

            def pgd(m, x, y):
                return A.pgd(m, x, y, eps=self.eps, alpha=self.alpha, steps=self.steps, restarts=self.restarts,
                             random_start=True, generator=gen, **common)

            self.progress_stage("pgd_acc")
            metrics["robustness/pgd_acc"] = float(A.robust_accuracy(model, batches, pgd))
            self.progress_done("pgd_acc")
            settings["robustness/pgd_acc"] = self._settings(attack="pgd", alpha=self.alpha, steps=self.steps,
                                                            restarts=self.restarts)
        if "input_grad_norm" in want:
            self.progress_stage("input_grad_norm")
            value = A.input_grad_norm(model, batches, bounds=self.bounds, mean=self.mean, std=self.std)
            metrics["robustness/input_grad_norm"] = float(value)
            settings["robustness/input_grad_norm"] = {"definition": "mean ||grad_x CE||_2 over probe examples"}
            self.progress_done("input_grad_norm")
        if want & {"input_curvature", "adv_confidence", "adv_input_curvature"}:
            from .. import sharpness as S

            if "input_curvature" in want:
                self.progress_stage("input_curvature")
                res = S.input_hessian_eigenvalue(model, batches, seed=self.seed)
                metrics["robustness/input_curvature"] = float(res.mean)
                settings["robustness/input_curvature"] = {"definition": "mean top eigenvalue of the input Hessian",
                                                          "n_examples": int(res.n_examples), "n_hvp": int(res.n_hvp)}
                self.progress_done("input_curvature")
            if want & {"adv_confidence", "adv_input_curvature"}:
                self.progress_stage("adversarial geometry")
                geo = S.adversarial_geometry(model, batches, eps=self.eps, attack_steps=self.steps, alpha=self.alpha,
                                             norm=self.norm, bounds=self.bounds, seed=self.seed)
                attack = self._settings(attack="pgd", alpha=self.alpha, steps=self.steps, fooled=float(geo.fooled))
                if "adv_confidence" in want:
                    if geo.adv_confidence_fooled is None:
                        self.warn_once("adv-confidence", "robustness/adv_confidence: the attack fooled no probe "
                                       "example at this check, so there is no confidence of a wrong answer to log")
                    else:
                        metrics["robustness/adv_confidence"] = float(geo.adv_confidence_fooled)
                        settings["robustness/adv_confidence"] = attack
                if "adv_input_curvature" in want:
                    metrics["robustness/adv_input_curvature"] = float(geo.adv_curvature)
                    settings["robustness/adv_input_curvature"] = attack
                self.progress_done("adversarial geometry", len(want & {"adv_confidence", "adv_input_curvature"}))
        if has_fake_tensors(model):
            # fake tensors (FakeTensorMode): every attack and forward ran, no value was read (NaN metrics)
            settings = {name: {**entry, "cost_only": True} for name, entry in settings.items()}
        return metrics, settings
