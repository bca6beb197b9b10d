"""SAM at production size, simulated: a GPT-2 124M step under FakeTensorMode (no memory, no values).

``torch._subclasses.fake_tensor.FakeTensorMode`` builds the model and runs the steps with shapes
only; ``torch.distributed._tools.mem_tracker.MemTracker`` counts every tensor storage that is alive
(parameters, gradients, optimizer state, activations, temporaries, and SAM's own buffers) and its
peak; ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of the matrix products. Single
device, and FSDP2 (``fully_shard``) over a fake process group of world 8, where every figure is
rank 0's. The same measurement on a real small GPT-2 (real tensors, MemTracker alone) anchors it.

Laws: SAM's default extra memory over the plain step, between steps and at the step's peak, is at
most the parameter bytes (the weight backup, nothing else); the opt-in clean-gradient fallback keeps
one more parameter-sized buffer; a SAM step's FLOPs are at most 2.01x the plain step's. Under FSDP2
each variant the sharded engine runs (SAM, ASAM, GSAM, LookSAM, GAM) keeps per rank its unsharded multiple
of the rank's shard bytes, at the FLOPs of the unsharded step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from sharpguard.optim import SAM, VARIANTS, SAMConfig, SAMEngine

WORLD = 8
BATCH, SEQ = 2, 128
GPT2_124M = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
GPT2_SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=SEQ)
SHARDED = ("sam", "asam", "gsam", "looksam", "gam")  # the variants SAMConfig.build(sharded=True) runs


@dataclass
class Step:
    """What one kind of step measured: rank 0's parameter bytes, live bytes between steps, peak, FLOPs."""

    param_bytes: int
    between: int
    peak: int
    flops: int


class StorageTracker(MemTracker):
    """MemTracker's count of live tensor storages (and its peak), without its per-module statistics,
    which refuse a module that runs twice in one step (SAM's second pass)."""

    def _pre_fw_hook(self, module, inputs):
        pass

    def _post_fw_hook(self, module, inputs, outputs):
        pass

    def _pre_bw_hook(self, module, args):
        pass

    def _post_bw_hook(self, module, args):
        pass


def gpt2(config: dict) -> GPT2LMHeadModel:
    cfg = GPT2Config(**config, attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    cfg.loss_type = "ForCausalLM"
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def total(snapshot: dict) -> int:
    return sum(per_device["Total"] for per_device in snapshot.values())


def local_bytes(params) -> int:
    out = 0
    for p in params:
        t = p.to_local() if hasattr(p, "to_local") else p
        out += t.numel() * t.element_size()
    return out


@contextlib.contextmanager
def fake_process_group():
    """FSDP2 without processes: the "fake" backend answers every collective at once (rank 0 of WORLD)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure(kind: str, config: dict, *, fake: bool = True, sharded: bool = False, nonfinite: str = "skip") -> Step:
    """Two steps of ``kind`` ("plain" AdamW, or a SAM variant around it); memory over both, FLOPs of the
    second.

    The first step creates AdamW's moments and SAM's backup, so the live bytes after the second are
    what stays between steps; the peak is over both.
    """
    mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))  # built before fake mode: it holds no tensor values
    tracker = StorageTracker()
    with FakeTensorMode() if fake else contextlib.nullcontext(), tracker:
        model = gpt2(config)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        ids = torch.randint(0, config["vocab_size"], (BATCH, SEQ))
        base = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def forward_backward() -> torch.Tensor:
            loss = model(ids, labels=ids).loss
            loss.backward()
            return loss

        step: Callable[[], object]
        if kind == "plain":
            def step():
                base.zero_grad()
                forward_backward()
                base.step()
        elif sharded:
            engine = SAMEngine(SAMConfig(variant=kind, nonfinite=nonfinite).build(base, sharded=True), sharded=True)

            def step():
                base.zero_grad()
                engine.record(forward_backward)
                forward_backward()
                engine.finish()
                base.step()
        else:
            cls = SAM if kind == "sam" else VARIANTS[kind]
            sam = cls.wrap(base, model=model, nonfinite=nonfinite)

            def step():
                sam.zero_grad()
                sam.step(forward_backward)

        step()
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        between = total(tracker.get_tracker_snapshot("current"))
        peak = total(tracker.get_tracker_snapshot("peak"))
        return Step(local_bytes(model.parameters()), between, peak, counter.get_total_flops())


def extra(kind: Step, plain: Step) -> tuple[float, float]:
    """(between steps, at the peak) over the plain step, as multiples of the parameter bytes."""
    assert kind.param_bytes == plain.param_bytes
    return (kind.between - plain.between) / plain.param_bytes, (kind.peak - plain.peak) / plain.param_bytes


# ------------------------------------------------------------------------------------ 124M, simulated
@pytest.fixture(scope="module")
def single_device() -> dict[str, Step]:
    return {kind: measure(kind, GPT2_124M) for kind in ("plain", *SHARDED)}


@pytest.fixture(scope="module")
def world_8() -> dict[str, Step]:
    """Rank 0 of FSDP2 over a fake process group of world 8, every variant the sharded engine runs."""
    with fake_process_group():
        return {kind: measure(kind, GPT2_124M, sharded=True) for kind in ("plain", *SHARDED)}


def test_gpt2_124m_is_what_is_simulated(single_device):
    n = single_device["plain"].param_bytes // 4
    assert 124_000_000 < n < 125_000_000  # GPT-2 small, tied embeddings, fp32


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_sam_keeps_at_most_the_parameter_bytes_more_than_the_plain_step_at_124m(single_device, variant):
    """ASAM builds T^2 g in the spent clean gradient with T in the backup: no temporary either."""
    between, peak = extra(single_device[variant], single_device["plain"])
    # the weight backup is exactly one parameter copy; a few 0-dim norms and flags are all else
    assert 0.99 < between <= 1.0 + 1e-4
    assert peak <= 1.0 + 1e-4


@pytest.mark.parametrize("variant", ["sam", "asam"])
def test_a_sam_step_costs_at_most_2_01x_the_plain_step_in_flops_at_124m(single_device, variant):
    ratio = single_device[variant].flops / single_device["plain"].flops
    assert single_device["plain"].flops > 6 * 124e6 * BATCH * SEQ  # forward + backward, at least 6 N tokens
    assert 1.99 < ratio <= 2.01


def test_sam_under_fsdp2_world_8_keeps_at_most_the_shard_bytes_more_per_rank(world_8):
    plain, sam = world_8["plain"], world_8["sam"]
    assert plain.param_bytes * WORLD >= 124_000_000 * 4  # rank 0 holds an eighth (padded) of the model
    assert plain.param_bytes * WORLD < 126_000_000 * 4
    between, peak = extra(sam, plain)
    assert 0.99 < between <= 1.0 + 1e-4
    assert peak <= 1.0 + 1e-4
    assert 1.99 < sam.flops / plain.flops <= 2.01


# multiples of the parameter bytes each variant keeps between steps (its own buffers): GSAM the weight
# backup and the clean gradient; LookSAM those and g_v; GAM the backup, g_0, g_1, g_2 and w_2 - w
OWN_BUFFERS = {"sam": 1.0, "asam": 1.0, "gsam": 2.0, "looksam": 3.0, "gam": 5.0}
#: forward/backward passes of the counted (second) step
PASSES = {"sam": 2, "asam": 2, "gsam": 2, "looksam": 1, "gam": 4}


@pytest.mark.parametrize("variant", SHARDED)
def test_under_fsdp2_world_8_each_rank_keeps_the_unsharded_multiple_of_its_shard_bytes(single_device, world_8, variant):
    """A rank's own buffers are the unsharded variant's multiple of the parameter bytes, taken of its
    shard (so the model's multiple over the world); the step's FLOPs are the unsharded step's (rank 0
    runs the whole model's matrix products on its batch). LookSAM's second step, the one counted, is a
    reuse step (k = 5): one pass; GAM's takes four gradients."""
    between, peak = extra(world_8[variant], world_8["plain"])
    single_between, single_peak = extra(single_device[variant], single_device["plain"])
    assert between == pytest.approx(OWN_BUFFERS[variant], abs=1e-4)
    assert single_between == pytest.approx(OWN_BUFFERS[variant], abs=1e-4)
    assert world_8[variant].param_bytes * WORLD < single_device[variant].param_bytes * 1.01
    assert peak <= single_peak + 1e-4
    ratio = world_8[variant].flops / world_8["plain"].flops
    assert ratio == pytest.approx(single_device[variant].flops / single_device["plain"].flops, rel=1e-9)
    assert ratio == pytest.approx(PASSES[variant], abs=0.01)


# --------------------------------------------------------------------------------- real small model
def test_on_a_real_small_gpt2_the_default_keeps_the_backup_and_the_fallback_one_more_copy():
    plain = measure("plain", GPT2_SMALL, fake=False)
    skip = measure("sam", GPT2_SMALL, fake=False)
    fallback = measure("sam", GPT2_SMALL, fake=False, nonfinite="fallback")
    between, peak = extra(skip, plain)
    assert 0.99 < between <= 1.0 + 1e-3
    assert peak <= 1.0 + 1e-3
    between, _ = extra(fallback, plain)
    assert 1.99 < between <= 2.0 + 1e-3  # the clean-gradient copy the exact fallback needs


def test_the_simulated_ratios_match_the_real_ones_on_the_same_small_model():
    real = {kind: measure(kind, GPT2_SMALL, fake=False) for kind in ("plain", "sam")}
    fake = {kind: measure(kind, GPT2_SMALL) for kind in ("plain", "sam")}
    for kind in ("plain", "sam"):
        assert fake[kind].param_bytes == real[kind].param_bytes
        assert fake[kind].flops == real[kind].flops
    assert extra(fake["sam"], fake["plain"]) == pytest.approx(extra(real["sam"], real["plain"]), abs=1e-3)


# ---------------------------------------------------------------------- every variant, fake tensors
@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if v != "flat_lora"))
def test_every_variant_steps_under_fake_tensors_without_reading_a_value(variant):
    """No host read of a tensor's value on the step path: under FakeTensorMode any read raises
    DataDependentOutputException. Two steps (LookSAM's reuse step, Momentum-SAM's momentum, bSAM's
    state) of a small GPT-2 built in fake mode; the weights stay fake tensors of their shapes."""
    from torch._subclasses.fake_tensor import FakeTensor

    with FakeTensorMode():
        model = gpt2(GPT2_SMALL)
        ids = torch.randint(0, GPT2_SMALL["vocab_size"], (BATCH, 16))
        if variant == "bsam":
            opt = VARIANTS[variant](model.parameters(), torch.optim.SGD, lr=1e-3, num_data=1000, model=model)
        else:
            opt = VARIANTS[variant](model.parameters(), torch.optim.AdamW, lr=1e-3, model=model)
        shapes = [p.shape for p in model.parameters()]

        def closure():
            loss = model(ids, labels=ids).loss
            loss.backward()
            return loss

        for _ in range(2):
            opt.zero_grad()
            loss = opt.step(closure)
    assert isinstance(loss, FakeTensor) and not loss.requires_grad
    assert all(isinstance(p, FakeTensor) for p in model.parameters())
    assert [p.shape for p in model.parameters()] == shapes


def test_flat_lora_steps_under_fake_tensors():
    """Flat-LoRA perturbs a peft LoRA model's merged weights: the same check on GPT-2 with LoRA."""
    from peft import LoraConfig, get_peft_model
    from torch._subclasses.fake_tensor import FakeTensor

    # peft's layer injection moves tensors with Module.to(), which cannot swap fake parameters: the
    # small LoRA model is built for real, then every parameter and buffer becomes a fake of itself
    model = get_peft_model(gpt2(GPT2_SMALL), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    mode = FakeTensorMode()
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = mode.from_tensor(b)
    with mode:
        ids = torch.randint(0, GPT2_SMALL["vocab_size"], (BATCH, 16))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = VARIANTS["flat_lora"](trainable, torch.optim.AdamW, lr=1e-3, model=model)

        def closure():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        for _ in range(2):
            opt.zero_grad()
            opt.step(closure)
    assert all(isinstance(p, FakeTensor) for p in model.parameters())
