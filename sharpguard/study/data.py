"""Data sets for the study: scikit-learn's bundled digits (the default, no download) and an entry point
for the user's own data (``--dataset package.module:function``).

A data set is four tensors ``(x_train, y_train, x_test, y_test)``: float inputs in ``[0, 1]`` (the threat
model's bounds) and int64 class labels ``0 .. n_classes - 1``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..errors import ConfigurationError, require


@dataclass(frozen=True)
class StudyData:
    """Train/test tensors of a study with a name for the report."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def subset(self, n_train: int, n_test: int) -> StudyData:
        """The first ``n_train``/``n_test`` examples (the split is already shuffled)."""
        return StudyData(self.name, self.x_train[:n_train], self.y_train[:n_train],
                         self.x_test[:n_test], self.y_test[:n_test])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
        }


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> StudyData:
    """scikit-learn's 1,797 8x8 digits, pixels scaled from the 17 gray levels 0..16 to [0, 1], as
    ``(N, 1, 8, 8)`` tensors; a stratified split with a fixed seed so every run sees the same test set."""
    require("sklearn", "study")
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    digits = _load()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    return StudyData("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def validate(name: str, x_train, y_train, x_test, y_test) -> StudyData:
    """Check the four arrays a data set entry point returned and turn them into a :class:`StudyData`."""
    tensors = []
    for label, value in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test), ("y_test", y_test)):
        try:
            tensors.append(torch.as_tensor(value))
        except Exception as exc:
            raise ConfigurationError(
                f"dataset {name!r}: {label} is not convertible to a tensor ({exc}); return tensors or numpy arrays."
            ) from exc
    xt, yt, xs, ys = tensors
    if xt.dim() < 2 or xs.dim() < 2:
        raise ConfigurationError(
            f"dataset {name!r}: inputs must have at least 2 dimensions (examples, features...), got shapes "
            f"{tuple(xt.shape)} and {tuple(xs.shape)}; for one feature per example use x.reshape(-1, 1)."
        )
    if not (xt.is_floating_point() and xs.is_floating_point()):
        raise ConfigurationError(f"dataset {name!r}: inputs must be floating point; scale them to [0, 1].")
    if any(y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1 for y in (yt, ys)):
        raise ConfigurationError(f"dataset {name!r}: labels must be 1-D integer class indices.")
    if xt.shape[0] != yt.shape[0] or xs.shape[0] != ys.shape[0]:
        raise ConfigurationError(
            f"dataset {name!r}: inputs and labels differ in length "
            f"(train {xt.shape[0]} vs {yt.shape[0]}, test {xs.shape[0]} vs {ys.shape[0]})."
        )
    if xt.shape[1:] != xs.shape[1:]:
        raise ConfigurationError(
            f"dataset {name!r}: train inputs have shape {tuple(xt.shape[1:])} but test inputs {tuple(xs.shape[1:])}."
        )
    if xt.shape[0] < 2 or xs.shape[0] < 1:
        raise ConfigurationError(f"dataset {name!r}: needs at least 2 training and 1 test example.")
    for label, x in (("x_train", xt), ("x_test", xs)):
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise ConfigurationError(
                f"dataset {name!r}: {label} must be finite and lie in [0, 1] (the attack bounds); rescale it."
            )
    if int(min(yt.min(), ys.min())) < 0:
        raise ConfigurationError(f"dataset {name!r}: labels must be non-negative class indices.")
    return StudyData(name, xt.float(), yt.long(), xs.float(), ys.long())


def load_dataset(spec: str) -> StudyData:
    """``"digits"`` or ``"package.module:function"``, where ``function()`` returns
    ``(x_train, y_train, x_test, y_test)`` (tensors or numpy arrays; inputs in [0, 1])."""
    if spec == "digits":
        return load_digits()
    if ":" not in spec:
        raise ConfigurationError(
            f"unknown dataset {spec!r}; use 'digits' or 'package.module:function' returning "
            "(x_train, y_train, x_test, y_test)."
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r} for dataset {spec!r} ({exc}); check that it is on PYTHONPATH."
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigurationError(f"module {module_name!r} has no function {attr!r} for dataset {spec!r}.")
    result = fn()
    if not isinstance(result, (tuple, list)) or len(result) != 4:
        raise ConfigurationError(
            f"dataset {spec!r} must return (x_train, y_train, x_test, y_test), got {type(result).__name__}."
        )
    return validate(spec, *result)
