"""The attack geometry module: projections are Euclidean projections (float64 references computed
another way, and the projection inequality as a law), random starts are uniform in their ball (KS tests
on the radius law), and the pixel, embedding and text code paths draw the same distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import ks_2samp, kstest
from torch import nn

from sharpguard.attacks import ThreatModel, embedding_pgd, make_generator
from sharpguard.attacks import geometry
from sharpguard.errors import ConfigurationError


# ----------------------------------------------------------------------------- float64 references
def l1_projection_by_bisection(v: np.ndarray, eps: float) -> np.ndarray:
    """Projection onto the l1 ball by bisection on the soft threshold (not the sort-based algorithm)."""
    if np.abs(v).sum() <= eps:
        return v.copy()
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(np.abs(v) - mid, 0).sum() > eps:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(np.abs(v) - 0.5 * (lo + hi), 0)


def reference_projection(v: np.ndarray, eps: float, norm: str) -> np.ndarray:
    if norm == "linf":
        return np.minimum(np.maximum(v, -eps), eps)
    if norm == "l2":
        n = math.sqrt(float((v * v).sum()))
        return v if n <= eps else v * (eps / n)
    return l1_projection_by_bisection(v, eps)


def point_in_ball(rng: np.random.Generator, d: int, eps: float, norm: str) -> np.ndarray:
    z = rng.standard_normal(d)
    size = {"linf": np.abs(z).max(), "l2": np.linalg.norm(z), "l1": np.abs(z).sum()}[norm]
    return z / size * eps * rng.uniform() ** (1.0 / d)


@settings(max_examples=40, deadline=None)
@given(norm=st.sampled_from(["linf", "l2", "l1"]), d=st.integers(1, 30), eps=st.floats(0.01, 3.0),
       scale=st.floats(0.01, 10.0), seed=st.integers(0, 10_000))
def test_projection_is_the_euclidean_projection(norm, d, eps, scale, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((3, d)) * scale
    v[1] *= 1e-3  # one example well inside the ball
    p = geometry.project(torch.tensor(v), eps, norm).numpy()
    for i in range(3):
        ref = reference_projection(v[i], eps, norm)
        assert np.allclose(p[i], ref, rtol=1e-9, atol=1e-9)
        # the law: <v - p, z - p> <= 0 for every z of the ball (p is the closest point of a convex set)
        for _ in range(20):
            z = point_in_ball(rng, d, eps, norm)
            assert float((v[i] - p[i]) @ (z - p[i])) <= 1e-9 * (1 + np.abs(v[i]).sum() * eps)
        size = {"linf": np.abs(p[i]).max(), "l2": np.linalg.norm(p[i]), "l1": np.abs(p[i]).sum()}[norm]
        assert size <= eps * (1 + 1e-12) + 1e-12


def test_l1_projection_hand_example_and_per_example_radius():
    v = torch.tensor([[3.0, -1.0, 0.5, 0.0], [0.2, 0.1, -0.1, 0.0]], dtype=torch.float64)
    # ||v_0||_1 = 4.5 > 2: theta solves (3 - t) + (1 - t) = 2 -> t = 1 (0.5 < t drops out)
    expected = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.2, 0.1, -0.1, 0.0]], dtype=torch.float64)
    assert torch.allclose(geometry.project_l1(v, 2.0), expected, atol=1e-15)
    radius = torch.tensor([[1.0], [0.2]], dtype=torch.float64)
    out = geometry.project_l1(v, radius)
    assert torch.allclose(out.abs().sum(1), torch.tensor([1.0, 0.2], dtype=torch.float64))


def test_norms_directions_and_half_precision():
    t = torch.tensor([[[3.0, -4.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert geometry.per_example_norm(t).flatten().tolist() == [5.0, 0.0]
    assert geometry.per_example_norm(t, "linf").flatten().tolist() == [4.0, 0.0]
    assert geometry.per_example_norm(t, "l1").flatten().tolist() == [7.0, 0.0]
    unit = geometry.normalize_l2(t)
    assert torch.allclose(unit[0], t[0] / 5) and torch.equal(unit[1], torch.zeros(2, 2))  # zero stays zero
    assert torch.equal(geometry.ascent_direction(t, "linf"), t.sign())
    big = torch.full((2, 300), 300.0, dtype=torch.float16)  # ||.||^2 overflows fp16; the norm is taken in fp32
    n = geometry.per_example_norm(big)
    assert n.dtype == torch.float32 and torch.isfinite(n).all()
    assert torch.isfinite(geometry.normalize_l2(big)).all()
    mask = torch.tensor([[1, 0]])
    masked = geometry.normalize_l2(torch.ones(1, 2, 3), mask)
    assert torch.equal(masked[0, 1], torch.zeros(3)) and torch.allclose(masked.flatten(1).norm(dim=1), torch.ones(1))
    with pytest.raises(ConfigurationError, match="norm"):
        geometry.per_example_norm(t, "l3")
    with pytest.raises(ConfigurationError, match="random starts"):
        geometry.random_in_ball((2, 3), "l1", 1.0, make_generator("cpu", 0))


# ----------------------------------------------------------------------------- random starts
@pytest.mark.parametrize("d", [1, 3, 12])
def test_l2_random_start_radius_follows_the_uniform_in_ball_law(d):
    """Uniform in the d-ball: (r / eps)^d ~ U(0, 1); the radius law r ~ eps U is rejected."""
    delta = geometry.random_in_ball((4000, d), "l2", 0.7, make_generator("cpu", d), dtype=torch.float64)
    r = delta.norm(dim=1).numpy() / 0.7
    assert r.max() <= 1 + 1e-12
    assert kstest(r**d, "uniform").pvalue > 0.01
    if d > 1:
        assert kstest(r, "uniform").pvalue < 1e-6
    # and the direction is uniform on the sphere: each coordinate of a unit vector has mean 0
    unit = delta / delta.norm(dim=1, keepdim=True)
    assert unit.mean(0).abs().max() < 4 / math.sqrt(4000)


def test_linf_random_start_is_uniform_in_the_cube_with_per_example_radii():
    radii = torch.tensor([0.1, 0.5, 2.0]).repeat(1000).reshape(-1, 1)
    delta = geometry.random_in_ball((3000, 4), "linf", radii, make_generator("cpu", 2), dtype=torch.float64)
    scaled = (delta / radii.double() + 1) / 2
    assert scaled.min() >= 0 and scaled.max() <= 1
    assert kstest(scaled.flatten().numpy(), "uniform").pvalue > 0.01


class Bag(nn.Module):
    """Embedding -> masked mean -> linear, with a Hugging Face style ``.loss``."""

    def __init__(self, hidden: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, hidden)
        self.head = nn.Linear(hidden, 3)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask, labels):
        m = attention_mask[..., None].float()
        logits = self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_embedding_random_start_draws_the_same_law_as_the_pixel_start():
    """The issue: the embedding start drew its radius as eps * U. Now (r / eps)^d ~ U(0, 1) with d the
    number of real-token coordinates of each example, and alpha = 0 PGD returns the start itself."""
    n, length, hidden, eps = 1500, 3, 4, 0.5
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 10, (n, length), generator=g),
             "attention_mask": torch.ones(n, length, dtype=torch.long),
             "labels": torch.randint(0, 3, (n,), generator=g)}
    batch["attention_mask"][: n // 2, 2:] = 0  # half the examples have one padding position
    delta = embedding_pgd(Bag(hidden), batch, eps=eps, alpha=0.0, steps=1, random_start=True,
                          generator=make_generator("cpu", 5))
    assert torch.equal(delta[: n // 2, 2:], torch.zeros(n // 2, 1, hidden))  # padding is never perturbed
    r = (delta.flatten(1).norm(dim=1) / eps).double().numpy()
    d = np.where(np.arange(n) < n // 2, 2 * hidden, 3 * hidden)
    assert r.max() <= 1 + 1e-6
    assert kstest(r**d, "uniform").pvalue > 0.01
    assert kstest(r, "uniform").pvalue < 1e-6  # the old law, rejected
    # pixel space: the same function, the same law
    tm = ThreatModel("l2", eps, bounds=None)
    x0 = torch.zeros(n, 3 * hidden)
    rp = ((tm.random_start(x0, make_generator("cpu", 5)) - x0).norm(dim=1) / eps).double().numpy()
    assert kstest(rp ** (3 * hidden), "uniform").pvalue > 0.01
    assert ks_2samp(rp, r[n // 2:]).pvalue > 0.001  # unpadded embedding examples and pixels: one law


def test_embedding_pgd_linf_stays_in_the_box_and_attacks():
    model = Bag()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 10, (64, 5), generator=g),
             "attention_mask": torch.ones(64, 5, dtype=torch.long),
             "labels": torch.randint(0, 3, (64,), generator=g)}
    delta = embedding_pgd(model, batch, eps=0.3, alpha=0.1, steps=5, norm="linf", random_start=True,
                          generator=make_generator("cpu", 1))
    assert delta.abs().max() <= 0.3 + 1e-7
    from sharpguard.attacks import EmbeddingPerturbation

    with torch.no_grad():
        clean = float(model(**batch)["loss"])
        with EmbeddingPerturbation(model, delta):
            attacked = float(model(**batch)["loss"])
    assert attacked > clean
    with pytest.raises(ConfigurationError, match="norm"):
        embedding_pgd(model, batch, norm="l1")
    # eps = 0 is the zero ball (it used to mean "no projection" here, an unbounded attack)
    for norm in ("l2", "linf"):
        assert torch.equal(embedding_pgd(model, batch, eps=0.0, alpha=0.5, steps=2, norm=norm), torch.zeros_like(delta))
