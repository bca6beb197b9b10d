"""The sharded SAM variants (FSDP2) keep SAM's checkpoint contract and its fault counters.

SAMConfig(..., sharded=True) builds ShardedSAM / ShardedASAM / ShardedGSAM / ShardedLookSAM /
ShardedGAM. Laws checked here, on real ``fully_shard`` models over gloo (one process in-process, two
spawned where the shards must really be split):

* resuming from ``state_dict()`` (through ``torch.save`` and ``torch.load(weights_only=True)``) equals
  never stopping, bitwise, for every variant; LookSAM's kept direction ``g_v`` and the step counter
  are what make it so (a resume without them differs);
* a corrupted or mismatched state dict is refused with ConfigurationError and changes nothing;
* ``nonfinite_counts`` counts what the unsharded variant counts;
* the framework adapters save the sharded engine's state (before, they found no ``sharpguard_state_dict``
  and saved nothing), on every rank's call, since saving gathers the shards.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from sharpguard.errors import ConfigurationError
from sharpguard.optim import SAMConfig, SAMEngine

LR = 0.1
STEPS, RESUME_AT = 6, 3
# each variant with knobs that make a resume at step 3 depend on the saved state: LookSAM's k = 2 runs
# SAM at steps 0, 2, 4 and reuses g_v at 1, 3, 5; SAM's interval = 2 perturbs at even steps only
CASES = {
    "sam": {},
    "sam_interval": {"interval": 2},
    "asam": {},
    "gsam": {},
    "looksam": {"k": 2},
    "gam": {},
}


def _variant(case: str) -> str:
    return case.split("_")[0]


def _make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _shard(net: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _build(case: str, mesh, knobs: dict | None = None, nonfinite: str = "skip", sharded: bool = True):
    net = _make_net()
    if sharded:
        _shard(net, mesh)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    config = SAMConfig(variant=_variant(case), nonfinite=nonfinite, knobs=CASES[case] if knobs is None else knobs)
    sam = config.build(opt, sharded=sharded)
    return net, opt, sam, SAMEngine(sam, sharded=sharded)


def _train(net, opt, engine, steps, rank: int = 0, bad_pass: int | None = None) -> None:
    for step in steps:
        x, y = _batch(step, rank)
        calls = [0]

        def replay():
            calls[0] += 1
            loss = nn.functional.cross_entropy(net(x), y)
            (loss * float("nan") if calls[0] == bad_pass else loss).backward()

        opt.zero_grad()
        engine.record(replay)
        replay()
        engine.finish()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _weights(net: nn.Module) -> list[torch.Tensor]:
    return [_full(p) for p in net.parameters()]


def _set_weights(net: nn.Module, weights: list[torch.Tensor]) -> None:
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.to_local().copy_(distribute_tensor(w, p.device_mesh, p.placements, src_data_rank=None).to_local())


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(net, opt, sam) -> dict:
    """Everything a load could change: weights, the base optimizer's state, the variant's own state."""
    return {
        "weights": _weights(net),
        "base": copy.deepcopy(opt.state_dict()),
        "step": sam._step,
        "knobs": sam._knobs(),
        "buffers": {(id(p), k): v.clone() for p, s in sam.sam_state.items() for k, v in s.items()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["knobs"] == b["knobs"]
    assert a["buffers"].keys() == b["buffers"].keys()
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k])
    for x, y in zip(a["weights"], b["weights"]):
        assert torch.equal(x, y)
    sa, sb = a["base"]["state"], b["base"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(_full(sa[i]["momentum_buffer"]), _full(sb[i]["momentum_buffer"]))


@pytest.fixture(scope="module")
def mesh():
    """One gloo process holding every shard: parameters and gradients are real DTensors."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- resume = never stopping
@pytest.mark.parametrize("case", list(CASES))
def test_resume_from_state_dict_equals_never_stopping_bitwise(mesh, case):
    net, opt, sam, engine = _build(case, mesh)
    _train(net, opt, engine, range(STEPS))
    want = _weights(net)

    net, opt, sam, engine = _build(case, mesh)
    _train(net, opt, engine, range(RESUME_AT))
    saved = _roundtrip({"weights": _weights(net), "optimizer": sam.state_dict()})
    assert saved["optimizer"]["sharpguard"]["step"] == RESUME_AT

    net, opt, sam, engine = _build(case, mesh)
    _set_weights(net, saved["weights"])
    sam.load_state_dict(saved["optimizer"])
    assert sam._step == RESUME_AT
    _train(net, opt, engine, range(RESUME_AT, STEPS))
    got = _weights(net)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert torch.equal(g, w), case


@pytest.mark.parametrize("case", ["looksam", "sam_interval"])
def test_a_resume_without_the_variants_state_differs(mesh, case):
    """The negative control: the base optimizer's state alone (step counter reset, g_v lost) does not
    continue the run, so the bitwise equality above is the saved state's doing."""
    net, opt, sam, engine = _build(case, mesh)
    _train(net, opt, engine, range(STEPS))
    want = _weights(net)
    net, opt, sam, engine = _build(case, mesh)
    _train(net, opt, engine, range(RESUME_AT))
    weights, base = _weights(net), copy.deepcopy(opt.state_dict())
    net, opt, sam, engine = _build(case, mesh)
    _set_weights(net, weights)
    sam.load_state_dict(base)  # a plain base-optimizer state dict: counters reset, no buffers
    _train(net, opt, engine, range(RESUME_AT, STEPS))
    assert any(not torch.equal(g, w) for g, w in zip(_weights(net), want))


def test_looksam_saves_its_direction_whole_in_the_unsharded_variants_format(mesh):
    """g_v is saved whole (indexed like the base optimizer's parameters) and loads into unsharded LookSAM,
    which then holds the same direction; and the other way round."""
    from sharpguard.optim import LookSAM

    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, range(RESUME_AT))
    ours = _roundtrip(sam.sharpguard_state_dict())
    params = list(net.parameters())
    assert ours["variant"] == "looksam" and ours["knobs"]["k"] == 2 and set(ours["buffers"]) == {"gv"}
    assert sorted(ours["buffers"]["gv"]) == list(range(len(params)))
    for i, p in enumerate(params):
        kept = ours["buffers"]["gv"][i]
        assert type(kept) is torch.Tensor and kept.shape == p.shape and kept.abs().sum() > 0
        assert torch.equal(kept, sam.sam_state[p]["gv"])  # one rank: its shard is the whole

    live = sam.sharpguard_state_dict()  # not through torch.save: must not alias the buffers training changes
    kept = {i: t.clone() for i, t in live["buffers"]["gv"].items()}
    _train(net, opt, engine, range(RESUME_AT, RESUME_AT + 2))  # a reuse step, then a SAM step that rewrites g_v
    assert any(not torch.equal(sam.sam_state[p]["gv"], kept[i]) for i, p in enumerate(params))
    assert all(torch.equal(live["buffers"]["gv"][i], kept[i]) for i in kept)

    plain = _make_net()
    unsharded = LookSAM.wrap(torch.optim.SGD(plain.parameters(), lr=LR), k=2)
    unsharded.load_sharpguard_state_dict(ours)
    assert unsharded._step == RESUME_AT
    for i, p in enumerate(plain.parameters()):
        assert torch.equal(unsharded.sam_state[p]["gv"], ours["buffers"]["gv"][i])
    back = _build("looksam", mesh)[2]
    back.load_sharpguard_state_dict(_roundtrip(unsharded.sharpguard_state_dict()))
    for i, p in enumerate(back._all_params()):
        assert torch.equal(back.sam_state[p]["gv"], ours["buffers"]["gv"][i])


def test_resume_policies_for_knobs_that_differ(mesh):
    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, range(RESUME_AT))
    saved = _roundtrip(sam.state_dict())

    other = _build("looksam", mesh, knobs={"k": 3, "alpha": 0.5})[2]
    before = _snapshot(*_build("looksam", mesh, knobs={"k": 3, "alpha": 0.5})[:3])
    with pytest.raises(ConfigurationError, match=r"other ShardedLookSAM settings \(alpha: checkpoint 0.7 vs now 0.5"):
        other.load_state_dict(saved)
    assert other._step == 0 and (other.k, other.alpha) == (3, 0.5) and before["knobs"] == other._knobs()
    other.load_state_dict(saved, resume="current")
    assert other._step == RESUME_AT and (other.k, other.alpha) == (3, 0.5)
    other.load_state_dict(saved, resume="checkpoint")
    assert other._step == RESUME_AT and (other.k, other.alpha) == (2, 0.7)
    for p, q in zip(other._all_params(), sam._all_params()):
        assert torch.equal(other.sam_state[p]["gv"], sam.sam_state[q]["gv"])


# ------------------------------------------------------------------------------- corrupted: nothing changes
def _corruptions():
    """(what, how to corrupt a copy of the "sharpguard" entry) for a LookSAM over 4 parameters."""
    bad_number = st.sampled_from([-1.0, float("nan"), float("inf"), -float("inf")])
    not_an_int = st.sampled_from([-1, True, 1.5, "3", None])

    def at(path, value):
        def apply(state):
            target = state
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            return state

        return apply

    return st.one_of(
        st.text(max_size=8).filter(lambda v: v != "looksam").map(lambda v: at(["variant"], v)),
        not_an_int.map(lambda v: at(["step"], v)),
        bad_number.map(lambda v: at(["knobs", "rho"], v)),
        st.sampled_from([0, -2, 2.5, "2"]).map(lambda v: at(["knobs", "k"], v)),
        st.sampled_from([-0.1, float("nan")]).map(lambda v: at(["knobs", "alpha"], v)),
        st.text(min_size=1, max_size=8).filter(lambda v: v not in ("rho", "k", "alpha", "adaptive"))
        .map(lambda v: at(["knobs", v], 1)),
        st.integers(min_value=4, max_value=10**6).map(lambda i: at(["buffers", "gv", i], torch.zeros(3))),
        st.integers(min_value=-5, max_value=-1).map(lambda i: at(["buffers", "gv", i], torch.zeros(3))),
        st.integers(min_value=0, max_value=3).map(lambda i: at(["buffers", "gv", i], torch.zeros(2, 2, 2))),
        st.integers(min_value=0, max_value=3).map(lambda i: at(["buffers", "gv", i], [0.0])),
        st.tuples(st.integers(0, 3), bad_number.filter(lambda v: not (isinstance(v, float) and v == -1.0)))
        .map(lambda iv: _poison(iv[0], iv[1])),
        st.integers(min_value=0, max_value=3).map(_to_int),
        st.sampled_from(["ema", "w", "clean_grad"]).map(lambda name: at(["buffers", name], {})),
        st.sampled_from(["variant", "step", "knobs", "buffers"]).map(_drop),
        st.sampled_from([None, [], 3, "x"]).map(lambda v: at(["buffers"], v)),
        st.sampled_from([None, [], 3]).map(lambda v: at(["knobs"], v)),
    )


def _poison(i, value):
    def apply(state):
        state["buffers"]["gv"][i] = state["buffers"]["gv"][i].clone()
        state["buffers"]["gv"][i].view(-1)[0] = value
        return state

    return apply


def _to_int(i):
    def apply(state):
        state["buffers"]["gv"][i] = state["buffers"]["gv"][i].to(torch.int64)
        return state

    return apply


def _drop(key):
    def apply(state):
        del state[key]
        return state

    return apply


@pytest.fixture(scope="module")
def trained_looksam(mesh):
    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, range(RESUME_AT))
    return net, opt, sam, engine, _roundtrip(sam.state_dict())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(corrupt=_corruptions(), through=st.sampled_from(["load_state_dict", "load_sharpguard_state_dict"]))
def test_a_corrupted_state_dict_is_refused_and_changes_nothing(trained_looksam, corrupt, through):
    net, opt, sam, engine, valid = trained_looksam
    before = _snapshot(net, opt, sam)
    state = copy.deepcopy(valid)
    corrupt(state["sharpguard"])
    with pytest.raises(ConfigurationError):
        if through == "load_state_dict":
            sam.load_state_dict(state)
        else:
            sam.load_sharpguard_state_dict(state["sharpguard"])
    _assert_same(before, _snapshot(net, opt, sam))


def test_the_valid_state_dict_of_the_corruption_test_loads(trained_looksam):
    """The corruptions start from a state dict that does load (so a refusal is the corruption's doing)."""
    net, opt, sam, engine, valid = trained_looksam
    before = _snapshot(net, opt, sam)
    sam.load_state_dict(copy.deepcopy(valid))
    _assert_same(before, _snapshot(net, opt, sam))


def test_a_base_state_the_base_optimizer_refuses_leaves_everything_as_it_was(trained_looksam):
    net, opt, sam, engine, valid = trained_looksam
    before = _snapshot(net, opt, sam)
    state = copy.deepcopy(valid)
    state["param_groups"] = state["param_groups"] + state["param_groups"]  # more groups than the optimizer has
    with pytest.raises(ValueError):
        sam.load_state_dict(state)
    _assert_same(before, _snapshot(net, opt, sam))


# ------------------------------------------------------------------------------- fault counters
@pytest.mark.parametrize("nonfinite", ["skip", "fallback"])
@pytest.mark.parametrize(("case", "bad_pass"), [
    ("sam", 1), ("sam", 2), ("asam", 2), ("gsam", 1), ("gsam", 2), ("looksam", 2), ("gam", 2), ("gam", 4),
])
def test_nonfinite_counts_are_the_unsharded_variants(mesh, case, bad_pass, nonfinite):
    """The same step with a NaN in one pass counts, warns and updates as the unsharded variant does."""
    from sharpguard.optim.sam import SAMFallbackWarning

    runs = {}
    for sharded in (True, False):
        net, opt, sam, engine = _build(case, mesh, nonfinite=nonfinite, sharded=sharded)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            _train(net, opt, engine, [0], bad_pass=bad_pass)
            _train(net, opt, engine, [1])
            _train(net, opt, engine, [2], bad_pass=bad_pass)
        runs[sharded] = (sam.nonfinite_counts, [str(w.message) for w in said if w.category is SAMFallbackWarning],
                         _weights(net))
    (counts, said, weights), (want_counts, want_said, want_weights) = runs[True], runs[False]
    assert counts == want_counts
    assert len(said) == len(want_said) == 1 and said[0].startswith("Sharded")
    assert said[0].split(": ", 1)[1] == want_said[0].split(": ", 1)[1]
    for g, w in zip(weights, want_weights):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, equal_nan=True)
    if bad_pass == 1 and nonfinite == "fallback":
        # the clean NaN gradient goes to the base optimizer, as without SAM: every later step is faulty too
        assert counts == {"nonfinite_clean": 3, "nonfinite_perturbed": 0}
        return
    kind = "nonfinite_clean" if bad_pass == 1 else "nonfinite_perturbed"
    assert counts[kind] == 2 and sum(counts.values()) == 2
    assert all(torch.isfinite(g).all() for g in weights)


def test_looksam_counts_a_non_finite_gradient_on_a_reuse_step(mesh):
    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, [0])
    with pytest.warns(UserWarning, match="ShardedLookSAM: a step met a non-finite clean gradient"):
        _train(net, opt, engine, [1], bad_pass=1)  # step 1 of k = 2: one pass, g_v reused
    assert sam.nonfinite_counts == {"nonfinite_clean": 1, "nonfinite_perturbed": 0}


def test_sharded_sam_honours_interval_as_unsharded_sam(mesh):
    net, opt, sam, engine = _build("sam_interval", mesh)
    plain, popt, psam, pengine = _build("sam_interval", mesh, sharded=False)
    passes = []
    for step in range(4):
        passes.append(sam.needs_second_pass())
        _train(net, opt, engine, [step])
        _train(plain, popt, pengine, [step])
    assert passes == [True, False, True, False]
    for g, w in zip(_weights(net), _weights(plain)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_sharded_knobs_are_validated_by_the_unsharded_variants_rule():
    opt = torch.optim.SGD(_make_net().parameters(), lr=LR)
    from sharpguard.optim.sharded import ShardedGSAM, ShardedLookSAM, ShardedSAM

    with pytest.raises(ConfigurationError, match="rho"):
        ShardedSAM(opt, float("nan"))
    with pytest.raises(ConfigurationError, match="k"):
        ShardedLookSAM(opt, 0.05, k=0, alpha=0.7)
    with pytest.raises(ConfigurationError, match="alpha"):
        ShardedGSAM(opt, 0.05, alpha=2.0)
    assert ShardedLookSAM.knob_defaults() == {"rho": 0.05, "k": 5, "alpha": 0.7, "adaptive": False}


# ------------------------------------------------------------------------------- the frameworks' save paths
def test_hf_trainer_checkpoint_saves_the_sharded_state_and_every_rank_gathers_it(mesh, tmp_path):
    """The HF Trainer callback wrote nothing for the sharded engine (it had no sharpguard_state_dict).
    It now writes it where ``should_save``; every rank computes it, since saving gathers the shards."""
    from types import SimpleNamespace

    from sharpguard.integrations.huggingface.trainer import _SAMCheckpoint

    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, range(RESUME_AT))
    calls = []
    original = sam.sharpguard_state_dict
    sam.sharpguard_state_dict = lambda: calls.append(1) or original()
    callback = _SAMCheckpoint(SimpleNamespace(_sg_engine=engine))
    for rank, should_save in ((1, False), (0, True)):
        folder = tmp_path / f"rank{rank}" / "checkpoint-3"
        folder.mkdir(parents=True)
        args = SimpleNamespace(should_save=should_save, save_only_model=False, output_dir=str(folder.parent))
        callback.on_save(args, SimpleNamespace(global_step=3), None)
        assert (folder / _SAMCheckpoint.FILE).exists() == should_save
    assert len(calls) == 2  # the non-saving rank took part in the gather too
    saved = _SAMCheckpoint.read(str(tmp_path / "rank0" / "checkpoint-3"))
    fresh = _build("looksam", mesh)[2]
    fresh.load_sharpguard_state_dict(saved)
    assert fresh._step == RESUME_AT
    for p, q in zip(fresh._all_params(), sam._all_params()):
        assert torch.equal(fresh.sam_state[p]["gv"], sam.sam_state[q]["gv"])


def test_lightning_callback_state_round_trips_the_sharded_engine(mesh):
    """Lightning calls the callback's state_dict on every rank and writes rank 0's; it now carries the
    sharded engine's state, and load_state_dict restores it all or nothing."""
    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, range(RESUME_AT))
    callback = SharpnessAwareMinimization(variant="looksam", k=2)
    callback.engine = engine
    state = _roundtrip(callback.state_dict())
    assert state["sam"]["step"] == RESUME_AT and set(state["sam"]["buffers"]) == {"gv"}

    other = SharpnessAwareMinimization(variant="looksam", k=2)
    other.engine = _build("looksam", mesh)[3]
    broken = copy.deepcopy(state)
    broken["sam"]["buffers"]["gv"][0] = broken["sam"]["buffers"]["gv"][0] * math.nan
    with pytest.raises(ConfigurationError, match="NaN or inf"):
        other.load_state_dict(broken)
    assert other.engine.sam._step == 0 and not other.engine.sam.sam_state
    other.load_state_dict(state)
    assert other.engine.sam._step == RESUME_AT
    for p, q in zip(other.engine.sam._all_params(), sam._all_params()):
        assert torch.equal(other.engine.sam.sam_state[p]["gv"], sam.sam_state[q]["gv"])


def test_accelerate_helper_state_round_trips_the_sharded_engine(mesh):
    """Accelerate's save_state calls the registered object's state_dict on every process (and writes the
    main one's); the helper now carries the sharded engine's state and checks it before loading."""
    from sharpguard.integrations.accelerate.sam import SharpnessAwareMinimization

    net, opt, sam, engine = _build("looksam", mesh)
    _train(net, opt, engine, range(RESUME_AT))
    helper = object.__new__(SharpnessAwareMinimization)  # the engine Accelerate would build under FSDP
    helper.engine, helper.resume = engine, "error"
    state = _roundtrip(helper.state_dict())
    assert state["sam"]["variant"] == "looksam" and state["sam"]["step"] == RESUME_AT

    other = object.__new__(SharpnessAwareMinimization)
    other.engine, other.resume = _build("looksam", mesh)[3], "error"
    with pytest.raises(ConfigurationError, match="saved by variant 'gsam'"):
        other.load_state_dict({"sam": {**state["sam"], "variant": "gsam"}})
    assert other.engine.sam._step == 0
    other.load_state_dict(state)
    assert other.engine.sam._step == RESUME_AT


# ------------------------------------------------------------------------------- two ranks: real shards
def _two_rank_worker(rank: int, port: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    # imported here: this file also runs as a torchrun script (below), where `tests` is not importable
    from tests.helpers.distributed import process_group

    # the shared helper: its exit frees what holds the group and meets at a barrier before destroying it (a
    # rank tearing gloo down at interpreter exit while the other still talks can die with SIGABRT)
    with process_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        for case in CASES:
            net, opt, sam, engine = _build(case, mesh)
            _train(net, opt, engine, range(STEPS), rank=rank)
            want = _weights(net)
            net, opt, sam, engine = _build(case, mesh)
            _train(net, opt, engine, range(RESUME_AT), rank=rank)
            split = [p.to_local().shape != p.shape for p in net.parameters()]
            state = sam.state_dict()  # every rank: the buffers are gathered from the shards
            weights = _weights(net)
            if rank == 0:  # as the frameworks do: rank 0's copy is the checkpoint
                torch.save({"weights": weights, "optimizer": state}, f"{out}/{case}.pt")
            dist.barrier()
            saved = torch.load(f"{out}/{case}.pt", weights_only=True)
            net, opt, sam, engine = _build(case, mesh)
            _set_weights(net, saved["weights"])
            # rank 0's base optimizer state holds rank 0's shards; each rank loads its own base state
            own = {**state, "sharpguard": saved["optimizer"]["sharpguard"]}
            sam.load_state_dict(own)
            _train(net, opt, engine, range(RESUME_AT, STEPS), rank=rank)
            results[case] = {"equal": all(torch.equal(g, w) for g, w in zip(_weights(net), want)), "split": split,
                             "gv_shapes": [tuple(t.shape) for t in saved["optimizer"]["sharpguard"]["buffers"]
                                           .get("gv", {}).values()]}
        # parameters that are this rank's flat part with no layout (FSDP1's): g_v cannot be saved whole
        net = _make_net()
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        flat = SAMConfig(variant="looksam", knobs={"k": 2}).build(opt, sharded=True)
        _train(net, opt, SAMEngine(flat, sharded=True), range(1), rank=rank)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            own = flat.sharpguard_state_dict()
        results["flat"] = {"buffers": own["buffers"], "step": own["step"], "said": [str(w.message) for w in said]}
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.distributed
def test_two_ranks_resume_from_rank_zeros_checkpoint_equals_never_stopping(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers.distributed import free_port

    mp.spawn(_two_rank_worker, args=(free_port(), 2, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        flat = results.pop("flat")
        assert flat["buffers"] == {"gv": {}} and flat["step"] == 1
        assert len(flat["said"]) == 1 and "gv cannot be saved whole and is left out" in flat["said"][0]
        assert set(results) == set(CASES)
        for case, r in results.items():
            assert any(r["split"]), case  # the weight matrices really are split over the two ranks
            assert r["equal"], (rank, case)
        assert results["looksam"]["gv_shapes"] == [(16, 6), (16,), (3, 16), (3,)]  # saved whole


# ------------------------------------------------------------------------------- Lightning FSDP2, two ranks
def _lightning_main(out: str) -> None:
    """Run under torchrun (this file as the script): LookSAM through the Lightning callback on an FSDP2
    model (``ModelParallelStrategy``), six steps straight, and three steps, a checkpoint, and a resumed fit
    to six. Each rank saves the full weights of both runs and what the checkpoint's callback entry held."""
    import gc
    import os
    import sys

    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy

    from sharpguard.integrations.lightning import SharpnessAwareMinimization

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _make_net()

        def configure_model(self):
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(self.net, FSDPModule):
                _shard(self.net, self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

        def train_dataloader(self):
            batches = [_batch(m, self.global_rank) for m in range(RESUME_AT)]
            data = torch.utils.data.TensorDataset(torch.cat([x for x, _ in batches]),
                                                  torch.cat([y for _, y in batches]))
            return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)

    def fit(epochs: int, ckpt_path: str | None = None):
        lit, callback = Lit(), SharpnessAwareMinimization(variant="looksam", k=2)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_epochs=epochs, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        )
        trainer.fit(lit, ckpt_path=ckpt_path)
        return trainer, lit, callback

    _, lit, callback = fit(2)
    straight = _weights(lit)
    trainer, lit, callback = fit(1)
    ckpt = os.path.join(out, "epoch1.ckpt")
    trainer.save_checkpoint(ckpt)  # every rank: the callback's state_dict gathers g_v's shards
    dist.barrier()
    entry = torch.load(os.path.join(ckpt, "meta.pt"), weights_only=False)["callbacks"]
    saved = next(v for k, v in entry.items() if "SharpnessAwareMinimization" in k)
    trainer, lit, callback = fit(2, ckpt_path=ckpt)
    result = {
        "straight": straight, "resumed": _weights(lit), "saved_step": saved["sam"]["step"],
        "saved_gv_shapes": [tuple(t.shape) for t in saved["sam"]["buffers"]["gv"].values()],
        "split": [p.to_local().shape != p.shape for p in lit.parameters()], "step": callback.sam._step,
    }
    torch.save(result, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.distributed
def test_lightning_fsdp2_checkpoint_resume_of_looksam_equals_never_stopping(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(pathlib.Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert any(r["split"])  # the weight matrices really are split over the ranks
        assert r["saved_step"] == RESUME_AT and r["step"] == STEPS
        assert r["saved_gv_shapes"] == [(16, 6), (16,), (3, 16), (3,)]  # g_v saved whole, from both ranks' shards
        assert len(r["resumed"]) == len(r["straight"]) == 4
        for got, want in zip(r["resumed"], r["straight"]):
            assert torch.equal(got, want), rank


if __name__ == "__main__":
    import sys

    _lightning_main(sys.argv[1])
