"""sharpguard: train toward flat minima, train against adversarial inputs, and watch sharpness and
robustness during long runs, in PyTorch, Lightning, the Hugging Face Trainer and Accelerate.

Top-level names are imported lazily, so ``import sharpguard`` stays cheap and never imports a
training framework.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS: dict[str, str] = {
    # optimizer wrappers
    "SAM": "sharpguard.optim",
    "ASAM": "sharpguard.optim",
    "GSAM": "sharpguard.optim",
    "LookSAM": "sharpguard.optim",
    "MomentumSAM": "sharpguard.optim",
    "FriendlySAM": "sharpguard.optim",
    "make_sam": "sharpguard.optim",
    "SAMConfig": "sharpguard.optim",
    "SAMEngine": "sharpguard.optim",
    "WSAM": "sharpguard.optim",
    "RWP": "sharpguard.optim",
    "ARWP": "sharpguard.optim",
    "ESAM": "sharpguard.optim",
    "FlatLoRA": "sharpguard.optim",
    "lora_parameters": "sharpguard.optim",
    "MESA": "sharpguard.regularizers",
    "GAM": "sharpguard.optim",
    "BSAM": "sharpguard.optim",
    "SharpnessDataSelection": "sharpguard.regularizers",
    "SAF": "sharpguard.regularizers",
    # measurement
    "hessian_eigenvalues": "sharpguard.sharpness",
    "hessian_trace": "sharpguard.sharpness",
    "spectral_density": "sharpguard.sharpness",
    "worst_case_sharpness": "sharpguard.sharpness",
    "average_sharpness": "sharpguard.sharpness",
    "eos_ratio": "sharpguard.sharpness",
    "relative_flatness": "sharpguard.sharpness",
    "robust_sharpness": "sharpguard.sharpness",
    "input_hessian_eigenvalue": "sharpguard.sharpness",
    "adversarial_geometry": "sharpguard.sharpness",
    # attacks
    "pgd": "sharpguard.attacks",
    "fgsm": "sharpguard.attacks",
    "ThreatModel": "sharpguard.attacks",
    "apgd": "sharpguard.attacks",
    "apgd_targeted": "sharpguard.attacks",
    "square": "sharpguard.attacks",
    "auto_attack": "sharpguard.attacks",
    "fab_targeted": "sharpguard.attacks",
    "AutoAttack": "sharpguard.attacks",
    "robust_accuracy": "sharpguard.attacks",
    "clean_accuracy": "sharpguard.attacks",
    "input_grad_norm": "sharpguard.attacks",
    # adversarial training
    "make_method": "sharpguard.adversarial",
    "FreeAT": "sharpguard.adversarial",
    "GradAlign": "sharpguard.adversarial",
    # monitors
    "SharpnessMonitor": "sharpguard.monitor",
    "RobustnessMonitor": "sharpguard.monitor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sharpguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
