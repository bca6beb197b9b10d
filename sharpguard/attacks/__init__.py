"""Adversarial attacks and robustness measurements.

- :class:`ThreatModel`: norm (``linf``/``l2``), ``eps``, valid range and input normalization, declared once.
- :func:`fgsm`, :func:`pgd`, :func:`apgd`, :func:`apgd_targeted`: input-space attacks (pixel space,
  input-only gradients; APGD also in l1); :func:`fab_targeted`: FAB-T, minimal-norm targeted attack;
  :func:`square`: the score-based Square attack (forwards only).
- :func:`auto_attack`, :class:`AutoAttack`: AutoAttack's standard cascade (APGD-CE -> APGD-T -> FAB-T ->
  Square) with its gradient-masking checks (:mod:`~sharpguard.attacks.checks`).
- :mod:`~sharpguard.attacks.geometry`: per-example norms, projections (l2, linf, l1, l1 with a box) and
  uniform-in-ball random starts, shared by every attack and embedding method.
- :class:`EmbeddingPerturbation`, :func:`embedding_pgd`: embedding-space perturbation of transformers
  through a forward hook on ``get_input_embeddings()``.
- :func:`robust_accuracy`, :func:`clean_accuracy`, :func:`input_grad_norm`: side-effect-free measurements.
"""

from . import geometry
from .autoattack import AutoAttack, AutoAttackReport, auto_attack
from .checks import GradientMaskingError, GradientMaskingWarning
from .embedding import (
    EmbeddingPerturbation,
    embedding_ascent,
    embedding_pgd,
    embedding_shape,
    input_embeddings,
    normalize_per_example,
    normalize_per_token,
    padding_mask,
    per_example_norm,
    project_per_example,
)
from .fab import fab_targeted
from .gradient import apgd, apgd_targeted, fgsm, pgd
from .losses import resolve_loss
from .metrics import clean_accuracy, input_grad_norm, robust_accuracy
from .square import square
from .threat import ThreatModel, default_generator, make_generator

__all__ = [
    "ThreatModel",
    "fgsm",
    "pgd",
    "apgd",
    "apgd_targeted",
    "fab_targeted",
    "square",
    "auto_attack",
    "AutoAttack",
    "AutoAttackReport",
    "GradientMaskingWarning",
    "GradientMaskingError",
    "robust_accuracy",
    "clean_accuracy",
    "input_grad_norm",
    "EmbeddingPerturbation",
    "embedding_pgd",
    "embedding_ascent",
    "embedding_shape",
    "input_embeddings",
    "padding_mask",
    "per_example_norm",
    "normalize_per_example",
    "normalize_per_token",
    "project_per_example",
    "resolve_loss",
    "default_generator",
    "make_generator",
    "geometry",
]
