"""The robustness monitor, the attacks and the perturbation measures on fake tensors (``FakeTensorMode``):
a cost-only run performs the forwards, backwards and tensor work of a real one, reads no value back and
says so (NaN values, ``cost_only`` in the settings). The FLOPs it counts are those of the same call on
real tensors of the same model (``FlopCounterMode``), which is what benchmarks/simulate.py reports."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode, is_fake
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig, ViTForImageClassification
from transformers.initialization import no_init_weights

from sharpguard.attacks import input_grad_norm, make_generator, pgd, robust_accuracy
from sharpguard.errors import ConfigurationError
from sharpguard.monitor import RobustnessMonitor
from sharpguard.sharpness import (
    adversarial_geometry,
    average_sharpness,
    keskar_sharpness,
    first_order_sharpness,
    input_hessian_eigenvalue,
    loss_slice_1d,
    loss_slice_2d,
    relative_flatness,
    robust_sharpness,
    worst_case_sharpness,
)

CLASSES, SIDE = 10, 16


class Logits(nn.Module):
    """A ViT image classifier returning its logits: ``(images, labels)`` batches, as the monitor takes."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.inner = ViTForImageClassification(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=pixel_values).logits


def _config(**kw) -> ViTConfig:
    # eager attention: the input-space measures differentiate twice, which SDPA's CPU kernel does not
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=SIDE,
                 patch_size=8, num_labels=CLASSES, attn_implementation="eager", hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
    return ViTConfig(**{**small, **kw})


def _fake_vit(**kw) -> Logits:
    """Built inside the fake mode; torch's truncated-normal init reads values, so the init is skipped
    (a fake weight has no value to initialise)."""
    with no_init_weights():
        return Logits(_config(**kw))


def _batches(n: int = 2, rows: int = 4, side: int = SIDE,
             classes: int = CLASSES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(rows, 3, side, side, generator=gen), torch.randint(0, classes, (rows,), generator=gen))
            for _ in range(n)]


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _real_and_fake():
    """A real ViT and its fake copy, with the same probe as real and as fake tensors."""
    torch.manual_seed(0)
    real = Logits(_config()).eval()
    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake = copy.deepcopy(real)
    batches = _batches()
    fake_batches = [tuple(mode.from_tensor(t) for t in b) for b in batches]
    return real, batches, fake, fake_batches, mode


def test_the_default_robustness_check_is_a_cost_only_run_on_a_fake_vit():
    with FakeTensorMode():
        model = _fake_vit()
        probe = _batches()
        assert all(is_fake(p) for p in model.parameters()) and is_fake(probe[0][0])
        metrics, settings = RobustnessMonitor(probe=probe, alerts=None).measure(model, with_settings=True)
    assert set(metrics) >= {"robustness/clean_acc", "robustness/pgd_acc"}
    assert math.isnan(metrics["robustness/clean_acc"]) and math.isnan(metrics["robustness/pgd_acc"])
    assert settings["robustness/clean_acc"]["cost_only"] and settings["robustness/pgd_acc"]["cost_only"]
    assert settings["robustness/pgd_acc"]["steps"] == 10  # the default attack, not a shortened one


def test_every_robustness_measure_runs_on_fake_tensors():
    with FakeTensorMode():
        model = _fake_vit()
        probe = _batches(1, rows=2)  # the input-space Lanczos runs all 30 products per example
        mon = RobustnessMonitor(RobustnessMonitor.MEASURES, probe=probe, alerts=None, steps=2, restarts=2)
        metrics, settings = mon.measure(model, with_settings=True)
    for name in RobustnessMonitor.MEASURES:
        key = f"robustness/{name}"
        assert math.isnan(metrics[key]), key  # adv_confidence too: NaN, not "nothing fooled"
        assert settings[key]["cost_only"], key


def test_a_real_check_reads_its_values_and_is_not_flagged():
    torch.manual_seed(0)
    model = Logits(_config())
    metrics, settings = RobustnessMonitor(probe=_batches(), alerts=None, steps=2).measure(model, with_settings=True)
    for key in ("robustness/clean_acc", "robustness/pgd_acc"):
        assert 0.0 <= metrics[key] <= 1.0 and "cost_only" not in settings[key]
        # an accuracy over 8 examples is a multiple of 1/8
        assert metrics[key] * 8 == pytest.approx(round(metrics[key] * 8))


def test_the_fake_check_counts_the_flops_of_the_real_check():
    real, batches, fake, fake_batches, mode = _real_and_fake()
    kwargs = {"alerts": None, "steps": 3}
    with mode:
        fake_flops = _flops(lambda: RobustnessMonitor(probe=fake_batches, **kwargs).measure(fake))
    real_flops = _flops(lambda: RobustnessMonitor(probe=batches, **kwargs).measure(real))
    assert fake_flops == real_flops > 0, (fake_flops, real_flops)
    # clean accuracy: one forward per batch; PGD-3: three forward+backward passes and the final forward
    forward = _flops(lambda: [real(x) for x, _ in batches])
    assert 5 * forward < real_flops < 5 * forward + 3 * 2 * forward + 1


@pytest.mark.parametrize("name",
                         ["worst_case", "worst_case_per_batch_linf", "first_order", "average", "keskar_projected",
                                  "slice_1d", "slice_2d"])
def test_a_perturbation_measure_on_fake_tensors_counts_the_real_flops(name):
    calls = {
        "worst_case": lambda m, b: worst_case_sharpness(m, b, steps=3),
        "worst_case_per_batch_linf": lambda m, b: worst_case_sharpness(m, b, steps=2, per_batch=True, norm="linf",
                                                                       adaptive=True),
        "first_order": lambda m, b: first_order_sharpness(m, b),
        "average": lambda m, b: average_sharpness(m, b, n_samples=2),
        "keskar_projected": lambda m, b: keskar_sharpness(m, b, solver="projected", max_iter=2),
        "slice_1d": lambda m, b: loss_slice_1d(m, b, n_points=3),
        "slice_2d": lambda m, b: loss_slice_2d(m, b, n_points=2),
    }
    real, batches, fake, fake_batches, mode = _real_and_fake()
    with mode:
        holder = {}
        fake_flops = _flops(lambda: holder.setdefault("r", calls[name](fake, fake_batches)))
    res = holder["r"]
    real_res = calls[name](real, batches)
    real_flops = _flops(lambda: calls[name](real, batches))
    assert fake_flops == real_flops > 0, (fake_flops, real_flops)
    assert res.settings["cost_only"] and "cost_only" not in real_res.settings
    if hasattr(res, "value"):
        assert math.isnan(res.value) and math.isfinite(real_res.value)
        assert (res.n_forward, res.n_backward) == (real_res.n_forward, real_res.n_backward)
    else:
        assert torch.isnan(torch.as_tensor(res.losses)).all() and math.isnan(res.loss_at_center)
        assert torch.isfinite(torch.as_tensor(real_res.losses)).all()


def test_relative_flatness_on_fake_tensors_takes_the_path_a_real_run_takes():
    real, batches, fake, fake_batches, mode = _real_and_fake()
    with mode:
        closed = relative_flatness(fake, fake_batches)
        narrow = _fake_vit(hidden_size=8, intermediate_size=16, num_labels=3)
        exact = relative_flatness(narrow, _batches(1, rows=2, classes=3), method="hvp")
    real_closed = relative_flatness(real, batches)
    assert closed.method == real_closed.method == "closed_form" and closed.n_hvp == 0
    assert math.isnan(closed.value) and math.isnan(closed.neuronwise) and closed.settings["cost_only"]
    assert len(closed.block_traces) == CLASSES and math.isfinite(real_closed.value)
    # one product per weight of the classifier (3 x 8), none skipped for want of a value, and the determinism
    # check's second product
    assert exact.method == "hvp" and exact.n_hvp == 3 * 8 + 1 and math.isnan(exact.value)


def test_input_space_measures_run_a_fixed_number_of_products_on_fake_tensors():
    with FakeTensorMode():
        model = _fake_vit()
        probe = _batches(1)
        curv = input_hessian_eigenvalue(model, probe, n_examples=3, max_iter=4)
        geo = adversarial_geometry(model, probe, eps=8 / 255, attack_steps=2, n_curvature=2)
        rs = robust_sharpness(model, probe, eps=8 / 255, attack_steps=2, steps=2)
        grad_norm = input_grad_norm(model, probe)
    # nothing converges when nothing is read: every example takes all max_iter products
    assert curv.n_hvp == 3 * 4 and curv.converged == 0.0 and curv.settings["cost_only"]
    assert math.isnan(curv.mean) and math.isnan(curv.max) and all(math.isnan(v) for v in curv.values)
    assert math.isnan(geo.adv_curvature) and math.isnan(geo.adv_confidence_fooled) and geo.settings["cost_only"]
    assert geo.n_examples == 4
    # two ascent gradients and the last forward on the robust loss (each after its own PGD run)
    assert math.isnan(rs.value) and rs.settings["cost_only"] and (rs.n_forward, rs.n_backward) == (3, 2)
    assert math.isnan(grad_norm)


def test_attacks_on_fake_tensors_read_nothing_and_keep_their_shapes():
    with FakeTensorMode():
        model = _fake_vit()
        x, y = _batches(1)[0]
        adv = pgd(model, x, y, steps=2, restarts=2)
        assert is_fake(adv) and adv.shape == x.shape
        assert math.isnan(robust_accuracy(model, [(x, y)]))
        # bad input is still refused with its sentence: the shape checks need no value
        with pytest.raises(ConfigurationError, match="labels"):
            robust_accuracy(model, [(x, y[:, None])])


def test_the_seeded_generator_is_the_same_inside_the_fake_mode():
    """``make_generator(seed=None)`` derives its seed from the host RNG state, which a fake mode leaves real."""
    torch.manual_seed(123)
    outside = make_generator("cpu").initial_seed()
    with FakeTensorMode():
        inside = make_generator("cpu").initial_seed()
    assert inside == outside
    torch.manual_seed(124)
    assert make_generator("cpu").initial_seed() != outside


def test_the_default_check_runs_on_a_fake_vit_base():
    """ViT-Base/16 (86M parameters, 224 x 224, 1000 classes) as benchmarks/simulate.py builds it: the
    default check (clean accuracy and PGD-10) on fake tensors allocates nothing and takes seconds."""
    with FakeTensorMode():
        with no_init_weights():
            model = Logits(ViTConfig(num_labels=1000, attn_implementation="sdpa"))
        assert 85e6 < sum(p.numel() for p in model.parameters()) < 87e6
        probe = [(torch.rand(8, 3, 224, 224), torch.randint(0, 1000, (8,)))]
        metrics, settings = RobustnessMonitor(probe=probe, alerts=None).measure(model, with_settings=True)
    assert math.isnan(metrics["robustness/pgd_acc"]) and settings["robustness/pgd_acc"]["cost_only"]


def test_keskar_sharpness_refuses_the_host_solver_on_fake_tensors():
    with FakeTensorMode():
        model = _fake_vit()
        with pytest.raises(ConfigurationError, match="solver='projected'"):
            keskar_sharpness(model, _batches(1), solver="lbfgsb")


def test_the_simulated_profile_of_the_default_check_has_memory_and_flops():
    """``sharpguard.simulate.profile_step`` (MemTracker and FlopCounterMode, whose module hooks must not
    meet a leaf input under ``autograd.grad``) profiles the default check on a fake ViT."""
    from sharpguard.simulate import fake_tensors, profile_step

    with fake_tensors():
        model = _fake_vit()
        probe = _batches(1)
        prof = profile_step(lambda: RobustnessMonitor(probe=probe, alerts=None).measure(model), model=model,
                            inputs=probe)
        forward = _flops(lambda: model(probe[0][0]))
    # one clean forward, PGD-10's forward+backward passes and its final forward: at least 12 forwards
    assert prof.flops >= 12 * forward > 0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert prof.memory.peak_by_category["parameters"] == params
    assert prof.memory.peak_bytes > prof.memory.start_bytes


def test_the_robustness_monitor_runs_on_fsdp2_over_a_fake_world_of_8_and_leaves_it_as_sharded_as_it_was():
    """Every robustness measure on a ViT under ``fully_shard`` (each block and the root) over a fake process
    group of 8: a cost-only run, and the parameters are this rank's shards again afterwards; the input
    curvature ones hold the whole model gathered through their double backward (on a real one the second backward
    would read freed weights), which FSDP2's tracker counts as unsharded parameters. The attacks'
    forwards gather the root's parameters and no backward through the weights reshards them (FSDP2's root keeps
    them after its forward), so the monitor's guard does; a root the caller had gathered stays gathered."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sharpguard.simulate import fake_process_group, fake_tensors, profile_step

    with fake_process_group(8) as mesh, fake_tensors():
        model = _fake_vit()
        for layer in model.inner.vit.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        monitors = [RobustnessMonitor(probe=_batches(), alerts=None),
                    RobustnessMonitor(RobustnessMonitor.MEASURES, probe=_batches(1, rows=2), alerts=None, steps=2,
                                      restarts=2)]
        for monitor in monitors:
            metrics, settings = monitor.measure(model, with_settings=True)
            assert all(math.isnan(v) and settings[k]["cost_only"] for k, v in metrics.items()), metrics
            assert all(isinstance(p, DTensor) for p in model.parameters())
        assert {"robustness/input_curvature", "robustness/adv_input_curvature"} <= set(metrics)
        # the input curvature's cost: every block's weights gathered at once, the whole model on this rank
        prof = profile_step(lambda: input_hessian_eigenvalue(model, _batches(1, rows=2), max_iter=2), model=model)
        # (DTensors: the global sizes; FSDP2 pads each parameter's rows to a multiple of the world size)
        whole = sum(-(-p.shape[0] // 8) * 8 * p[0].numel() * p.element_size() if p.dim() else p.element_size()
                    for p in model.parameters())
        assert prof.memory.peak_by_category["unsharded_parameters"] == whole
        assert all(isinstance(p, DTensor) for p in model.parameters())
        # relative flatness's closed form: the classifier's whole weight, the blocks summed over the ranks
        flat = relative_flatness(model, _batches(1, rows=2))
        assert math.isnan(flat.value) and flat.settings["cost_only"] and flat.n_examples == 8 * 2
        # robust-loss sharpness: the attacks' input gradients inside FSDP's own gradient passes
        robust = robust_sharpness(model, _batches(1, rows=2), eps=0.01, steps=1, attack_steps=1)
        assert math.isnan(robust.value) and robust.settings["cost_only"] and robust.settings["sharded"]
        model.unshard()
        gathered = dict(model.named_parameters())
        assert not all(isinstance(p, DTensor) for p in gathered.values())
        monitors[0].measure(model)
        assert all(gathered[name] is p for name, p in model.named_parameters())
