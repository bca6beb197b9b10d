"""GPU check: speed against peers, the curvature and attack checks, the monitor's budget, and memory.

    bash benchmarks/gpu_check.sh                # one CUDA GPU: the tests in tests/gpu, then this script
    python benchmarks/gpu_check.py              # one CUDA GPU, under 8 minutes; writes the section
                                                # "GPU check" of benchmarks/RESULTS.md
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check.md --json /tmp/gpu_check.json
                                                # the same code paths at tiny sizes on CPU (seconds)

The correctness checks of the GPU check are tests: ``tests/gpu/test_cuda_mixed_precision.py`` runs a few
SAM steps through every adapter (plain ``sharpguard.SAM``, the Lightning callback, ``SharpGuardTrainer``,
the Accelerate helper) in fp32 twice, fp16 and bf16 (a second fp32 run must be bitwise the first, a
half-precision run must really run and stay close), and forces an fp16 overflow into each (the
GradScaler must skip the step, the weights stay bitwise unchanged), on CUDA at full size and on CPU at
tiny sizes. They use the models, sizes and context defined here.

What this script measures (each part is one "###" subsection of the output):

1. **Step time.** Under bf16 autocast, one SAM step against two plain SGD steps and against the SAM
   of pytorch_optimizer, composer (``SAMOptimizer``) and davda54/sam (its ``sam.py`` on the import
   path, or ``--davda54 PATH``) on a ResNet-18 (CIFAR layout, written here in plain torch) and a
   GPT-2-small decoder built from ``transformers.GPT2Config`` (no downloads). A peer that cannot be
   imported is recorded as "not installed".
2. **Hessian eigenvalue and PGD.** One ``sharpguard.sharpness.hessian_eigenvalues`` and one
   ``sharpguard.attacks.pgd`` call timed on each model (PGD on the decoder attacks its input
   embeddings, predicting the last token).
3. **Monitor budget.** A default ``sharpguard.monitor.SharpnessMonitor()`` (lambda_max + eos_ratio,
   adaptive schedule, 5% budget) on a bf16 training loop of the ResNet, run until its next check is due:
   its own ``monitor/overhead_pct``, its share of training time when that check is due, its first
   check's cost against its estimate, and the wall-clock extra against the same loop without it (plus
   a fixed-interval monitor for comparison).

Every row gives the peak memory of its configuration: ``torch.cuda.max_memory_allocated`` on a GPU,
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) on CPU.

``--cpu`` runs the same code at tiny sizes on CPU. A dry run writes the section "GPU check (CPU dry
run)" unless ``--out`` names another file, so it never replaces GPU numbers.

Results are written after every part (a run stopped early leaves what it finished). The exit status
is 1 when a part raised or PGD left its eps ball; "findings" (a slow step, an unconverged eigenvalue,
a monitor over budget) are listed in the verdict but do not fail the run.
Warnings sharpguard raised during the run are listed too. ``benchmarks/gpu_check.sh`` wraps this for
a bare GPU image (sharpguard from the source tree, offline wheels) with an 8-minute stop.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Deterministic cuBLAS for the exact fp32 repeats; must be set before CUDA is initialised.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
# sharpguard is the installed one (on a bare GPU image, benchmarks/gpu_check.sh puts the source tree's
# shadow package on PYTHONPATH: sharpguard.integrations lives in the top-level folder integrations/)
if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks import _results
    from benchmarks._results import machine
    from benchmarks.sam_overhead import interleaved  # the timing method of the SAM overhead benchmark
else:  # run as python benchmarks/gpu_check.py: this folder is sys.path[0]
    import _results
    from _results import machine
    from sam_overhead import interleaved  # the timing method of the SAM overhead benchmark

import sharpguard as sg  # noqa: E402

SECTION = "GPU check"
DRY_SECTION = "GPU check (CPU dry run)"
RHO, LR = 0.05, 0.1
MIB = float(1 << 20)

# Sizes. "gpu": what the check is for (ResNet-18 on CIFAR-size images, GPT-2 small); "cpu": tiny.
SIZES: dict[str, dict[str, Any]] = {
    "gpu": {
        "resnet": {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), "classes": 10, "image": 32, "batch": 128},
        # GPT2Config() defaults are GPT-2 small: 12 layers, 768 wide, 12 heads, 50257 tokens, 1024 positions
        "gpt": {"config": {}, "seq": 256, "batch": 8},
        "adapter_gpt": {"config": {}, "seq": 128, "batch": 4},  # the mixed-precision and overflow runs
        "adapter_steps": 3,
        "timing": {"rounds": 5, "repeats": 3},
        "hessian": {"batch": 4, "seq": 128, "image_batch": 64, "max_iter": 30, "tol": 1e-3},
        "pgd": {"steps": 10},
        "monitor": {"batch": 128, "max_seconds": 60.0, "max_steps": 20000, "fixed_every": 500, "fixed_probe_size": 256},
        "deadline_s": 450.0,
    },
    "cpu": {
        "resnet": {"widths": (4, 8, 8, 16), "blocks": (1, 1, 1, 1), "classes": 10, "image": 8, "batch": 8},
        "gpt": {"config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}, "seq": 16,
                "batch": 4},
        "adapter_gpt": {"config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 32},
                        "seq": 8, "batch": 4},
        "adapter_steps": 2,
        "timing": {"rounds": 2, "repeats": 2},
        "hessian": {"batch": 2, "seq": 8, "image_batch": 8, "max_iter": 20, "tol": 1e-3},
        "pgd": {"steps": 3},
        "monitor": {"batch": 64, "max_seconds": 30.0, "max_steps": 150, "fixed_every": 20, "fixed_probe_size": 64},
        "deadline_s": 240.0,
    },
}


# ============================================================================================ models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 in the CIFAR layout (3x3 stem, no max-pool; He et al. 2016), the SAM paper's CIFAR model.

    With the default widths (64, 128, 256, 512) and blocks (2, 2, 2, 2): 11.2M parameters.
    """

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def decoder_class() -> type:
    """GPT2LMHeadModel with one test hook: ``sg_poison = n`` makes the next n forwards return an inf loss
    (a forced fp16 overflow that reaches every adapter through the model itself)."""
    from transformers import GPT2LMHeadModel

    class Decoder(GPT2LMHeadModel):
        sg_poison = 0

        def forward(self, input_ids=None, labels=None, **kwargs):
            out = super().forward(input_ids=input_ids, labels=labels, **kwargs)
            if self.sg_poison > 0 and out.loss is not None:
                self.sg_poison -= 1
                out.loss = out.loss * float("inf")
            return out

    return Decoder


def gpt_config(overrides: dict[str, Any]):
    from transformers import GPT2Config

    cfg = GPT2Config(**overrides)
    # no dropout: runs that should agree must not differ by their dropout masks
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    cfg.bos_token_id = cfg.eos_token_id = cfg.vocab_size - 1
    cfg.use_cache = False
    return cfg


def build_gpt(size: dict[str, Any], device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = decoder_class()(gpt_config(size["config"]))  # built on CPU: the same weights on every device
    return model.to(device).train()


def build_resnet(size: dict[str, Any], device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ResNet(size["widths"], size["blocks"], size["classes"])
    return model.to(device).train()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt_batches(size: dict[str, Any], n: int, device: torch.device, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    vocab = gpt_config(size["config"]).vocab_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab - 1, (size["batch"], size["seq"]), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out


def image_batches(size: dict[str, Any], n: int, device: torch.device,
                  seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    s = size["image"]
    return [
        (torch.rand(size["batch"], 3, s, s, generator=g).to(device),
         torch.randint(0, size["classes"], (size["batch"],), generator=g).to(device))
        for _ in range(n)
    ]


def loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return F.cross_entropy(model(x), y)


# ======================================================================================= measurement
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vm_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class Memory:
    """Peak memory of one configuration: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else self._cpu_kind()

    @staticmethod
    def _cpu_kind() -> str:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
            if _vm_kib("VmHWM") is not None:
                return "peak RSS (VmHWM, reset per configuration)"
        except OSError:
            pass
        return "peak RSS of the process (ru_maxrss, not resettable here)"

    def start(self) -> float:
        """Reset the peak; return the memory in use now (MiB)."""
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / MIB
        if self.kind.startswith("peak RSS (VmHWM"):
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
            return (_vm_kib("VmRSS") or 0) / 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def peak(self) -> float:
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / MIB
        if self.kind.startswith("peak RSS (VmHWM"):
            return (_vm_kib("VmHWM") or 0) / 1024.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def measured(mem: Memory) -> Iterator[dict[str, float]]:
    rec: dict[str, float] = {}
    rec["resident_mib"] = mem.start()
    start = time.perf_counter()
    yield rec
    sync(mem.device)
    rec["seconds"] = time.perf_counter() - start
    rec["peak_mib"] = mem.peak()


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ============================================================================================ context
class Ctx:
    """What every part needs: mode, device, sizes, memory meter, notes, deadline."""

    def __init__(self, cpu: bool, davda54: str | None) -> None:
        self.cpu = cpu
        self.mode = "cpu" if cpu else "gpu"
        self.device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
        self.size = SIZES[self.mode]
        self.mem = Memory(self.device)
        self.notes: list[str] = []
        self.davda54 = davda54
        self.started = time.perf_counter()
        self.tmp = Path(tempfile.mkdtemp(prefix="sharpguard-gpu-check-"))

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def time_left(self) -> float:
        return self.size["deadline_s"] - (time.perf_counter() - self.started)

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)


# ========================================================================================== timing
def load_peers(ctx: Ctx) -> dict[str, Any]:
    """Each peer's SAM class, or the reason it is not there."""
    from importlib.metadata import PackageNotFoundError, version

    def dist_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    peers: dict[str, Any] = {}
    try:
        from pytorch_optimizer import SAM as PeerSAM

        peers["pytorch_optimizer"] = (PeerSAM, dist_version("pytorch_optimizer"))
    except Exception as exc:  # noqa: BLE001
        peers["pytorch_optimizer"] = f"not installed ({type(exc).__name__})"
    try:
        from composer.algorithms.sam import SAMOptimizer

        peers["composer"] = (SAMOptimizer, dist_version("mosaicml"))
    except Exception as exc:  # noqa: BLE001
        peers["composer"] = f"not installed ({type(exc).__name__})"
    # davda54/sam is not on PyPI: its users copy sam.py next to their code. Take it from --davda54
    # PATH, or from a module `sam` on the import path that has davda54's first_step/second_step.
    try:
        if ctx.davda54:
            spec = importlib.util.spec_from_file_location("davda54_sam", ctx.davda54)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module("sam")
        cls = module.SAM
        if not (hasattr(cls, "first_step") and hasattr(cls, "second_step")):
            raise ImportError("module `sam` is not davda54's")
        peers["davda54/sam"] = (cls, "sam.py")
    except Exception as exc:  # noqa: BLE001
        peers["davda54/sam"] = f"not installed ({type(exc).__name__}; pass --davda54 PATH/TO/sam.py)"
    return peers


def contestants(ctx: Ctx, template: nn.Module, batch: Any, peers: dict[str, Any]) -> dict[str, Callable[[], None]]:
    """One callable per contestant: a whole step under bf16 autocast, synchronised at the end."""
    dev = ctx.device

    def fwd_bwd(model: nn.Module) -> torch.Tensor:
        with ctx.autocast("bf16"):
            loss = loss_of(model, batch)
        loss.backward()
        return loss

    out: dict[str, Callable[[], None]] = {}
    plain_model = copy.deepcopy(template)
    plain = torch.optim.SGD(plain_model.parameters(), lr=LR, momentum=0.9)

    def plain_step() -> None:
        plain.zero_grad()
        fwd_bwd(plain_model)
        plain.step()

    out["plain step"] = lambda: (plain_step(), sync(dev))
    out["two plain steps"] = lambda: (plain_step(), plain_step(), sync(dev))

    ours_model = copy.deepcopy(template)
    ours = sg.SAM(ours_model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, model=ours_model)

    def ours_closure() -> torch.Tensor:
        ours.zero_grad()
        return fwd_bwd(ours_model)

    out["sharpguard SAM"] = lambda: (ours.step(ours_closure), sync(dev))

    for name in ("pytorch_optimizer", "davda54/sam"):
        if isinstance(peers.get(name), tuple):
            cls = peers[name][0]
            m = copy.deepcopy(template)
            o = cls(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)

            def two_step(m=m, o=o) -> None:  # the usage both document: backward, first_step, backward, second_step
                o.zero_grad()
                fwd_bwd(m)
                o.first_step(zero_grad=True)
                fwd_bwd(m)
                o.second_step(zero_grad=True)
                sync(dev)

            out[f"{name} SAM"] = two_step
    if isinstance(peers.get("composer"), tuple):
        cls = peers["composer"][0]
        m = copy.deepcopy(template)
        o = cls(torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9), rho=RHO)

        def composer_closure(m=m, o=o, **_: Any) -> torch.Tensor:  # composer passes ddp_sync=False
            o.zero_grad()
            return fwd_bwd(m).detach()

        out["composer SAM"] = lambda o=o, c=composer_closure: (o.step(c), sync(dev))
    return out


def part_timing(ctx: Ctx, results: dict[str, Any]) -> None:
    size = ctx.size
    peers = load_peers(ctx)
    results["peers"] = {k: (f"{v[0].__module__}.{v[0].__name__} {v[1]}" if isinstance(v, tuple) else v)
                        for k, v in peers.items()}
    rows = results.setdefault("step_time", [])
    for model_name, build, data in (
        ("ResNet-18", lambda: build_resnet(size["resnet"], ctx.device),
         lambda: image_batches(size["resnet"], 1, ctx.device)),
        ("GPT-2", lambda: build_gpt(size["gpt"], ctx.device), lambda: gpt_batches(size["gpt"], 1, ctx.device)),
    ):
        try:
            template = build()
            batch = data()[0]
            fns = contestants(ctx, template, batch, peers)
            t = interleaved(fns, **size["timing"])  # each fn synchronises the device at its end
            two = t["two plain steps"]
            for name, fn in fns.items():
                mem0 = ctx.mem.start()
                fn()
                peak = ctx.mem.peak()
                rows.append({"model": model_name, "params": n_params(template), "contestant": name, "ms": t[name] * 1e3,
                             "vs_two_plain": t[name] / two, "vs_sharpguard": t[name] / t["sharpguard SAM"],
                             "peak_mib": peak, "resident_mib": mem0})
            for peer, value in peers.items():
                if not isinstance(value, tuple):
                    rows.append({"model": model_name, "contestant": f"{peer} SAM", "status": value})
            del fns, template
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": model_name, "contestant": "-", "error": _error(exc)})
        free(ctx.device)


# ============================================================================== Hessian and PGD checks
class LastTokenFromEmbeddings(nn.Module):
    """The decoder as a classifier of its input embeddings: logits of the token after the last one."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=embeds).logits[:, -1, :]


def part_checks(ctx: Ctx, results: dict[str, Any]) -> None:
    from sharpguard.attacks import pgd
    from sharpguard.sharpness import hessian_eigenvalues

    size = ctx.size
    hs = size["hessian"]
    rows = results.setdefault("checks", [])
    for model_name in ("ResNet-18", "GPT-2"):
        try:
            if model_name == "ResNet-18":
                model = build_resnet(size["resnet"], ctx.device)
                probe = image_batches({**size["resnet"], "batch": hs["image_batch"]}, 1, ctx.device, seed=2)[0]
            else:
                model = build_gpt(size["gpt"], ctx.device)
                probe = gpt_batches({**size["gpt"], "batch": hs["batch"], "seq": hs["seq"]}, 1, ctx.device, seed=2)[0]
            with measured(ctx.mem) as rec:
                r = hessian_eigenvalues(model, probe, k=1, tol=hs["tol"], max_iter=hs["max_iter"])
            rows.append({"model": model_name, "check": "hessian_eigenvalues (k=1)", "value": float(r.eigenvalues[0]),
                         "value_name": "lambda_max", "residual": float(r.residuals[0]), "n_hvp": r.n_hvp,
                         "converged": bool(r.converged), "method": r.hvp_method, **rec})
            free(ctx.device)

            if model_name == "ResNet-18":
                x, y = image_batches(size["resnet"], 1, ctx.device, seed=3)[0]
                target, eps, kw = model, 8 / 255, {}
            else:
                batch = gpt_batches(size["gpt"], 1, ctx.device, seed=3)[0]
                ids = batch["input_ids"]
                with torch.no_grad():
                    x = model.get_input_embeddings()(ids[:, :-1]).detach()
                y = ids[:, -1]
                target, eps, kw = LastTokenFromEmbeddings(model), 0.01, {"bounds": None}
            steps = size["pgd"]["steps"]
            with torch.no_grad():
                target.eval()
                clean = F.cross_entropy(target(x), y).item()
            with measured(ctx.mem) as rec:
                x_adv = pgd(target, x, y, eps=eps, alpha=eps / 4, steps=steps, norm="linf", **kw)
            with torch.no_grad():
                adv = F.cross_entropy(target(x_adv), y).item()
            linf = (x_adv - x).abs().max().item()
            rows.append({"model": model_name, "check": f"pgd (linf, eps {eps:.4g}, {steps} steps)",
                         "value": adv - clean,
                         "value_name": "loss increase", "clean_loss": clean, "adv_loss": adv, "linf": linf,
                         "within_eps": linf <= eps * (1 + 1e-5) + 1e-7, **rec})
            del model, target, x, x_adv
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": model_name, "check": "-", "error": _error(exc)})
        free(ctx.device)


# ======================================================================================== monitor
def _train_loop(ctx: Ctx, monitor: Any, n_steps: int | None, *, max_seconds: float = math.inf,
                max_steps: int | None = None, stop_after_checks: int | None = None) -> dict[str, Any]:
    """A bf16 SGD loop on the ResNet (plain PyTorch); with a monitor, ``on_step_end`` after every step.

    ``n_steps``: exactly that many steps. Otherwise the loop ends at the step before the check after
    ``stop_after_checks`` checks (where the schedule says the monitor's share is back within budget),
    at ``max_steps`` or after ``max_seconds``; ``stopped`` says which.
    """
    size = {**ctx.size["resnet"], "batch": ctx.size["monitor"]["batch"]}
    model = build_resnet(size, ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = image_batches(size, 8, ctx.device, seed=4)
    first: dict[str, float] = {}
    sync(ctx.device)
    start = time.perf_counter()
    step, stopped = 0, "steps"
    while True:
        if n_steps is not None:
            if step >= n_steps:
                break
        else:
            sched = monitor.schedule
            if stop_after_checks is not None and sched.n_checks >= stop_after_checks and step + 1 >= sched.next_step:
                stopped = "next check due"
                break
            if max_steps is not None and step >= max_steps:
                stopped = "step cap"
                break
            if time.perf_counter() - start > max_seconds:
                stopped = "time cap"
                break
        batch = data[step % len(data)]
        opt.zero_grad(set_to_none=True)
        with ctx.autocast("bf16"):
            loss = F.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        step += 1
        if monitor is not None:
            step_seconds = monitor.schedule.step_seconds
            monitor.on_step_end(step, model, optimizer=opt, loss=loss.detach(), batch=batch)
            if monitor.schedule.n_checks == 1 and not first:
                step_seconds = step_seconds or monitor.schedule.step_seconds  # a check at the first timed step
                first = {"first_check_step": step, "first_check_seconds": float(monitor.schedule.last_cost),
                         "first_check_estimate": float(monitor.estimate_cost(step_seconds)) if step_seconds else None}
    sync(ctx.device)
    return {"steps": step, "seconds": time.perf_counter() - start, "stopped": stopped, **first}


def part_monitor(ctx: Ctx, results: dict[str, Any]) -> None:
    from sharpguard.monitor import SharpnessMonitor

    ms = ctx.size["monitor"]
    rows = results.setdefault("monitor", [])
    _train_loop(ctx, None, 20)  # warm-up: kernels, allocator
    fixed = {"every_n_steps": ms["fixed_every"]}
    if ms["fixed_probe_size"] != 256:  # the dry run keeps its checks short
        fixed["probe_size"] = ms["fixed_probe_size"]
    for label, make in (
        ("SharpnessMonitor() (defaults: adaptive, budget 5%)", lambda: SharpnessMonitor()),
        ("SharpnessMonitor(" + ", ".join(f"{k}={v}" for k, v in fixed.items()) + ")",
         lambda: SharpnessMonitor(**fixed)),
    ):
        row: dict[str, Any] = {"configuration": label}
        try:
            monitor = make()
            seconds = ms["max_seconds"] if ctx.cpu else max(5.0, min(ms["max_seconds"], ctx.time_left() / 4))
            mem0 = ctx.mem.start()
            stop_after = 1 if monitor.schedule.adaptive else 2
            run = _train_loop(ctx, monitor, None, max_seconds=seconds, max_steps=ms["max_steps"],
                              stop_after_checks=stop_after)
            peak = ctx.mem.peak()
            base = _train_loop(ctx, None, run["steps"])
            sched = monitor.schedule
            # the share at the next scheduled check, had the run gone on at its measured step time (the
            # adaptive schedule's promise is about that point, after the first check is paid back)
            ahead = max(0, sched.next_step - 1 - run["steps"]) * (sched.step_seconds or 0.0)
            projected = (100.0 * sched.monitor_seconds / (sched.train_seconds + ahead) if sched.train_seconds > 0
                         else 0.0)
            row.update(
                steps=run["steps"], stopped=run["stopped"], seconds=run["seconds"], baseline_seconds=base["seconds"],
                extra_pct=100.0 * (run["seconds"] - base["seconds"]) / base["seconds"],
                overhead_pct=float(sched.overhead_pct), projected_pct=projected, n_checks=sched.n_checks,
                first_check_step=run.get("first_check_step"), first_check_seconds=run.get("first_check_seconds"),
                first_check_estimate=run.get("first_check_estimate"), step_ms=1e3 * (sched.step_seconds or 0.0),
                budget_pct=100.0 * sched.budget if sched.adaptive else None, next_check_step=sched.next_step,
                peak_mib=peak, resident_mib=mem0, lambda_max=monitor.last_metrics.get("sharpness/lambda_max"),
            )
            if sched.adaptive:
                share = row["overhead_pct"] if run["stopped"] == "next check due" else projected
                row["within_budget"] = share <= row["budget_pct"] * 1.05  # 5% slack for timer noise
        except Exception as exc:  # noqa: BLE001
            row["error"] = _error(exc)
        rows.append(row)
        free(ctx.device)


# ========================================================================================= report
def _error(exc: BaseException) -> str:
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
    text = f"{type(exc).__name__}: {exc} / " + " ".join(s.strip().replace("\n", " ") for s in tail)
    return text.replace("|", "/")[:600]  # it goes into a markdown table cell


def record_warnings(results: dict[str, Any], part: str, caught: list[warnings.WarningMessage]) -> None:
    """Keep the warnings sharpguard itself raised (once each, with a count): a fallback or a skipped step
    is said in a warning (docs/design.md promise 9), and a GPU run should show which ones it met."""
    seen: dict[tuple[str, str], dict[str, Any]] = results.setdefault("_warnings", {})
    for w in caught:
        origin = f"{w.category.__module__}.{w.category.__name__}"
        path = str(w.filename)
        if not (origin.startswith("sharpguard") or "/sharpguard/" in path or "/integrations/" in path):
            continue
        text = str(w.message).splitlines()[0][:300]
        entry = seen.setdefault((part, text),
                                {"part": part, "category": w.category.__name__, "message": text, "count": 0})
        entry["count"] += 1
    results["warnings"] = list(seen.values())


def _f(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def failures(results: dict[str, Any]) -> list[str]:
    out = []
    for part in ("step_time", "checks", "monitor"):
        for row in results.get(part, []):
            if "error" in row:
                out.append(f"{part}: {row.get('model') or row.get('configuration')}: {row['error']}")
    for row in results.get("checks", []):
        if "error" not in row and row.get("within_eps") is False:
            out.append(f"checks: {row['model']}: PGD left its eps ball")
    return out


def findings(results: dict[str, Any]) -> list[str]:
    """Measurements worth a look that are not failures of a check (thresholds are rules of thumb)."""
    out = []
    for r in results.get("step_time", []):
        if r.get("contestant") == "sharpguard SAM" and r["vs_two_plain"] > 1.10:
            out.append(f"step time ({r['model']}): a SAM step costs {r['vs_two_plain']:.2f}x two plain steps "
                       "(target 1.05x)")
    for r in results.get("checks", []):
        if "error" not in r and r.get("converged") is False:
            out.append(f"{r['model']}: hessian_eigenvalues did not converge to its tolerance in {r['n_hvp']} HVPs")
    for r in results.get("monitor", []):
        if "error" not in r and r.get("within_budget") is False:
            out.append(f"monitor: {r['configuration']} used {r['projected_pct']:.1f}% of training time at its next "
                       f"check (budget {r['budget_pct']:.0f}%)")
    return out


def markdown(ctx: Ctx, results: dict[str, Any], done: list[str], pending: list[str]) -> str:
    mode = "CPU dry run at tiny sizes: the numbers only show that every path runs" if ctx.cpu else "one CUDA GPU"
    mem_kind = ctx.mem.kind
    lines = [
        f"Machine: {machine()}.",
        f"Script: `benchmarks/gpu_check.py{' --cpu' if ctx.cpu else ''}` ({mode}); "
        f"{time.perf_counter() - ctx.started:.0f} s"
        + (f"; **incomplete**: still to run: {', '.join(pending)}" if pending else "") + ".",
        f"Peak memory: {mem_kind}; \"resident\" is what was allocated when the configuration began.",
    ]
    if ctx.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in ctx.notes]
    if "step_time" in done:
        t = ctx.size["timing"]
        lines += [
            "", "### Step time: SAM against two plain steps and against peers",
            "",
            f"bf16 autocast, SGD momentum 0.9, one fixed batch; interleaved rounds as in `benchmarks/sam_overhead.py` "
            f"({t['rounds']} rounds x {t['repeats']} calls after 3 warm-up calls, min over rounds of the per-round "
            "median, each call synchronised). Peers: "
            + "; ".join(f"{k}: {v}" for k, v in results.get("peers", {}).items()) + ".",
            "",
            "| model | contestant | ms per call | vs two plain steps | vs sharpguard SAM | peak MiB | resident MiB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in results.get("step_time", []):
            if "error" in r:
                lines.append(f"| {r['model']} | **error**: {r['error']} ||||||")
            elif "status" in r:
                lines.append(f"| {r['model']} | {r['contestant']} | {r['status']} | - | - | - | - |")
            else:
                lines.append(
                    f"| {r['model']} ({r['params']:,} params) | {r['contestant']} | {r['ms']:.2f} | "
                    f"{r['vs_two_plain']:.2f}x | {r['vs_sharpguard']:.2f}x | {r['peak_mib']:.0f} | "
                    f"{r['resident_mib']:.0f} |"
                )
    if "checks" in done:
        hs = ctx.size["hessian"]
        lines += [
            "", "### Hessian eigenvalue and PGD",
            "",
            f"`hessian_eigenvalues(model, probe, k=1, tol={hs['tol']:g}, max_iter={hs['max_iter']})` in fp32 on one "
            f"probe batch ({hs['image_batch']} images / {hs['batch']}x{hs['seq']} tokens); `pgd(...)` linf with alpha "
            "= eps/4 (the decoder: on its input embeddings, predicting the last token).",
            "",
            "| model | check | result | details | seconds | peak MiB | resident MiB |",
            "|---|---|---|---|---:|---:|---:|",
        ]
        for r in results.get("checks", []):
            if "error" in r:
                lines.append(f"| {r['model']} | **error**: {r['error']} |||||")
            elif "n_hvp" in r:
                lines.append(
                    f"| {r['model']} | {r['check']} | lambda_max {r['value']:.4g} | {r['n_hvp']} HVPs ({r['method']}), "
                    f"residual {r['residual']:.2g}, converged {_f(r['converged'])} | {r['seconds']:.2f} | "
                    f"{r['peak_mib']:.0f} | {r['resident_mib']:.0f} |"
                )
            else:
                lines.append(
                    f"| {r['model']} | {r['check']} | loss {r['clean_loss']:.4g} → {r['adv_loss']:.4g} | max "
                    f"perturbation {r['linf']:.3g} (within eps {_f(r['within_eps'])}) | {r['seconds']:.2f} | "
                    f"{r['peak_mib']:.0f} | {r['resident_mib']:.0f} |"
                )
    if "monitor" in done:
        lines += [
            "", "### Monitor budget",
            "",
            f"bf16 SGD loop on the ResNet, batch {ctx.size['monitor']['batch']} (plain PyTorch, "
            "`monitor.on_step_end(step, model, optimizer=..., loss=..., batch=...)` after every step). The adaptive "
            "monitor runs until the step before its second check (where its schedule says the first check is paid "
            "back), the fixed one until the step before its third, or to a step/time cap; then the same number of "
            "steps runs without a monitor. *overhead_pct*: the monitor's own `monitor/overhead_pct` (hook and check "
            "time over training time) at the end; *at next check*: the share when the next check is due, had training "
            "gone on at the measured step time (equal to overhead_pct when the run stopped there); *within budget* "
            "judges that share. *first check*: its step, what it cost and what the monitor estimated it would cost.",
            "",
            "| configuration | steps (stopped by) | step ms | checks | first check: step, cost / estimate (s) | "
            "overhead_pct | at next check | budget | within budget | wall extra vs no monitor | peak MiB |",
            "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
        ]
        for r in results.get("monitor", []):
            if "error" in r:
                lines.append(f"| {r['configuration']} | **error**: {r['error']} ||||||||||")
                continue
            budget = f"{r['budget_pct']:.0f}%" if r.get("budget_pct") is not None else "- (fixed)"
            first = "-"
            if r.get("first_check_step") is not None:
                first = (f"{r['first_check_step']}, {r['first_check_seconds']:.3f} / "
                         f"{_f(r.get('first_check_estimate'), '{:.3f}')}")
            lines.append(
                f"| {r['configuration']} | {r['steps']} ({r['stopped']}) | {r['step_ms']:.2f} | {r['n_checks']} | "
                f"{first} | {r['overhead_pct']:.2f}% | {r['projected_pct']:.2f}% | {budget} | "
                f"{_f(r.get('within_budget'))} | {r['extra_pct']:+.1f}% | {r['peak_mib']:.0f} |"
            )
    if results.get("warnings"):
        lines += ["", "### Warnings from sharpguard", "", "| part | warning | count | message |", "|---|---|---:|---|"]
        lines += [f"| {w['part']} | {w['category']} | {w['count']} | {w['message']} |" for w in results["warnings"]]
    if not pending:
        fails = failures(results)
        lines += ["", "### Verdict", ""]
        lines += ([f"- FAILED: {f}" for f in fails] if fails
                  else ["- every part ran (no part raised, PGD stayed in its eps ball)."])
        lines += [f"- finding: {f}" for f in findings(results)]
    return "\n".join(lines)


def write(ctx: Ctx, args: argparse.Namespace, results: dict[str, Any], done: list[str], pending: list[str]) -> str:
    text = markdown(ctx, results, done, pending)
    section = args.section or (DRY_SECTION if ctx.cpu else SECTION)
    if args.out:
        saved = _results.RESULTS
        _results.RESULTS = Path(args.out)
        try:
            _results.write_section(section, text)
        finally:
            _results.RESULTS = saved
    else:
        _results.write_section(section, text)
    if args.json:
        payload = {"mode": ctx.mode, "machine": machine(), "memory": ctx.mem.kind, "notes": ctx.notes, "done": done,
                   "pending": pending, "failures": failures(results) if not pending else None,
                   "findings": findings(results) if not pending else None,
                   **{k: v for k, v in results.items() if not k.startswith("_")}}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return text


PARTS: dict[str, Callable[[Ctx, dict[str, Any]], None]] = {
    "step_time": part_timing,
    "checks": part_checks,
    "monitor": part_monitor,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny sizes on CPU (seconds)")
    parser.add_argument("--out", help="markdown file to write the section into (default: benchmarks/RESULTS.md)")
    parser.add_argument("--section", help=f"section name (default: {SECTION!r}; with --cpu {DRY_SECTION!r})")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--davda54", help="path of davda54/sam's sam.py (not on PyPI)")
    parser.add_argument("--only", nargs="+", choices=sorted(PARTS), help="run only these parts")
    args = parser.parse_args(argv)

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; `--cpu` runs the dry run at tiny sizes.", file=sys.stderr)
        return 2
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "transformers",
                 "accelerate"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    ctx = Ctx(cpu=args.cpu, davda54=args.davda54)
    results: dict[str, Any] = {}
    parts = [p for p in PARTS if not args.only or p in args.only]
    done: list[str] = []
    for i, name in enumerate(parts):
        if ctx.time_left() <= 0:
            results.setdefault(name, []).append({"model": "-", "configuration": "-", "error": "skipped: out of time"})
        else:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                PARTS[name](ctx, results)
            record_warnings(results, name, caught)
            print(f"gpu_check: {name} took {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        done.append(name)
        text = write(ctx, args, results, done, parts[i + 1:])
    print(text)
    fails = failures(results)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
