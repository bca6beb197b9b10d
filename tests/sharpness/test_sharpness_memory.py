"""Bounded-memory curvature: thick-restarted Lanczos against the dense Hessian, the model-size vectors a
check holds, the finite-difference fallbacks (reentrant checkpointing, step size) and Adam EoS with a
parameter that never had a gradient."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.sharpness.test_sharpness_curvature import bert_case, conv_bn_case, dense_hessian, mlp_case
from torch import nn
from torch.utils import checkpoint

from sharpguard.errors import ConfigurationError
from sharpguard.sharpness import HVPOperator, eos_ratio, hessian_eigenvalues, hessian_trace
from sharpguard.sharpness.lanczos import default_max_basis, lanczos

# ----------------------------------------------------------------------------------------------
# thick restarts are exact


@pytest.mark.parametrize("make", [mlp_case, conv_bn_case], ids=["mlp", "conv_bn"])
@pytest.mark.parametrize("which, k, max_basis",
                         [("largest", 2, 5), ("largest", 1, 3), ("smallest", 1, 4), ("both", 1, 6)])
def test_restarted_lanczos_matches_dense_hessian(make, which, k, max_basis):
    model, batches = make()
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches)).flip(0).numpy()
    r = hessian_eigenvalues(model, batches, k=k, which=which, tol=1e-8, max_iter=400, max_basis=max_basis)
    want = {"largest": exact[:k], "smallest": exact[-k:], "both": np.r_[exact[:k], exact[-k:]]}[which]
    assert r.converged
    assert r.n_restarts > 0  # the tiny cap forced restarts
    assert r.basis_vectors <= max_basis + 1
    np.testing.assert_allclose(r.eigenvalues, want, rtol=1e-7, atol=1e-9)
    # the certificate: every residual bounds the distance to some exact eigenvalue
    for lam, res in zip(r.eigenvalues, r.residuals):
        assert np.min(np.abs(exact - lam)) <= res + 1e-12


def test_restarted_eigenvectors_are_eigenvectors():
    model, batches = mlp_case()
    hess = dense_hessian(model, batches)
    r = hessian_eigenvalues(model, batches, k=2, tol=1e-10, max_iter=400, max_basis=4, return_eigenvectors=True)
    for lam, y in zip(r.eigenvalues, r.eigenvectors):
        torch.testing.assert_close(float(torch.linalg.vector_norm(y)), 1.0, rtol=1e-9, atol=0)
        assert float(torch.linalg.vector_norm(hess @ y - lam * y)) < 1e-7 * abs(lam)


def test_max_basis_is_validated_before_anything_runs():
    model, batches = mlp_case()
    before = [p.detach().clone() for p in model.parameters()]
    for bad in (1, 2, 2.5, "10", True):
        with pytest.raises(ConfigurationError, match="max_basis"):
            hessian_eigenvalues(model, batches, k=1, max_basis=bad)
    with pytest.raises(ConfigurationError, match="max_basis"):
        hessian_eigenvalues(model, batches, k=2, which="both", max_basis=5)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


# ----------------------------------------------------------------------------------------------
# memory: model-size vectors alive while the solver runs, counted by storage


def _live_vectors(n: int, itemsize: int, before: frozenset[int] = frozenset()) -> float:
    """Bytes of distinct live tensor storages of at least one model-size vector, in model-size vectors;
    storages in ``before`` (alive before the measured run: other tests' leftovers) are not counted."""
    seen: dict[int, int] = {}
    for obj in _tensors():
        storage = obj.untyped_storage()
        if storage.nbytes() >= n * itemsize and storage.data_ptr() not in before:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / (n * itemsize)


def _with_graph() -> int:
    """Live tensors with a ``grad_fn``. A stale view left by another test (a chunk of an attention
    weight that an optimizer has since updated in place) raises on ``grad_fn``: not ours, not counted."""
    count = 0
    for t in _tensors():
        try:
            count += t.grad_fn is not None
        except RuntimeError:
            pass
    return count


def _has_storage_pointer(t: torch.Tensor) -> bool:
    """Fake and meta tensors left alive by other tests' FakeTensorMode runs have no storage to point at."""
    try:
        t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _tensors() -> list[torch.Tensor]:
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and _has_storage_pointer(o)]


def _peak_vectors(max_basis: int | None, n: int = 4000, max_iter: int = 90) -> tuple[float, dict]:
    # a diagonal "Hessian" without a gap at the top (slow convergence): every allowed product is taken
    diag = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    calls, peak = [0], [0.0]
    before = frozenset(t.untyped_storage().data_ptr() for t in _tensors()) - {diag.untyped_storage().data_ptr()}

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] % 15 == 0:  # the old basis only grows, so sampling every few products finds its peak
            peak[0] = max(peak[0], _live_vectors(n, 8, before))
        return diag * v

    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(n, generator=g, dtype=torch.float64)
    out = lanczos(matvec, v0, k=1, tol=1e-300, max_iter=max_iter, generator=g, max_basis=max_basis)
    assert out["n_iter"] == max_iter and calls[0] == max_iter
    return peak[0], out


def test_a_lambda_max_check_holds_a_bounded_number_of_model_size_vectors():
    cap = default_max_basis(1, "largest")
    bounded, out = _peak_vectors(None)
    # the basis (cap + 1 rows), the product, the diagonal, the start vector and one temporary
    assert bounded <= cap + 1 + 4, bounded
    assert out["peak_rows"] <= cap + 1 and out["n_restarts"] > 0
    # the same run with an unbounded basis (the old behaviour) holds every vector: the count can fail
    unbounded, _ = _peak_vectors(90)
    assert unbounded > 60, unbounded
    assert abs(out["eigenvalues"][0] - 1.0) < 1e-3


def test_a_check_holds_the_basis_and_the_product_and_nothing_else_model_sized():
    """Counted inside the products of a real check (the loss function samples the live flat vectors):
    at most ``max_basis`` Lanczos rows and the product's accumulator - the start vector is not kept
    beside its normalized copy in the basis (it was, one model-size vector for the whole check)."""
    model, batches = mlp_case()
    batch = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    n = sum(p.numel() for p in model.parameters())
    itemsize = next(model.parameters()).element_size()
    counts: list[int] = []

    def loss_fn(m: nn.Module, b) -> torch.Tensor:
        flat = {t.untyped_storage().data_ptr() for t in _tensors() if t.untyped_storage().nbytes() == n * itemsize}
        counts.append(len(flat))
        return F.cross_entropy(m(b[0]), b[1])

    cap = default_max_basis(1, "largest")
    res = hessian_eigenvalues(model, batch, loss_fn, tol=1e-12, max_iter=3 * cap, micro_batches=2,
                              check_determinism=False)
    assert res.n_restarts > 0 and len(counts) == 2 * res.n_hvp  # the basis filled, two micro-batches a product
    assert max(counts) <= cap + 1, counts
    assert max(counts) == cap + 1  # the count sees the basis (a count of nothing would pass the line above)


def test_finite_difference_check_holds_no_gradient_graph():
    """The memory-lean path: every product is two first-order gradient passes, so nothing with a
    ``grad_fn`` is alive between products (a cached double-backward graph would be)."""
    model, batches = mlp_case()
    batch = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    graphs = []
    # tensors with a graph that other tests left alive in this process are not this operator's
    before = _with_graph()

    with HVPOperator(model, batch, hvp="finite_difference") as op:
        v = torch.randn(op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            op.matvec(v)
            graphs.append(_with_graph() - before)
        assert not op._graphs
    assert graphs == [0, 0, 0]
    with HVPOperator(model, batch) as op:  # the exact default caches the single batch's gradient graph
        op.matvec(v)
        assert _with_graph() - before > 0


# ----------------------------------------------------------------------------------------------
# micro-batches: the same operator, one micro-batch's graph at a time


@pytest.mark.parametrize("make", [mlp_case, conv_bn_case, bert_case], ids=["mlp", "conv_bn", "bert"])
@pytest.mark.parametrize("micro_batches", [2, 3])
def test_micro_batched_products_are_the_dense_hessians(make, micro_batches):
    """Split by examples and weighted by their sizes, the micro-batches give the Hessian of the same
    (example-mean) probe loss: products and eigenvalues against the exact dense Hessian, float64."""
    model, batches = make()
    H = dense_hessian(model, batches)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with HVPOperator(model, batches, micro_batches=micro_batches) as op:
        assert len(op.batches) == micro_batches * (len(batches) if isinstance(batches, list) else 1)
        assert not op.cache_graph  # several batches: no cached graph unless asked
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-9, atol=1e-11)
    res = hessian_eigenvalues(model, batches, k=2, tol=1e-10, micro_batches=micro_batches)
    dense = torch.linalg.eigvalsh(H).flip(0)[:2]
    np.testing.assert_allclose(res.eigenvalues, dense.numpy(), rtol=1e-7, atol=1e-9)
    assert res.settings["micro_batches"] == micro_batches


def _peak_saved_bytes(fn, existing: list[torch.Tensor] = ()) -> int:
    """The most bytes autograd held in saved tensors at once while ``fn`` ran (every graph: the forward's,
    the gradient graph built with ``create_graph`` and the double backward's), tracked by pack hooks with
    a finalizer per saved tensor. A storage is counted once however many saved views share it (the
    product saves the parameter-shaped views of ``v``, all of one flat vector); the storages of
    ``existing`` (weights, the vector: memory the product does not allocate) are not counted."""
    import weakref

    live, peak = [0], [0]
    users: dict[int, int] = {}  # storage pointer -> saved tensors alive on it
    skip = {t.untyped_storage().data_ptr() for t in existing}

    class Saved:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    def release(key: int, n: int) -> None:
        users[key] -= 1
        if not users[key]:
            del users[key]
            live[0] -= n

    def pack(t: torch.Tensor):
        box = Saved(t)
        storage = t.untyped_storage()
        key, n = storage.data_ptr(), (storage.nbytes() if t.numel() else 0)
        if key in skip:
            return box
        if key not in users:
            live[0] += n
            users[key] = 0
        users[key] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(box, release, key, n)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        fn()
    return peak[0]


def test_micro_batches_bound_the_graph_a_product_holds():
    """The double-backward graph of a product holds one micro-batch's activations at a time: the peak
    of bytes saved for backward falls with the number of micro-batches (an MLP whose activations, not
    its weights, dominate what autograd saves)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    batch = (torch.randn(512, 32), torch.randint(0, 10, (512,)))
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    peaks = {}
    for m in (1, 2, 4):
        with HVPOperator(model, batch, micro_batches=m, cache_graph=False, check_determinism=False) as op:
            peaks[m] = _peak_saved_bytes(lambda: op.matvec(v), [v, *model.parameters()])
    assert peaks[2] < 0.6 * peaks[1], peaks
    assert peaks[4] < 0.6 * peaks[2], peaks


class _PeakNewStorage:
    """Peak bytes of tensor storages created while active and still alive (a dispatch mode, so every
    op counts: forward, both backwards, temporaries); storages that existed before are not counted."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.peak = 0

    def run(self, fn) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        refs: dict[int, tuple[StorageWeakRef, int]] = {}
        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key, (ref, _) in list(refs.items()):
                    if ref.expired():
                        del refs[key]
                for t in pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in owner.skip and key not in refs:
                            refs[key] = (StorageWeakRef(st), st.nbytes())
                owner.peak = max(owner.peak, sum(n for _, n in refs.values()))
                return out

        with Mode():
            fn()


def test_a_product_frees_the_gradient_before_its_second_backward():
    """Double backward through ``<g, v>`` instead of ``grad_outputs=v``: the first-order gradient ``g``
    is not kept through the second backward. On an MLP whose weights dwarf its activations (batch 4)
    a product then holds about 4 parameter copies at its peak (the product, its accumulator and the
    double backward's transients) instead of 5; the product itself is unchanged (the dense Hessian's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)).double()
    batch = (torch.randn(4, 256, dtype=torch.float64), torch.randint(0, 10, (4,)))
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = list(model.parameters())
    for micro in (1, 2):
        peak = _PeakNewStorage([v, *params])
        with HVPOperator(model, batch, micro_batches=micro, cache_graph=False, check_determinism=False) as op:
            out: list[torch.Tensor] = []
            peak.run(lambda: out.append(op.matvec(v)))
        assert peak.peak <= 4.5 * 8 * n, peak.peak / (8 * n)
        # the same product as autograd's own double backward
        loss = F.cross_entropy(model(batch[0]), batch[1])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        ref = torch.autograd.grad(grads, params, grad_outputs=list(op.unflatten(v)))
        torch.testing.assert_close(out[0], torch.cat([r.reshape(-1) for r in ref]), rtol=1e-10, atol=1e-12)


def test_a_batch_that_cannot_be_split_is_refused_with_the_fix():
    model, batches = mlp_case()
    x, y = batches[0]
    flat_targets = (x, torch.cat([y, y]))  # a per-example tensor that is not batch-first
    with pytest.raises(ConfigurationError, match="batch-first"):
        HVPOperator(model, flat_targets, micro_batches=2)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigurationError, match="micro_batches"):
            HVPOperator(model, batches, micro_batches=bad)


def test_the_monitor_measures_on_micro_batches_and_says_when_it_cannot():
    from sharpguard.monitor import SharpnessMonitor

    model, batches = mlp_case()
    model = model.float()
    probe = [(x.float(), y) for x, y in batches]
    values = {}
    for m in (1, 2):
        mon = SharpnessMonitor(("lambda_max",), every_n_steps=1, probe=probe, micro_batches=m,
                               measure_kwargs={"lambda_max": {"tol": 1e-6, "max_iter": 60}})
        metrics, settings = mon.measure(model, with_settings=True)
        values[m] = metrics["sharpness/lambda_max"]
        assert settings["sharpness/lambda_max"]["micro_batches"] == m
    assert values[2] == pytest.approx(values[1], rel=1e-4)
    # a probe the monitor cannot split (it carries per-class weights, a tensor that is not per example)
    # is measured whole, and the monitor says so once
    x, y = probe[0]
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    mon = SharpnessMonitor(("lambda_max",), every_n_steps=1, probe=[(x, y, weights)], micro_batches=3,
                           loss_fn=lambda model, b: F.cross_entropy(model(b[0]), b[1], weight=b[2]))
    with pytest.warns(UserWarning, match="whole probe batches"):
        metrics, settings = mon.measure(model, with_settings=True)
    assert np.isfinite(metrics["sharpness/lambda_max"]) and settings["sharpness/lambda_max"]["micro_batches"] == 1
    # a loss that only runs on the whole batch (a recurrent state sized for it, as Lightning's LSTM demo
    # keeps) fails on a micro-batch: the check is taken on whole batches, said once, and stays so
    def whole_batch_only(model, b):
        if len(b[0]) != len(x):
            raise RuntimeError(f"Expected hidden[0] size ({len(x)}, 16), got ({len(b[0])}, 16)")
        return F.cross_entropy(model(b[0]), b[1])

    mon = SharpnessMonitor(("lambda_max",), every_n_steps=1, probe=[(x, y)], loss_fn=whole_batch_only, micro_batches=3,
                           measure_kwargs={"lambda_max": {"tol": 1e-6, "max_iter": 60}})
    with pytest.warns(UserWarning, match="failed on a micro-batch"):
        metrics, settings = mon.measure(model, with_settings=True)
    assert settings["sharpness/lambda_max"]["micro_batches"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.measure(model)["sharpness/lambda_max"] == pytest.approx(metrics["sharpness/lambda_max"], rel=1e-5)
    with pytest.raises(ConfigurationError, match="micro_batches"):
        SharpnessMonitor(micro_batches=0)


def test_the_monitor_states_the_micro_batches_a_probe_really_splits_into():
    """The console line's memory terms use the slices a probe batch actually gives: 8 when asked for 8,
    fewer (one example each) for a smaller batch, 1 - a cached graph - for a single example."""
    from sharpguard.monitor import SharpnessMonitor
    from sharpguard.sharpness.cost import EXACT_GRAPH_FACTOR, HVP_PASSES, HVP_PASSES_CACHED

    assert "up to 8 micro-batches" in SharpnessMonitor(("lambda_max",), every_n_steps=1, micro_batches=8).describe()
    for n, slices in ((32, 8), (3, 3), (1, 1)):
        probe = [(torch.randn(n, 6), torch.randint(0, 4, (n,)))]
        mon = SharpnessMonitor(("lambda_max",), every_n_steps=1, probe=probe, micro_batches=8)
        line = mon.describe()
        assert f"~{EXACT_GRAPH_FACTOR / slices:.1f}x" in line, line
        assert f"({slices} micro-batch{'es' if slices > 1 else ''} per probe batch)" in line, line
        assert mon.HVP_STEPS == (HVP_PASSES_CACHED if slices == 1 else HVP_PASSES["autograd"])


# ----------------------------------------------------------------------------------------------
# finite-difference fallbacks


class _CheckpointedMLP(nn.Module):
    """The test MLP with its hidden layer under reentrant activation checkpointing."""

    def __init__(self, reference: nn.Sequential, use_reentrant: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 10), nn.Linear(10, 4)
        self.a.load_state_dict(reference[0].state_dict())
        self.b.load_state_dict(reference[2].state_dict())
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)  # the checkpoint's input requires grad, as hidden states inside a network do
        h = checkpoint.checkpoint(torch.tanh, h, use_reentrant=self.use_reentrant)
        return self.b(h)


def test_reentrant_checkpointing_falls_back_to_finite_differences_with_the_right_lambda_max():
    reference, batches = mlp_case()
    exact = torch.linalg.eigvalsh(dense_hessian(reference, batches)).flip(0).numpy()
    net = _CheckpointedMLP(reference).double()
    grads = [torch.full_like(p, 0.5) for p in net.parameters()]
    for p, g in zip(net.parameters(), grads):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="finite-difference"):
        r = hessian_eigenvalues(net, batches, k=2, tol=1e-8)
    assert r.hvp_method == "finite_difference" and r.converged
    np.testing.assert_allclose(r.eigenvalues, exact[:2], rtol=1e-6)
    # .grad was used as scratch space by backward(): the same tensors with the same values are back
    for p, g in zip(net.parameters(), grads):
        assert p.grad is g and torch.equal(g, torch.full_like(g, 0.5))
    with pytest.raises(ConfigurationError, match="double backward failed"):
        hessian_eigenvalues(net, batches, hvp="autograd")
    # non-reentrant checkpointing supports double backward: exact products, no fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact_path = hessian_eigenvalues(_CheckpointedMLP(reference, use_reentrant=False).double(), batches, k=2)
    assert exact_path.hvp_method == "autograd"
    np.testing.assert_allclose(exact_path.eigenvalues, exact[:2], rtol=1e-7)


def test_finite_difference_step_follows_the_weights_the_direction_moves():
    """A large, idle weight block (an embedding table the probe does not use) used to set the step:
    ``h ~ eps^(1/3) ||w||`` moved the small head weights along the top eigenvector far beyond their own
    size. The step is now the v-weighted size of the weights moved, and the float32 product along the
    top eigenvector is accurate."""
    reference, batches = mlp_case()
    hess = dense_hessian(reference, batches)
    evals, evecs = torch.linalg.eigh(hess)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.full((4000,), 10.0))  # parameters() yields it first
            self.head = reference

        def forward(self, x):
            return self.head(x) + 0.0 * self.table.sum()

    net = Net().float()
    top = torch.cat([torch.zeros(4000, dtype=torch.float64), evecs[:, -1]])
    with HVPOperator(net, [(x.float(), y) for x, y in batches], hvp="finite_difference") as op:
        hv = op.matvec(top.float()).double()
        old_step = torch.finfo(torch.float32).eps ** (1 / 3) * float(torch.linalg.vector_norm(op.w0))
    err = float(torch.linalg.vector_norm(hv - evals[-1] * top)) / float(evals[-1])
    assert err < 1e-3, err
    assert old_step > 3.0  # the old rule's step along the unit eigenvector dwarfs the head's weights


# ----------------------------------------------------------------------------------------------
# Adam EoS with a layer that never had a gradient (issue 12, item 5)


def test_adam_eos_ratio_leaves_out_parameters_without_state():
    reference, batches = mlp_case()

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = reference
            self.unused = nn.Linear(3, 3).double()  # trainable, never in the forward

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert model.unused.weight not in opt.state
    with pytest.warns(RuntimeWarning, match="2 trainable parameters have no Adam state"):
        r = eos_ratio(model, batches, opt, tol=1e-9, max_iter=200)
    assert r.settings["params_without_state"] == 2
    # independent reference: lambda_max(P^-1/2 H P^-1/2) over the used parameters, dense
    hess = dense_hessian(reference, batches)
    d = torch.cat(
        [
            1.0 / (opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"]))).sqrt().add(1e-8).reshape(-1)
            for p in reference.parameters()
        ]
    ).sqrt()
    lam = float(torch.linalg.eigvalsh(d[:, None] * hess * d[None, :])[-1])
    np.testing.assert_allclose(r.lambda_max, lam, rtol=1e-7)
    assert r.eigenvector[-12:].abs().max() == 0  # no weight on the unused layer
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ConfigurationError, match="after the first step"):
        eos_ratio(model, batches, fresh)


# ----------------------------------------------------------------------------------------------
# cost model (docs/cost_model.md)


def test_cost_model_terms_and_validation():
    from sharpguard.sharpness import estimate_check_cost, estimate_sam_cost
    from sharpguard.sharpness.cost import (
        EXTRA_VECTORS,
        GRAPH_FACTOR,
        HVP_PASSES,
        HVP_PASSES_CACHED,
        check_passes_per_hvp,
        transformer_activation_bytes,
    )

    p, step_peak, step_s = 5_000_000, 400e6, 0.5
    c = estimate_check_cost(p, step_peak_bytes=step_peak, step_seconds=step_s, n_hvp=20, max_basis=6)
    assert c.basis_bytes == 7 * p * 4  # the basis cap + the next vector, float32
    activations = step_peak - 3 * p * 4  # gradients + Adam's two moments
    assert c.peak_bytes == pytest.approx(GRAPH_FACTOR["autograd"] * activations
                                         + (7 + EXTRA_VECTORS["autograd"]) * p * 4)
    # one probe batch, one micro-batch: the gradient graph stays cached, one double backward per product
    assert c.seconds == pytest.approx(20 * HVP_PASSES_CACHED * step_s)
    assert c.peak_over_step == pytest.approx(c.peak_bytes / step_peak)
    # two micro-batches: half the graph memory, no cached graph
    two = estimate_check_cost(p, step_peak_bytes=step_peak, step_seconds=step_s, n_hvp=20, micro_batches=2, max_basis=6)
    assert c.peak_bytes - two.peak_bytes == pytest.approx(GRAPH_FACTOR["autograd"] * activations / 2)
    assert two.seconds == pytest.approx(20 * HVP_PASSES["autograd"] * step_s)
    three = estimate_check_cost(p, step_peak_bytes=step_peak, step_seconds=step_s, n_hvp=20, probe_batches=3)
    assert three.seconds == pytest.approx(3 * 20 * HVP_PASSES["autograd"] * step_s)
    assert check_passes_per_hvp() == HVP_PASSES_CACHED
    assert check_passes_per_hvp(micro_batches=2) == check_passes_per_hvp(probe_batches=2) == HVP_PASSES["autograd"]
    # the basis in host memory (basis_device="auto" on an accelerator): one row on the device at a time
    host = estimate_check_cost(p, step_peak_bytes=step_peak, step_seconds=step_s, n_hvp=20, max_basis=6,
                               basis_on_device=False)
    assert host.basis_bytes == p * 4 and c.peak_bytes - host.peak_bytes == 6 * p * 4
    lean = estimate_check_cost(p, step_peak_bytes=step_peak, step_seconds=step_s, hvp="finite_difference")
    assert lean.peak_bytes < c.peak_bytes
    sam = estimate_sam_cost(p, step_seconds=step_s)
    assert sam.extra_bytes == p * 4 and sam.seconds == 2 * step_s
    # Korthikanti et al. 2022, eq. 1 (2-byte activations) for one layer, plus 3 logits-sized tensors
    one = transformer_activation_bytes(batch=2, seq_len=8, hidden=16, layers=1, heads=2, vocab=10, dtype_bytes=2)
    assert one == 8 * 2 * 16 * (34 + 5 * 2 * 8 / 16) + 3 * 8 * 2 * 10 * 2
    for bad in ({"hvp": "jvp"}, {"step_seconds": 0.0}, {"step_peak_bytes": float("nan")}, {"max_basis": 2},
                {"micro_batches": 0}, {"probe_batches": 1.5}):
        kw = {"step_peak_bytes": step_peak, "step_seconds": step_s, **bad}
        with pytest.raises(ConfigurationError):
            estimate_check_cost(p, **kw)


def test_products_skip_an_accelerate_style_autocast_wrapper():
    """Accelerate's mixed precision (HF ``bf16=True``) keeps the original forward as ``_original_forward``
    and puts an autocast wrapper in ``model.forward``; the measures use the float32 forward (the exact
    products of the unwrapped model) and leave the wrapper in place afterwards."""
    import types

    reference, batches = mlp_case()
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    model.load_state_dict(reference.float().state_dict())
    batches32 = [(x.float(), y) for x, y in batches]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    with HVPOperator(model, batches32) as op:
        plain = op.matvec(v)
    model._original_forward = model.forward
    wrapper = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward), model)
    model.forward = wrapper
    with torch.no_grad():
        assert model(batches32[0][0]).dtype == torch.bfloat16  # the wrapper does change the arithmetic
    with HVPOperator(model, batches32) as op:
        unwrapped = op.matvec(v)
    assert torch.equal(unwrapped, plain)
    assert model.forward is wrapper


# ----------------------------------------------------------------------------------------------
# the monitor's micro_batches="auto"


def _activation_heavy() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A model whose forward saves ~65 MiB for 2048 examples against 2.3 MiB of weights (wide, shallow:
    cheap products)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8192), nn.Tanh(), nn.Linear(8192, 10))
    return model, (torch.randn(2048, 64), torch.randint(0, 10, (2048,)))


def test_auto_micro_batches_split_only_where_the_graph_is_large():
    """A small model keeps its whole batch (and the cached graph); one whose check would pass a training
    step's memory (the live-tensor model's exact product: graph ``EXACT_GRAPH_FACTOR * f A`` for the largest
    slice's share ``f``, plus the Krylov vectors, against the saved tensors ``A`` and the gradient) is split
    until it fits, at most 8 slices and one example per slice. The choice changes nothing in the model (it
    runs one forward inside the guards)."""
    from sharpguard.monitor import SharpnessMonitor
    from sharpguard.sharpness.cost import DEFAULT_MAX_BASIS, EXACT_GRAPH_FACTOR, EXACT_PRODUCT_VECTORS, MONITOR_VECTORS
    from sharpguard.sharpness.micro import AUTO_SLACK_BYTES, auto_micro_batches, plan_products

    small, batches = mlp_case()
    assert auto_micro_batches(small, batches) == 1
    model, batch = _activation_heavy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slices = auto_micro_batches(model, [batch])
    # what the forward saves besides the weights: x and the tanh output (the next layer's input), the
    # log-softmax, the targets (measured on an eighth of the batch and scaled: the same for equal rows)
    saved = 4 * 2048 * (64 + 8192 + 10) + 8 * 2048
    grad = 4 * sum(p.numel() for p in model.parameters())
    # on the CPU the basis shares the memory: a product runs beside max_basis rows, its vector in the last of them,
    # and the plan makes room for a monitor's warm start (estimate_plan_memory's measure="monitor")
    vectors = (EXACT_PRODUCT_VECTORS + DEFAULT_MAX_BASIS - 1 + MONITOR_VECTORS) * grad

    def fits(s: int) -> bool:  # 2048 examples in s slices: the largest is ceil(2048 / s) or close to it
        largest = max(round((i + 1) * 2048 / s) - round(i * 2048 / s) for i in range(s))
        return EXACT_GRAPH_FACTOR * largest / 2048 * saved + vectors <= saved + grad + AUTO_SLACK_BYTES

    assert slices == min(s for s in range(1, 9) if fits(s)) > 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.training
    assert all(p.grad is None for p in model.parameters())
    # eight times the examples: eight times the training step's activations, room for a larger slice
    wide = (torch.randn(16384, 64), torch.randint(0, 10, (16384,)))
    assert auto_micro_batches(model, [wide]) < slices
    # 512 examples: the Krylov vectors (9 x 2.3 MiB) alone pass the step's activations, no split fits, so
    # each slice is held as small as allowed: capped at 8 slices, and at one example per slice
    assert auto_micro_batches(model, [(batch[0][:512], batch[1][:512])]) == 8
    assert auto_micro_batches(model, [(batch[0][:3], batch[1][:3])]) == 3
    # the monitor uses the choice, reports it, and says it in its console line
    mon = SharpnessMonitor(("lambda_max",), every_n_steps=1, probe=[batch],
                           measure_kwargs={"lambda_max": {"max_iter": 3}})
    assert "chosen at the first check" in mon.describe()
    _, settings = mon.measure(model, with_settings=True)
    assert settings["sharpness/lambda_max"]["micro_batches"] == slices
    # its console line quotes the live-tensor cost model on what the plan measured (docs/cost_model.md)
    plan = plan_products(model, [batch])
    assert (plan.vector_bytes, plan.gradient_bytes) == (grad, grad) and plan.saved_bytes >= saved
    bounds = [round(i * 2048 / slices) for i in range(slices + 1)]  # split_batch's slices
    assert plan.slice_fraction == max(b - a for a, b in zip(bounds, bounds[1:])) / 2048 and plan.basis_on_device
    memory = mon.check_memory()
    share = plan.slice_fraction
    # an exact product on the largest slice: its double-backward graph, the basis rows and the product's vectors
    measured = plan.saved_bytes
    by_hand = EXACT_GRAPH_FACTOR * share * measured + vectors
    assert memory is not None and memory.phase == "exact product"
    assert memory.peak_bytes == pytest.approx(by_hand, rel=1e-12)
    assert memory.over_step == pytest.approx(by_hand / (measured + grad), rel=1e-12)
    assert (f"~{memory.over_step:.2f}x a training step's above the weights and optimizer state, at its exact product "
            f"({slices} micro-batches per probe batch, autograd products") in mon.describe()
    assert SharpnessMonitor(("lambda_max",), micro_batches=8).check_memory() is None  # no plan: nothing claimed
    with pytest.raises(ConfigurationError, match="'auto' or a positive integer"):
        SharpnessMonitor(micro_batches="eight")
    # the measures take the same choice (their default), and the eigenvalue is the whole batch's
    res = hessian_eigenvalues(model, [batch], max_iter=8)
    whole = hessian_eigenvalues(model, [batch], max_iter=8, micro_batches=1)
    assert res.settings["micro_batches"] == slices and whole.settings["micro_batches"] == 1
    assert res.lambda_max == pytest.approx(whole.lambda_max, rel=1e-4)
    assert hessian_eigenvalues(small, batches, max_iter=5).settings["micro_batches"] == 1


def _auto_worker(rank: int, port: int, out_dir: str) -> None:
    from tests.helpers.distributed import process_group

    from sharpguard.sharpness import auto_micro_batches

    with process_group(rank, 2, port):
        model, batch = _activation_heavy()
        # rank 0 probes 2048 examples, rank 1 16384 (room for larger slices: fewer): the ranks must agree
        if rank == 1:
            g = torch.Generator().manual_seed(5)
            batch = (torch.randn(16384, 64, generator=g), torch.randint(0, 10, (16384,), generator=g))
        choice = auto_micro_batches(model, [batch])
        with open(f"{out_dir}/{rank}.txt", "w") as fh:
            fh.write(str(choice))


@pytest.mark.distributed
def test_auto_micro_batches_agree_across_ranks(tmp_path):
    """Sharded products run collectives per micro-batch, so every rank takes the largest choice."""
    from tests.helpers.distributed import spawn

    spawn(_auto_worker, str(tmp_path))
    from sharpguard.sharpness import auto_micro_batches

    model, batch = _activation_heavy()
    alone = auto_micro_batches(model, [batch])
    wide = (torch.randn(16384, 64), torch.randint(0, 10, (16384,)))
    assert alone > auto_micro_batches(model, [wide]) > 1
    assert [int((tmp_path / f"{r}.txt").read_text()) for r in (0, 1)] == [alone, alone]


# ----------------------------------------------------------------------------------------------
# a check at the functions' defaults never needs more memory than a training step


class _LiveBytes:
    """Exact bytes of the tensor storages allocated inside the block and still alive, and their peak
    (a dispatch mode sees every allocation; a finalizer per storage sees it freed). Measures the extra
    live memory of whatever runs inside, whatever was alive before."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._add(t.untyped_storage())
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self._mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _add(self, storage) -> None:
        import weakref

        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _hf_case(name: str):
    """Small Hugging Face models built from their configs, batches of 8 x 64 tokens over a 4000-word
    vocabulary: like language-model training, the activations (the logits above all) outweigh the weights."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    vocab = 4000
    if name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                           attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                             attn_implementation="eager"))
    else:
        model = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                           attention_probs_dropout_prob=0.0, attn_implementation="eager"))
    ids = torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_a_check_at_the_defaults_needs_no_more_memory_than_a_training_step(name):
    """Extra live memory, counted storage by storage: a training step (forward, backward, AdamW step,
    its state already there) against a lambda_max check and a trace check at the functions' defaults
    (micro_batches="auto"; max_iter cut to fill the basis and restart it once, the check's peak). The
    whole batch's check (micro_batches=1, the old default) is measured too: the count can fail. The
    micro-batched products are the whole batch's (the same operator)."""
    model, batch = _hf_case(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # AdamW's state exists from here on, as in a running job
    with _LiveBytes() as step:
        train_step()
    with _LiveBytes() as check:
        res = hessian_eigenvalues(model, batch, max_iter=6)
    with _LiveBytes() as trace:
        hessian_trace(model, batch, n_hvp=6)
    with _LiveBytes() as whole:
        hessian_eigenvalues(model, batch, max_iter=6, micro_batches=1)
    assert res.settings["micro_batches"] > 1 and res.n_restarts == 1
    assert check.peak <= step.peak, (check.peak, step.peak)
    assert trace.peak <= step.peak, (trace.peak, step.peak)
    assert whole.peak > 1.5 * step.peak, (whole.peak, step.peak)  # what the default protects against
    model.eval()
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(2))
    with HVPOperator(model, batch, micro_batches=1, check_determinism=False) as op:
        reference = op.matvec(v)
    with HVPOperator(model, batch, micro_batches="auto", check_determinism=False) as op:
        torch.testing.assert_close(op.matvec(v), reference, rtol=1e-4, atol=1e-6)


def test_the_basis_goes_to_host_memory_on_an_accelerator_and_bad_devices_are_refused_first():
    from sharpguard.sharpness.lanczos import resolve_basis_device

    assert resolve_basis_device("auto", torch.device("cuda", 0)) == torch.device("cpu")
    assert resolve_basis_device("auto", torch.device("cpu")) == torch.device("cpu")
    assert resolve_basis_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    model, batches = mlp_case()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigurationError, match="basis_device"):
        hessian_eigenvalues(model, batches, basis_device="not-a-device")
    with pytest.raises(ConfigurationError, match="basis_device"):
        hessian_trace(model, batches, basis_device=3.5)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    res = hessian_eigenvalues(model, batches, basis_device="cpu", tol=1e-10)
    assert res.settings["basis_device"] == "cpu"
    dense = torch.linalg.eigvalsh(dense_hessian(model, batches))[-1]
    assert res.lambda_max == pytest.approx(float(dense), rel=1e-7)


# ----------------------------------------------------------------------------------------------
# Hutch++'s QR of its sketch


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 200), cols=st.integers(1, 12), seed=st.integers(0, 2**16), dependent=st.booleans())
def test_the_sketchs_householder_qr_is_lapacks(rows, cols, seed, dependent):
    """Hutch++'s basis comes from an in-place Householder QR (LAPACK's orgqr through torch allocates 16
    model-size vectors of workspace with MKL); it must be LAPACK's Q: same columns, same signs, float64."""
    from sharpguard.sharpness.trace import _householder_q

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(cols, rows, dtype=torch.float64, generator=g).T  # column-major, as the sketch
    if dependent and 1 < cols <= rows:
        y[:, -1] = 2 * y[:, 0]  # rank deficient: the last column of Q is any orthonormal completion
    reference = torch.linalg.qr(y)[0]  # n x min(n, s)
    q = _householder_q(y.T.clone().T)
    assert q.shape == reference.shape
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-12)
    spanned = q.shape[1] - (1 if dependent and 1 < cols <= rows else 0)
    assert torch.allclose(q[:, :spanned], reference[:, :spanned], atol=1e-10)


def test_the_sketchs_qr_forms_its_basis_in_the_sketchs_storage():
    """Q overwrites the sketch (LAPACK's orgqr form): the sketch and its basis are never both held, at 7B the
    difference between n_hvp // 3 and 2 (n_hvp // 3) model-size vectors of host memory."""
    from benchmarks.scale import live_peak_bytes
    from sharpguard.sharpness.trace import _householder_q

    rows, cols = 50_000, 4
    y = torch.randn(cols, rows).T
    out = {}
    extra = live_peak_bytes(lambda: out.update(q=_householder_q(y)))
    assert extra < 4 * rows // 2  # not one column more than the sketch itself
    assert out["q"].untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
