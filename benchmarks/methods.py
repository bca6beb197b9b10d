"""Step time and memory of every sharpness-aware method against plain training and SAM, side by side.

Two models, each trained by every method from the same weights on the same batches:

(a) an MLP classifier (4 x 512 hidden, ~0.9 M parameters, batch 256) with SGD(momentum): plain,
    SAM, and every variant by name (WSAM, m-RWP, m-ARWP, ESAM, Flat-LoRA in its full-weight form,
    Momentum-SAM, LookSAM, GAM, bSAM on a plain SGD) plus ESAM's data selection on SAM and the MESA
    and SAF loss terms;
(b) a GPT-2 built from a config (2 layers, width 256, sequences of 64) with peft LoRA (r = 8) and
    AdamW over the adapters: plain LoRA, SAM on the adapters, Flat-LoRA.

Per method: forward/backward passes per step (counted with a forward hook), seconds per step (per
round the median of a few steps, over interleaved rounds the minimum: the quietest round on a shared
machine), the extra state the method keeps between steps (the exact bytes of its buffers: SAM's
weight backup and scratch, a variant's persistent state, MESA's teacher), and the peak resident
bytes of tensors allocated and alive at once within one step (activations, gradients, temporaries;
tracked per storage by a dispatch mode, so it is exact on any device); "peak memory vs plain" adds the
two and subtracts plain training's. Run: ``python benchmarks/methods.py`` (a few minutes on one thread); it rewrites the
"Methods" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, write_section
else:  # run as python benchmarks/methods.py: this folder is sys.path[0]
    from _results import machine, write_section

from sharpguard.optim import MESA, SAF, SAM, SharpnessDataSelection, lora_parameters, make_sam  # noqa: E402

MIB = 2**20


class PeakAllocated(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated (and still alive) since entering the mode.

    Every op's outputs are recorded by storage (a weak reference: freed storages are subtracted), so
    the peak covers activations, gradients and every temporary of the step, forward and backward,
    on any device; what existed before (weights, optimizer and method state) is not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key, (ref, n) in list(self.refs.items()):
            if ref.expired():
                self.live -= n
                del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.refs:
                    self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def _state_bytes(method: object) -> int:
    """Bytes of the tensors a method keeps between steps (beyond the model and the base optimizer)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    if isinstance(method, SAM):
        for _, _, buffers in method._scratch.values():
            for t in buffers:
                add(t)
        for state in method.sam_state.values():
            for t in state.values():
                add(t)
    if isinstance(method, MESA):
        for t in [*method.teacher.parameters(), *method.teacher.buffers()]:
            add(t)
    if isinstance(method, SAF):
        for t in (method.memory, method.stamps):
            if t is not None:
                add(t)
    return total


class Contestant:
    """One method on its own copy of the model: ``step()`` runs one optimizer step on the next batch."""

    def __init__(self, name: str, model: nn.Module, make: Callable[[nn.Module], tuple[object, Callable]],
                 batches: list, loss_fn: Callable) -> None:
        self.name, self.model, self.batches, self.loss_fn = name, model, batches, loss_fn
        self.method, self._step = make(model)
        self.i = 0
        self.forwards = 0
        # count the model's own forwards (MESA's teacher is a deep copy and carries a copy of this hook)
        model.register_forward_hook(lambda module, *_: setattr(self, "forwards", self.forwards + (module is model)))

    def step(self) -> None:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        self._step(batch)


def sam_step(opt, model, loss_fn):
    def run(batch):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss

        opt.step(closure)

    return run


def plain_step(opt, model, loss_fn):
    def run(batch):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    return run


def measure(contestants: list[Contestant], rounds: int, repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for c in contestants:
        for _ in range(warmup):
            c.step()
        c.forwards, c.i = 0, 0
    samples: dict[str, list[float]] = {c.name: [] for c in contestants}
    steps: dict[str, int] = {c.name: 0 for c in contestants}
    for r in range(rounds):
        # interleaved, in a rotating order: every method sees the same machine noise
        for c in contestants[r % len(contestants):] + contestants[: r % len(contestants)]:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                c.step()
                times.append(time.perf_counter() - start)
            steps[c.name] += repeats
            samples[c.name].append(statistics.median(times))
    for c in contestants:
        passes = c.forwards / steps[c.name]
        with PeakAllocated() as mem:
            c.step()
        out[c.name] = {
            "seconds": min(samples[c.name]),
            "passes": passes,
            "state_mib": _state_bytes(c.method) / MIB,
            "step_peak_mib": mem.peak / MIB,
        }
    return out


def table(results: dict[str, dict[str, float]], params_mib: float, plain: str, sam: str) -> str:
    lines = [
        "| method | passes / step | time / step | vs plain | vs SAM | extra state (MiB) | extra state / params | "
        "peak within a step (MiB) | peak memory vs plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = {name: r["state_mib"] + r["step_peak_mib"] for name, r in results.items()}
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['passes']:.2f} | {r['seconds'] * 1e3:.1f} ms | "
            f"{r['seconds'] / results[plain]['seconds']:.2f}x | {r['seconds'] / results[sam]['seconds']:.2f}x | "
            f"{r['state_mib']:.2f} | {r['state_mib'] / params_mib:.2f}x | {r['step_peak_mib']:.1f} | "
            f"{total[name] - total[plain]:+.1f} MiB |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
def mlp_contestants(quick: bool) -> tuple[list[Contestant], float]:
    torch.manual_seed(0)
    width = 128 if quick else 512
    base = nn.Sequential(nn.Linear(256, width), nn.ReLU(),
                         *[m for _ in range(3) for m in (nn.Linear(width, width), nn.ReLU())],
                         nn.Linear(width, 10))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(256, 256, generator=g), torch.randint(0, 10, (256,), generator=g)) for _ in range(4)]

    def loss_fn(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    def variant(name):
        def make(model):
            opt = make_sam(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), name, model=model)
            return opt, sam_step(opt, model, loss_fn)

        return make

    def plain(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return opt, plain_step(opt, model, loss_fn)

    def mesa(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        term = MESA(model, opt)

        def run(batch):
            opt.zero_grad()
            out = model(batch[0])
            (nn.functional.cross_entropy(out, batch[1]) + term(out, batch[0])).backward()
            opt.step()

        return term, run

    def bsam(model):
        # bSAM is its own Adam-like update: a plain SGD carries its learning rate (docs/optim.md)
        opt = make_sam(torch.optim.SGD(model.parameters(), lr=0.05), "bsam", model=model, num_data=50_000)
        return opt, sam_step(opt, model, loss_fn)

    def sds(model):
        opt = make_sam(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), "sam", model=model)
        select = SharpnessDataSelection(gamma=0.5)

        def run(batch):
            def closure():
                opt.zero_grad()
                loss = select(nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none"))
                loss.backward()
                return loss

            opt.step(closure)

        return opt, run

    def saf(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        # an "epoch" of the 4 batches; the term is on from epoch 1 (outputs of 1 epoch ago)
        term = SAF(4 * 256, epochs_ago=1, start_epoch=1)
        count = [0]

        def run(batch):
            k = count[0]
            count[0] += 1
            indices = torch.arange(256) + 256 * (k % 4)
            opt.zero_grad()
            out = model(batch[0])
            (nn.functional.cross_entropy(out, batch[1]) + term(out, indices, k // 4)).backward()
            opt.step()

        return term, run

    makers: dict[str, Callable] = {"plain SGD": plain, "SAM": variant("sam")}
    for name in ("wsam", "rwp", "arwp", "esam", "flat_lora", "momentum_sam", "looksam", "gam"):
        makers[name] = variant(name)
    makers["bsam"] = bsam
    makers["SAM + SDS (ESAM data selection, gamma 0.5)"] = sds
    makers["MESA (loss term; + 1 teacher forward)"] = mesa
    makers["SAF (loss term; outputs of 1 epoch ago)"] = saf
    contestants = [Contestant(name, copy.deepcopy(base), make, batches, loss_fn) for name, make in makers.items()]
    params_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / MIB
    return contestants, params_mib


def lora_contestants(quick: bool) -> tuple[list[Contestant], float]:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    width = 64 if quick else 256
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=width, n_layer=2, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    base = get_peft_model(GPT2LMHeadModel(config), lora)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (8, 64), generator=g) for _ in range(4)]

    def loss_fn(model, ids):
        return model(input_ids=ids, labels=ids).loss

    def plain(model):
        opt = torch.optim.AdamW(lora_parameters(model), lr=1e-3)
        return opt, plain_step(opt, model, loss_fn)

    def variant(name):
        def make(model):
            opt = make_sam(torch.optim.AdamW(lora_parameters(model), lr=1e-3), name, model=model)
            return opt, sam_step(opt, model, loss_fn)

        return make

    makers = {"plain LoRA (AdamW)": plain, "SAM on the adapters": variant("sam"), "Flat-LoRA": variant("flat_lora")}
    contestants = [Contestant(name, copy.deepcopy(base), make, batches, loss_fn) for name, make in makers.items()]
    params_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / MIB
    return contestants, params_mib


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few rounds (smoke test; no RESULTS.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds, repeats = (2, 2) if args.quick else (9, 3)

    mlp, mlp_mib = mlp_contestants(args.quick)
    mlp_results = measure(mlp, rounds, repeats)
    lora, lora_mib = lora_contestants(args.quick)
    lora_results = measure(lora, rounds, repeats)

    text = "\n".join([
        f"Machine: {machine()}. Written by `python benchmarks/methods.py`; one intra-op thread, per round the median "
        f"of {repeats} steps, over {rounds} interleaved rounds the minimum. 'extra state' = the exact bytes a method "
        "keeps between steps beyond the model and its base optimizer; 'peak within a step' = the most bytes of tensors "
        "allocated and alive at once during one step (activations, gradients, temporaries), tracked per storage; "
        "'peak memory vs plain' = extra state + peak within a step, minus plain training's. The time columns come "
        "from a 2-core CPU shared with other jobs: between runs the ratios moved by up to 2x for the one-pass "
        "methods, so only 'passes / step' and the memory columns are reproducible here (exact); rerun on a quiet "
        "machine or a GPU for times.",
        "",
        f"### (a) MLP classifier, {mlp_mib:.2f} MiB of parameters, SGD(momentum), batch 256",
        "",
        table(mlp_results, mlp_mib, "plain SGD", "SAM"),
        "",
        f"### (b) GPT-2 from a config with peft LoRA (r = 8 on c_attn, c_proj), {lora_mib:.2f} MiB of parameters, "
        "AdamW on the adapters, batch 8 x 64 tokens",
        "",
        table(lora_results, lora_mib, "plain LoRA (AdamW)", "SAM on the adapters"),
    ])
    print(text)
    if not args.quick:
        write_section("Methods", text)
    return text


if __name__ == "__main__":
    main()
