"""lambda_max of an FSDP2 (``fully_shard``) model over gloo on two CPU processes (issue 13).

Each rank holds its slice of every parameter and its own probe batches; ``hessian_eigenvalues`` must
give the top eigenvalues of the exact dense Hessian of the probe loss over the union of both ranks'
batches (computed on an unsharded copy in float64), with the Krylov vectors held as slices; eos_ratio the
same for SGD and, from the sharded Adam state, the unsharded preconditioned value; Hutch++ the exact trace
when its sketch spans every direction; the spectral density's nodes the extreme eigenvalues; the
weight-perturbation measures the unsharded model's values on the union of the batches; the input-space
curvature and adversarial geometry (the model held gathered through their double backward) the unsharded
model's on the union of the examples. Measures that cannot reach sharded parameters refuse them instead of
reporting a zero curvature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.distributed import process_group, spawn


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    n = 12 if rank == 0 else 8  # unequal shares: the union's loss weights examples, not ranks
    return torch.randn(n, 5, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def dense_union_hessian() -> torch.Tensor:
    net = make_net()
    named = [(n, p) for n, p in net.named_parameters()]
    x = torch.cat([rank_batch(r)[0] for r in (0, 1)])
    y = torch.cat([rank_batch(r)[1] for r in (0, 1)])

    def loss(flat):
        chunks = torch.split(flat, [p.numel() for _, p in named])
        params = {n: c.view(p.shape) for (n, p), c in zip(named, chunks)}
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    w = torch.cat([p.detach().reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(loss, w)


N_TOTAL = 20  # both ranks' probe examples


def union_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([rank_batch(r)[0] for r in (0, 1)]), torch.cat([rank_batch(r)[1] for r in (0, 1)])


def adam_step(net: nn.Module, batch, scale: float = 1.0) -> torch.optim.Adam:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    (F.cross_entropy(net(batch[0]), batch[1]) * scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def perturbation_measures(net: nn.Module, batch) -> dict:
    """The weight-perturbation measures, each with settings a sharded model takes (Keskar's projected ascent:
    L-BFGS-B needs the whole vector on one host; the average measure's noise draws are checked apart)."""
    from sharpguard.sharpness import first_order_sharpness, keskar_sharpness, worst_case_sharpness

    return {
        "worst_case": worst_case_sharpness(net, batch, steps=3),
        "worst_case_adaptive_linf": worst_case_sharpness(net, batch, steps=3, adaptive=True, norm="linf", eta=0.01),
        "first_order": first_order_sharpness(net, batch),
        "first_order_linf": first_order_sharpness(net, batch, norm="linf", adaptive=True),
        "keskar": keskar_sharpness(net, batch, max_iter=3, solver="projected"),
    }


#: a short robust-sharpness run on unbounded inputs
ROBUST = {"eps": 0.1, "attack_steps": 3, "steps": 2, "bounds": None}
#: a short adversarial-geometry run on unbounded inputs, with the input curvature at 8 examples of each set
GEOMETRY = {"eps": 0.1, "attack_steps": 3, "bounds": None, "n_curvature": 8}


def _figures(geometry) -> dict:
    return {k: v for k, v in vars(geometry).items() if k not in ("seconds", "settings")}


def full_directions() -> list[torch.Tensor]:
    """Two filter-normalized directions of the unsharded network (biases included), as flat vectors."""
    from sharpguard.sharpness import ProbeLoss, filter_normalized_direction

    generator = torch.Generator().manual_seed(3)
    probe = ProbeLoss(make_net(), union_batch())
    return [filter_normalized_direction(probe, generator, ignore_bias_bn=False) for _ in range(2)]


def local_slice(direction: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a flat direction of the unsharded network: FSDP2 shards every parameter along
    its first dimension in ``torch.chunk`` pieces."""
    params = list(make_net().parameters())
    pieces = torch.split(direction, [p.numel() for p in params])
    return torch.cat([torch.chunk(piece.view(p.shape), world)[rank].reshape(-1) for piece, p in zip(pieces, params)])


def loss_slices(net: nn.Module, batch, directions: list[torch.Tensor]) -> dict:
    """1-D and 2-D slices along given directions, and a 1-D slice along a random direction (biases included)."""
    from sharpguard.sharpness import loss_slice_1d, loss_slice_2d

    one = loss_slice_1d(net, batch, direction=directions[0], n_points=5)
    two = loss_slice_2d(net, batch, directions=tuple(directions), n_points=3)
    drawn = loss_slice_1d(net, batch, n_points=5, ignore_bias_bn=False)
    return {"one": one.losses.tolist(), "two": two.losses.tolist(), "center": one.loss_at_center,
            "drawn": drawn.losses.tolist()}


def _worker(rank, port, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sharpguard.errors import ConfigurationError
    from sharpguard.sharpness import eos_ratio, hessian_eigenvalues, hessian_trace, relative_flatness, spectral_density

    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        net = make_net()
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        before = [p.to_local().clone() for p in net.parameters()]
        batch = rank_batch(rank)
        res = hessian_eigenvalues(net, batch, k=2, which="both", tol=1e-9, max_iter=80, return_eigenvectors=True)
        two = hessian_eigenvalues(net, batch, k=1, tol=1e-9, max_iter=80, micro_batches=2)
        refused = []
        flatness = relative_flatness(net, batch)
        out[f"flatness{rank}"] = (flatness.value, flatness.neuronwise, flatness.n_examples, flatness.method)
        try:
            relative_flatness(net, batch, method="hvp")
        except ConfigurationError as exc:
            refused.append(str(exc))
        out[f"slices{rank}"] = loss_slices(net, batch, [local_slice(d, rank, world) for d in full_directions()])
        out[f"perturbation{rank}"] = {name: (r.value, r.loss, r.settings.get("sharded"))
                                      for name, r in perturbation_measures(net, batch).items()}
        # Hutch++ with more sketch vectors than parameters: Q spans everything, the trace is exact
        trace = hessian_trace(net, batch, n_hvp=3 * 70)  # 70 sketch vectors, 66 parameters
        # stochastic Lanczos quadrature over a full Krylov space: each run's nodes span the whole spectrum
        density = spectral_density(net, batch, n_iter=66, n_v=2)
        try:
            hessian_eigenvalues(net, batch, hvp="autograd")
        except ConfigurationError as exc:
            refused.append(str(exc))
        # the default monitor: eos_ratio cannot reach sharded parameters (said once), lambda_max can
        import warnings

        from sharpguard.monitor import SharpnessMonitor

        monitor = SharpnessMonitor(every_n_steps=1, probe=[batch],
                                   measure_kwargs={"lambda_max": {"tol": 1e-9, "max_iter": 80}})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = monitor.measure(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        sgd_eos = eos_ratio(net, batch, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), tol=1e-9, max_iter=80)
        from sharpguard.sharpness import average_sharpness

        average = average_sharpness(net, batch, sigma=1e-3, n_samples=50)
        out[f"average{rank}"] = (average.value, average.stderr)
        unchanged = all(torch.equal(a, p.to_local()) and p.grad is None for a, p in zip(before, net.parameters()))
        out[rank] = {
            "eigenvalues": res.eigenvalues, "residuals": res.residuals, "converged": res.converged,
            "n_params": res.settings["n_params"], "sharded": res.settings["sharded"], "method": res.hvp_method,
            "slice": int(res.eigenvectors[0].numel()), "two": two.eigenvalues, "refused": refused,
            "trace": (trace.trace, trace.settings["sharded"], trace.settings["n_params"]),
            "density": ([t.tolist() for t in density.nodes], [float(w.sum()) for w in density.weights]),
            "unchanged": unchanged, "monitor": metrics.get("sharpness/lambda_max"),
            "monitor_said": [str(w.message) for w in caught], "sgd_eos": (sgd_eos.lambda_max, sgd_eos.ratio),
        }
        # Adam's preconditioned operator from its sharded state, after one step on the union's gradient
        # (each rank's loss weighted by its share of the examples times the world size: FSDP averages)
        from sharpguard.sharpness import directional_curvature, robust_sharpness

        # the robust loss (PGD examples at every weight the ascent visits), both ranks on rank 0's batch
        robust = robust_sharpness(net, rank_batch(0), **ROBUST)
        out[f"robust{rank}"] = (robust.value, robust.loss, robust.settings.get("sharded"))
        # input-space curvature: its second backward reads weights FSDP frees after a backward, so the call
        # holds them gathered; every rank returns the union's values and the shards are as they were after it
        from torch.distributed.tensor import DTensor

        from sharpguard.sharpness import adversarial_geometry, input_hessian_eigenvalue

        curvature = input_hessian_eigenvalue(net, batch, tol=1e-10)
        geometry = adversarial_geometry(net, rank_batch(0), **GEOMETRY)
        resharded = all(isinstance(p, DTensor) and torch.equal(a, p.to_local()) and p.grad is None
                        for a, p in zip(before, net.parameters()))
        out[f"input{rank}"] = (sorted(curvature.values), curvature.n_examples, curvature.converged,
                               curvature.settings.get("sharded"), _figures(geometry), geometry.settings.get("sharded"),
                               resharded)
        along_gradient = directional_curvature(net, batch)
        adam = adam_step(net, batch, scale=len(batch[1]) / N_TOTAL * world)
        r = eos_ratio(net, batch, adam, tol=1e-9, max_iter=80)
        out[f"adam{rank}"] = (r.lambda_max, r.ratio, r.preconditioned)
        along_update = directional_curvature(net, batch, direction="update", optimizer=adam)
        out[f"directional{rank}"] = [(c.value, c.norm, c.settings.get("sharded"))
                                     for c in (along_gradient, along_update)]


def test_lambda_max_of_an_fsdp2_model_is_the_dense_hessians_of_the_union():
    manager = torch.multiprocessing.Manager()
    out = manager.dict()
    spawn(_worker, 2, out)
    H = dense_union_hessian()
    eig = torch.linalg.eigvalsh(H)
    expected = [float(eig[-1]), float(eig[-2]), float(eig[1]), float(eig[0])]
    r0, r1 = out[0], out[1]
    assert r0["eigenvalues"] == r1["eigenvalues"]  # the same scalars on every rank
    assert r0["sharded"] and r0["method"] == "finite_difference" and r0["converged"]
    assert r0["n_params"] == H.shape[0] == 5 * 7 + 7 + 7 * 3 + 3
    assert r0["slice"] + r1["slice"] == H.shape[0] and 0 < r0["slice"] < H.shape[0]
    # finite differences of float64 gradients: ~1e-7 relative
    torch.testing.assert_close(torch.tensor(r0["eigenvalues"]), torch.tensor(expected), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.tensor(r0["two"][0]), torch.tensor(expected[0]), rtol=1e-6, atol=1e-8)
    assert r0["trace"] == r1["trace"] and r0["trace"][1] and r0["trace"][2] == H.shape[0]
    assert r0["trace"][0] == pytest.approx(float(torch.trace(H)), rel=1e-6)
    nodes, weight_sums = r0["density"]
    assert r0["density"] == r1["density"] and weight_sums == pytest.approx([1.0, 1.0], abs=1e-12)
    for run in nodes:  # the extreme Ritz values of a full Krylov space are the Hessian's extremes
        assert max(run) == pytest.approx(expected[0], rel=1e-6) and min(run) == pytest.approx(expected[-1], rel=1e-5)
    assert len(r0["refused"]) == 2
    # the input curvature of every example of both ranks, as the unsharded model's on the union (a 5-dim input:
    # Lanczos spans it); adversarial geometry with both ranks on rank 0's batch, whose attack starts are then
    # the unsharded run's: the same figures over twice the examples
    from sharpguard.sharpness import adversarial_geometry, input_hessian_eigenvalue

    curvature = input_hessian_eigenvalue(make_net(), union_batch(), tol=1e-10)
    geometry = _figures(adversarial_geometry(make_net(), rank_batch(0), **GEOMETRY))
    values, n, converged, sharded, figures, geometry_sharded, resharded = out["input0"]
    assert out["input0"] == out["input1"] and n == N_TOTAL and converged == 1.0 and sharded and geometry_sharded
    assert values == pytest.approx(sorted(curvature.values), rel=1e-9) and resharded
    assert figures.pop("n_examples") == 2 * geometry.pop("n_examples") and figures == pytest.approx(geometry, rel=1e-12)
    assert "closed form only" in r0["refused"][0]
    # relative flatness (closed form): the layer's whole weight, the Hessian blocks over the union's examples
    from sharpguard.sharpness import relative_flatness

    flat = relative_flatness(make_net(), union_batch())
    assert out["flatness0"] == out["flatness1"] and out["flatness0"][2:] == (N_TOTAL, "closed_form")
    assert out["flatness0"][:2] == pytest.approx((flat.value, flat.neuronwise), rel=1e-12)
    assert "finite_difference" in r0["refused"][1]
    assert r0["unchanged"] and r1["unchanged"]
    # the weight-perturbation measures: every rank the unsharded model's numbers on the union of the batches
    unsharded = perturbation_measures(make_net(), union_batch())
    assert out["perturbation0"] == out["perturbation1"]
    for name, (value, loss, sharded) in out["perturbation0"].items():
        assert sharded and value > 0, name
        assert value == pytest.approx(unsharded[name].value, rel=1e-9), name
        assert loss == pytest.approx(unsharded[name].loss, rel=1e-12), name
    # robust sharpness: the attack's input gradients inside FSDP's passes, the ascent on FSDP's gradients;
    # every rank holds rank 0's batch, whose random starts are then the unsharded run's
    from sharpguard.sharpness import directional_curvature, robust_sharpness

    robust = robust_sharpness(make_net(), rank_batch(0), **ROBUST)
    assert out["robust0"] == out["robust1"] and out["robust0"][2] and robust.value > 0
    assert out["robust0"][:2] == pytest.approx((robust.value, robust.loss), rel=1e-9)
    # curvature along the gradient and along Adam's next update (from its sharded state)

    reference = make_net()
    along_gradient = directional_curvature(reference, union_batch())
    along_update = directional_curvature(reference, union_batch(), direction="update",
                                         optimizer=adam_step(reference, union_batch()))
    assert out["directional0"] == out["directional1"]
    for (value, norm, sharded), want in zip(out["directional0"], (along_gradient, along_update)):
        assert sharded and value == pytest.approx(want.value, rel=1e-6) and norm == pytest.approx(want.norm, rel=1e-9)
    # loss slices along the unsharded network's directions, each rank holding its slice of them
    slices = loss_slices(make_net(), union_batch(), full_directions())
    assert out["slices0"] == out["slices1"]
    for key in ("one", "two", "center"):
        got = torch.tensor(out["slices0"][key], dtype=torch.float64)
        want = torch.tensor(slices[key], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (key, got, want)
    drawn = out["slices0"]["drawn"]  # its own random direction (a slice per rank): the same centre, moved ends
    assert drawn[2] == pytest.approx(slices["center"], rel=1e-12)
    assert all(abs(drawn[i] - drawn[2]) > 1e-3 for i in (0, 4))
    # average sharpness, each rank drawing its own slice of the noise: sigma^2 / 2 tr(H) within its error
    (average, stderr), other = out["average0"], out["average1"]
    assert other == (average, stderr) and stderr > 0
    assert abs(average - 0.5e-6 * float(torch.trace(H))) <= 4 * stderr + 1e-9
    assert r0["monitor"] == r1["monitor"] and abs(r0["monitor"] - expected[0]) <= 1e-6 * abs(expected[0])
    # SGD's edge of stability: the Hessian itself against (2 + 2 beta) / lr; the monitor measured it too
    assert r0["sgd_eos"][0] == pytest.approx(expected[0], rel=1e-6)
    assert r0["sgd_eos"][1] == pytest.approx(expected[0] / ((2 + 2 * 0.9) / 0.1), rel=1e-6)
    assert not any("skipped" in m for m in r0["monitor_said"])
    # Adam: the same preconditioned curvature as the unsharded model after the same step on the union
    from sharpguard.sharpness import eos_ratio

    net = make_net()
    adam = adam_step(net, union_batch())
    ref = eos_ratio(net, union_batch(), adam, tol=1e-9, max_iter=80)
    assert out["adam0"] == out["adam1"] and out["adam0"][2]
    assert out["adam0"][0] == pytest.approx(ref.lambda_max, rel=1e-5)
    assert out["adam0"][1] == pytest.approx(ref.ratio, rel=1e-5)
