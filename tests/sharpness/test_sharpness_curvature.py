"""Curvature estimates against the exact dense Hessian (float64) of small models and closed forms."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.errors import ConfigurationError, NonFiniteLossError
from sharpguard.sharpness import (
    HVPOperator,
    NonDeterministicHVPError,
    directional_curvature,
    eos_ratio,
    hessian_eigenvalues,
    hessian_trace,
    spectral_density,
)
from sharpguard.sharpness.lanczos import lanczos

# ----------------------------------------------------------------------------------------------
# models (each <= ~200 trainable parameters so the dense Hessian is cheap)


def mlp_case():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    x, y = torch.randn(48, 6, dtype=torch.float64), torch.randint(0, 4, (48,))
    return model, [(x[:20], y[:20]), (x[20:], y[20:])]


def conv_bn_case():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics, used in eval mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(32, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    return model, (x, y)


def bert_case():
    from tests.helpers.tiny_text import sdpa_bert

    model = sdpa_bert(3).double()
    # keep the dense Hessian small: differentiate w.r.t. the attention scores' weights and the head only
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in ("attention.self.query", "attention.self.key", "classifier")))
    batch = {"input_ids": torch.randint(0, 20, (6, 7)), "labels": torch.randint(0, 3, (6,))}
    return model, batch


CASES = {"mlp": mlp_case, "conv_bn": conv_bn_case, "bert_sdpa": bert_case}


def default_loss(model, batch):
    if isinstance(batch, dict):
        return model(**batch).loss
    return F.cross_entropy(model(batch[0]), batch[1])


def dense_hessian(model, batches) -> torch.Tensor:
    """Exact Hessian of the batch-size-weighted probe loss over the trainable parameters, in eval mode."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    batches = batches if isinstance(batches, list) else [batches]
    sizes = [len(b["labels"]) if isinstance(b, dict) else len(b[1]) for b in batches]
    was_training = model.training
    model.eval()

    def loss_of(flat):
        chunks = torch.split(flat, [p.numel() for _, p in named])
        params = {n: c.view(p.shape) for (n, p), c in zip(named, chunks)}
        total = 0.0
        for b, s in zip(batches, sizes):
            if isinstance(b, dict):
                out = torch.func.functional_call(model, params, args=(), kwargs=b).loss
            else:
                out = F.cross_entropy(torch.func.functional_call(model, params, (b[0],)), b[1])
            total = total + out * s / sum(sizes)
        return total

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        flat = torch.cat([p.detach().reshape(-1) for _, p in named])
        hess = torch.autograd.functional.hessian(loss_of, flat)
    model.train(was_training)
    return (hess + hess.T) / 2


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, batches = CASES[request.param]()
    return request.param, model, batches, dense_hessian(model, batches)


# ----------------------------------------------------------------------------------------------
# operator


def test_hvp_matches_dense_hessian_and_reports_method(case):
    name, model, batches, hess = case
    with HVPOperator(model, batches) as op:
        v = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        hv = op.matvec(v)
        assert op.method == ("autograd+math_sdpa" if name == "bert_sdpa" else "autograd")
        assert op.n_hvp == 2  # the product and the determinism check
    torch.testing.assert_close(hv, hess @ v, rtol=1e-9, atol=1e-11)


def test_list_of_batches_equals_concatenated_batch():
    model, batches = mlp_case()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with HVPOperator(model, batches) as op:
        split = op.matvec(v)
    with HVPOperator(model, (x, y)) as op:
        whole = op.matvec(v)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-7), (torch.float32, 1e-4)])
def test_finite_difference_hvp_is_accurate(dtype, rtol):
    model, batches = mlp_case()
    hess = dense_hessian(model, batches)
    model = model.to(dtype)
    batches = [(x.to(dtype), y) for x, y in batches]
    v = torch.randn(hess.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with HVPOperator(model, batches, hvp="finite_difference") as op:
        hv = op.matvec(v.to(dtype))
        assert op.method == "finite_difference"
    err = torch.linalg.vector_norm(hv.double() - hess @ v) / torch.linalg.vector_norm(hess @ v)
    assert float(err) < rtol


def test_double_backward_failure_falls_back_to_finite_differences():
    class NoDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - torch.tanh(x) ** 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 4)

        def forward(self, x):
            return self.b(NoDoubleBackward.apply(self.a(x)))

    model, batches = mlp_case()
    net = Net().double()
    net.a.load_state_dict(model[0].state_dict())
    net.b.load_state_dict(model[2].state_dict())
    hess = dense_hessian(model, batches)  # the same function, with autograd's tanh
    with pytest.warns(RuntimeWarning, match="finite-difference"):
        r = hessian_eigenvalues(net, batches, k=2)
    assert r.hvp_method == "finite_difference"
    exact = torch.linalg.eigvalsh(hess).flip(0)[:2]
    np.testing.assert_allclose(r.eigenvalues, exact.numpy(), rtol=1e-4)
    with pytest.raises(ConfigurationError, match="double backward failed"):
        hessian_eigenvalues(net, batches, hvp="autograd")


def test_determinism_check_catches_dropout_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
    batch = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    with pytest.raises(NonDeterministicHVPError, match="eval mode"):
        hessian_eigenvalues(model, batch, train=True)
    assert hessian_eigenvalues(model, batch).converged  # eval mode (the default) is deterministic


def test_clear_errors_on_bad_input():
    model, batches = mlp_case()
    with pytest.raises(ConfigurationError, match="empty"):
        hessian_eigenvalues(model, [])
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ConfigurationError, match="no trainable parameters"):
        hessian_trace(frozen, (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ConfigurationError, match="scalar"):
        hessian_eigenvalues(model, batches, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(NonFiniteLossError):
        hessian_eigenvalues(model, batches, loss_fn=lambda m, b: m(b[0]).sum() * float("nan"))
    with pytest.raises(ConfigurationError, match="k must"):
        hessian_eigenvalues(model, batches, k=0)
    with pytest.raises(ConfigurationError, match="which"):
        hessian_eigenvalues(model, batches, which="LM")
    with pytest.raises(ConfigurationError, match="hvp"):
        hessian_trace(model, batches, hvp="gnn")
    with pytest.raises(ConfigurationError, match="init"):
        hessian_eigenvalues(model, batches, init=torch.ones(3))
    with pytest.raises(ConfigurationError, match="with"):
        HVPOperator(model, batches).matvec(torch.ones(114, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# eigenvalues


def test_top_k_eigenvalues_match_dense_hessian(case):
    _, model, batches, hess = case
    exact = torch.linalg.eigvalsh(hess).flip(0).numpy()
    r = hessian_eigenvalues(model, batches, k=3, return_eigenvectors=True)
    assert r.converged and len(r.eigenvalues) == 3
    np.testing.assert_allclose(r.eigenvalues, exact[:3], rtol=1e-3)
    for lam, vec, res in zip(r.eigenvalues, r.eigenvectors, r.residuals):
        assert float(torch.linalg.vector_norm(hess @ vec - lam * vec)) <= res * 1.01 + 1e-10
    assert r.n_hvp < hess.shape[0]


def test_smallest_and_both_ends(case):
    _, model, batches, hess = case
    exact = torch.linalg.eigvalsh(hess).numpy()
    low = hessian_eigenvalues(model, batches, k=2, which="smallest")
    # descending order: the most negative eigenvalue is last
    np.testing.assert_allclose(low.eigenvalues, exact[:2][::-1], rtol=1e-3, atol=1e-3 * abs(exact).max())
    both = hessian_eigenvalues(model, batches, k=1, which="both")
    np.testing.assert_allclose(
        [both.lambda_max, both.lambda_min], [exact[-1], exact[0]], rtol=1e-3, atol=1e-3 * abs(exact).max()
    )


def test_warm_start_from_previous_eigenvector_needs_few_products():
    model, batches = mlp_case()
    cold = hessian_eigenvalues(model, batches, return_eigenvectors=True)
    warm = hessian_eigenvalues(model, batches, init=cold.eigenvectors[0], check_determinism=False)
    assert warm.n_hvp <= 2 < cold.n_hvp
    assert warm.lambda_max == pytest.approx(cold.lambda_max, rel=1e-6)
    # per-parameter tensors are accepted as well
    per_param = list(torch.split(cold.eigenvectors[0], [p.numel() for p in model.parameters()]))
    per_param = [c.view(p.shape) for c, p in zip(per_param, model.parameters())]
    assert hessian_eigenvalues(model, batches, init=per_param).lambda_max == pytest.approx(cold.lambda_max, rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=5, max_value=40), st.integers(min_value=1, max_value=3), st.integers(0, 2**31 - 1))
def test_lanczos_recovers_extreme_eigenvalues_of_random_symmetric_matrices(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = (a + a.T) / 2
    exact = torch.linalg.eigvalsh(a).numpy()
    out = lanczos(
        lambda v: a @ v,
        torch.randn(n, generator=g, dtype=torch.float64),
        k=k,
        which="both",
        tol=1e-8,
        max_iter=n,
        generator=g,
    )
    want = sorted(set(range(n - 1, n - 1 - k, -1)) | set(range(min(k, n))), reverse=True)
    np.testing.assert_allclose(out["eigenvalues"], exact[want], atol=1e-6 * abs(exact).max())


# ----------------------------------------------------------------------------------------------
# trace and density


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors(case, method):
    _, model, batches, hess = case
    t = hessian_trace(model, batches, method=method, n_hvp=60, seed=0)
    exact = float(hess.trace())
    assert t.stderr > 0 and t.n_hvp == 61
    assert abs(t.trace - exact) <= 3 * t.stderr


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_spectrum():
    # least squares with column scales 2^-j: H = 2 X^T X / n has a geometrically decaying spectrum
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64) * 2.0 ** -torch.arange(40, dtype=torch.float64) / 4
    y = torch.randn(200, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(40, 1, bias=False).double()
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])
    exact = float(2 * (x**2).sum() / len(x))
    errs = {m: [] for m in ("hutchinson", "hutch++")}
    for seed in range(3):
        for m, found in errs.items():
            found.append(abs(hessian_trace(model, (x, y), loss_fn=mse, method=m, n_hvp=24, seed=seed).trace - exact))
    assert max(errs["hutch++"]) < 0.1 * min(errs["hutchinson"])


def test_spectral_density_mass_and_moments_match_exact_spectrum(case):
    _, model, batches, hess = case
    exact = torch.linalg.eigvalsh(hess).numpy()
    # Gauss quadrature with m nodes is exact for moments up to 2m - 1: the moments' only error is the
    # Monte Carlo error over the start vectors, so many short runs test them sharply.
    d = spectral_density(model, batches, n_iter=12, n_v=30, seed=0)
    assert d.n_hvp <= 30 * 12 + 1  # a run stops early on an invariant subspace
    assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-3)
    for w in d.weights:
        assert w.sum() == pytest.approx(1.0, abs=1e-9)
    mean = d.moment(1)
    assert abs(mean - exact.mean()) <= 3 * d.moment_stderr(1) + 1e-12
    assert abs(d.moment(2) - (exact**2).mean()) <= 3 * d.moment_stderr(2) + 1e-12
    # the extreme nodes bracket the spectrum's ends closely (Lanczos finds the outliers first)
    top = max(t.max() for t in d.nodes)
    assert top == pytest.approx(exact.max(), rel=1e-3)
    assert d.mass(exact.min() - 1e-9, exact.max() + 1e-9) == pytest.approx(1.0, abs=1e-6)


def test_plot_spectral_density_labels_axes():
    import matplotlib
    matplotlib.use("Agg")
    from sharpguard.sharpness import plot_spectral_density

    model, batches = mlp_case()
    ax = plot_spectral_density(spectral_density(model, batches, n_iter=10, n_v=2))
    assert ax.get_xlabel() and ax.get_ylabel() and len(ax.lines) == 1


# ----------------------------------------------------------------------------------------------
# closed forms


def _regression_data(seed=0, n=64, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def test_linear_regression_hessian_is_two_xtx_over_n():
    x, y = _regression_data()
    model = nn.Linear(5, 1).double()
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # [weight | bias]
    exact = np.linalg.eigvalsh((2 * xa.T @ xa / len(x)).numpy())[::-1]
    r = hessian_eigenvalues(model, [(x[:30], y[:30]), (x[30:], y[30:])], loss_fn=mse, k=6, which="largest")
    np.testing.assert_allclose(r.eigenvalues, exact, rtol=1e-6)
    t = hessian_trace(model, (x, y), loss_fn=mse, method="hutch++", n_hvp=30)
    assert t.trace == pytest.approx(exact.sum(), rel=1e-9)  # Q spans all 6 dimensions: exact


def test_logistic_regression_hessian_is_xt_diag_p_1mp_x_over_n():
    x, _ = _regression_data(seed=1)
    model = nn.Linear(5, 1).double()
    y = (torch.rand(len(x), generator=torch.Generator().manual_seed(2)) < 0.5).double()
    bce = lambda m, b: F.binary_cross_entropy_with_logits(m(b[0]).squeeze(1), b[1])
    with torch.no_grad():
        p = torch.sigmoid(model(x).squeeze(1))
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    hess = (xa.T * (p * (1 - p))) @ xa / len(x)
    exact = np.linalg.eigvalsh(hess.numpy())
    r = hessian_eigenvalues(model, (x, y), loss_fn=bce, k=2, which="both")
    np.testing.assert_allclose(r.eigenvalues, [exact[-1], exact[-2], exact[1], exact[0]], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# edge of stability


def test_eos_ratio_for_sgd_momentum_and_nesterov(case):
    _, model, batches, hess = case
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    r = eos_ratio(model, batches, opt, tol=1e-6)
    assert r.optimizer == "sgd" and not r.preconditioned
    assert r.threshold == pytest.approx((2 + 2 * 0.9) / 0.5)
    assert r.lambda_max == pytest.approx(lam, rel=1e-5)
    assert r.ratio == pytest.approx(lam * 0.5 / 3.8, rel=1e-5)
    nesterov = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9, nesterov=True, weight_decay=0.01
    )
    rn = eos_ratio(model, batches, nesterov, tol=1e-6)
    assert rn.threshold == pytest.approx(3.8 / (0.5 * 2.8))
    assert rn.lambda_max == pytest.approx(lam + 0.01, rel=1e-5)  # coupled L2 decay adds wd * I


def test_eos_ratio_at_zero_learning_rate_is_zero_not_an_error(case):
    """The end of a cosine schedule (lr = 0) must not crash a monitored run: no step, nothing unstable."""
    _, model, batches, hess = case
    lam = float(torch.linalg.eigvalsh(hess)[-1])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
    r = eos_ratio(model, batches, opt, tol=1e-6)
    assert r.threshold == float("inf") and r.ratio == 0.0
    assert r.lambda_max == pytest.approx(lam, rel=1e-5)
    with pytest.raises(ConfigurationError, match="learning rates"):
        eos_ratio(model, batches, _negative_lr(model), tol=1e-6)


def _negative_lr(model):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.param_groups[0]["lr"] = -0.1  # torch refuses it at construction; a scheduler bug could still set it
    return opt


def test_eos_ratio_for_adam_uses_preconditioned_hessian():
    model, batches = mlp_case()
    hess = dense_hessian(model, batches)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    with pytest.raises(ConfigurationError, match="first step"):
        eos_ratio(model, batches, opt)
    for _ in range(3):
        opt.zero_grad()
        sum(F.cross_entropy(model(x), y) for x, y in batches).backward()
        opt.step()
    hess = dense_hessian(model, batches)
    denom = []
    for p in model.parameters():
        st_ = opt.state[p]
        denom.append(((st_["exp_avg_sq"] / (1 - 0.99 ** float(st_["step"]))).sqrt() + 1e-6).reshape(-1))
    d = torch.cat(denom).rsqrt()
    exact = float(torch.linalg.eigvalsh(d[:, None] * hess * d[None, :])[-1])
    r = eos_ratio(model, batches, opt, tol=1e-6)
    assert r.preconditioned and r.optimizer == "adam"
    assert r.lambda_max == pytest.approx(exact, rel=1e-5)
    assert r.threshold == pytest.approx(38 / 1e-2)
    with pytest.raises(ConfigurationError, match="neither"):
        eos_ratio(model, batches, torch.optim.Adagrad(model.parameters()))


def test_directional_curvature_along_gradient_update_and_given_vector():
    model, batches = mlp_case()
    hess = dense_hessian(model, batches)
    params = list(model.parameters())
    loss = sum(F.cross_entropy(model(x), y) * len(y) for x, y in batches) / 48
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).detach()
    r = directional_curvature(model, batches)
    assert r.value == pytest.approx(float(g @ hess @ g / (g @ g)), rel=1e-9)
    assert r.n_hvp == 2
    u = torch.randn(len(g), dtype=torch.float64)
    assert directional_curvature(model, batches, direction=u, check_determinism=False).value == pytest.approx(
        float(u @ hess @ u / (u @ u)), rel=1e-9
    )
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(ConfigurationError, match="gradient"):
        directional_curvature(model, batches, direction="update", optimizer=opt)
    opt.zero_grad()
    (sum(F.cross_entropy(model(x), y) * len(y) for x, y in batches) / 48).backward()
    opt.step()
    buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in params])
    r = directional_curvature(model, batches, direction="update", optimizer=opt)
    hess = dense_hessian(model, batches)
    assert r.value == pytest.approx(float(buf @ hess @ buf / (buf @ buf)), rel=1e-9)


def test_no_warning_on_the_plain_autograd_path():
    model, batches = mlp_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_eigenvalues(model, batches)
        hessian_trace(model, batches, n_hvp=6)
    assert math.isfinite(hessian_trace(model, batches, n_hvp=6).trace)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_cached_gradient_graph_gives_the_same_products_for_one_forward(cache_graph):
    """A single-batch probe keeps the first-order graph between products (PyHessian's trick): every
    product after the first costs one backward, and the products are those of the dense Hessian."""
    model, batches = mlp_case()
    batch = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    hess = dense_hessian(model, [batch])
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(hess.shape[0], generator=g, dtype=torch.float64) for _ in range(4)]
    with HVPOperator(model, batch, cache_graph=cache_graph) as op:
        products = [op.matvec(v) for v in vectors]
        forwards = op.n_forward
    for v, hv in zip(vectors, products):
        torch.testing.assert_close(hv, hess @ v, rtol=1e-10, atol=1e-12)
    # 4 products + the determinism check's fresh product: 2 forwards cached, 5 without
    assert forwards == (2 if cache_graph else 5)


@given(n=st.integers(1, 40), chunk=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_rademacher_in_chunks_is_one_randint_stream(n, chunk, seed):
    """Drawn a chunk at a time in the vector's dtype, the signs are those of one int64 ``randint`` draw of
    the same generator (seeded results do not change), and every entry is +-1."""
    import sharpguard.sharpness.lanczos as lz

    old, lz.RADEMACHER_CHUNK = lz.RADEMACHER_CHUNK, chunk
    try:
        z = lz.rademacher(n, torch.Generator().manual_seed(seed), torch.float64, torch.device("cpu"))
    finally:
        lz.RADEMACHER_CHUNK = old
    reference = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    assert z.dtype == torch.float64 and torch.equal(z, reference)


def test_rademacher_holds_one_vector_not_an_int64_one():
    """The draw's peak is the float32 vector plus one int64 chunk (counted by MemTracker on fake tensors), not
    the whole int64 vector (twice the float32 one) a single ``randint`` would hold."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from sharpguard.sharpness.lanczos import RADEMACHER_CHUNK, rademacher

    n = 16 * RADEMACHER_CHUNK
    with FakeTensorMode():
        tracker = MemTracker()
        with tracker:
            z = rademacher(n, torch.Generator().manual_seed(0), torch.float32, torch.device("cpu"))
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert z.shape == (n,)
    assert 4 * n <= peak <= 4 * n + 8 * RADEMACHER_CHUNK + 1024
