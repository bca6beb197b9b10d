"""Adversarial-training methods: ``loss = method(model, batch)``; ``method.cost`` = (forwards, backwards) per step.

Images: :class:`PGDAT`, :class:`TRADES`, :class:`MART`, :class:`FastAT` (+ :class:`CatastrophicOverfittingDetector`),
:class:`FreeAT`, :class:`GradAlign`, :class:`AWP`, :class:`DefensiveDistillation`, :func:`spectral_normalize`.
Transformers (embedding space): :class:`FGM`, :class:`EmbeddingPGD`, :class:`FreeLB`, :class:`SMART`, :class:`R3F`.
SAM/ASAM with any of them, reusing the adversary: :func:`sam_adversarial_closure`, :func:`sam_adversarial_step`.
"""

from .base import AdversarialMethod, PassCount, count_passes, gradient_carrier
from .factory import METHODS, make_method
from .sam import sam_adversarial_closure, sam_adversarial_step
from .single_step import FreeAT, GradAlign, grad_align_cosine
from .text import FGM, R3F, SMART, EmbeddingPGD, FreeLB, symmetric_kl
from .vision import (
    AWP,
    MART,
    PGDAT,
    TRADES,
    CatastrophicOverfitting,
    CatastrophicOverfittingDetector,
    DefensiveDistillation,
    FastAT,
    spectral_normalize,
    trades_kl,
)

__all__ = [
    "AdversarialMethod",
    "PGDAT",
    "TRADES",
    "MART",
    "FastAT",
    "FreeAT",
    "GradAlign",
    "grad_align_cosine",
    "AWP",
    "DefensiveDistillation",
    "CatastrophicOverfittingDetector",
    "CatastrophicOverfitting",
    "spectral_normalize",
    "FGM",
    "EmbeddingPGD",
    "FreeLB",
    "SMART",
    "R3F",
    "make_method",
    "METHODS",
    "sam_adversarial_closure",
    "sam_adversarial_step",
    "count_passes",
    "PassCount",
    "gradient_carrier",
    "symmetric_kl",
    "trades_kl",
]
