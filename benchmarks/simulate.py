"""Production scale, simulated: SAM, curvature checks and monitors at 86M-7B parameters (issue 21).

Every model is built from its ``transformers`` config under ``FakeTensorMode`` (no storage is
allocated) and every row is one call measured by :func:`sharpguard.simulate.profile_step`: peak live
tensor bytes by category (``MemTracker``; ``FSDPMemTracker`` per rank under FSDP2) and FLOPs
(``FlopCounterMode``), single device and FSDP2 over a fake process group of 8 ranks (each transformer
block and the root ``fully_shard``-ed, every rank with its own batch of the size below).

Models (float32 weights, activations and AdamW state, no activation checkpointing, HF's default
``sdpa`` attention, which on CPU tensors is the math/flash-for-CPU kernel the simulation traces):

* ``gpt2-124m``: ``GPT2Config()`` (d 768, 12 layers, vocab 50257), 8 x 1024 tokens;
* ``llama-1b``: a TinyLlama-1.1B shape (d 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000),
  4 x 2048 tokens;
* ``llama-7b``: a Llama-2-7B shape (d 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), 1 x 4096
  tokens per device (per rank);
* ``vit-86m``: ``ViTConfig()`` (ViT-Base/16, 224 x 224, 1000 classes), 64 images.

Rows, each against the plain step of the same model and mode:

* ``train``: forward + backward + ``AdamW.step()`` + ``zero_grad(set_to_none=True)``, after one warm-up
  step (the optimizer's state exists, as in a running job); ``fwd_bwd``: forward + backward only;
* ``sam:<Variant>``: one ``sg.<Variant>(params, AdamW).step(closure)`` after a warm-up step;
* ``hvp_exact``: one exact product (``HVPOperator(hvp="autograd", cache_graph=False)``);
  ``hvp_cached``: the second product on a cached gradient graph;
* ``check:lambda_max``: ``hessian_eigenvalues(model, batch, k=1)`` at the function's defaults;
  ``check:monitor``: ``SharpnessMonitor(measures=("lambda_max",)).measure(model, opt)`` at the
  monitor's defaults; ``check:trace``: ``hessian_trace(model, batch)`` at its defaults;
  ``check:robustness`` (ViT): ``RobustnessMonitor().measure(model)`` at its defaults.

A row that cannot run records the error instead of a number. Targets: a check's peak <= the training
step's peak; a SAM step's peak over the plain step's <= 1.0x the parameter bytes (per rank); SAM FLOPs
<= 2.01x the plain step; an exact product <= 3.0x a forward+backward, a cached one <= 2.1x.

Run: ``.venv/bin/python benchmarks/simulate.py`` (all models and modes; ``--only gpt2-124m:single``
and repeated ``--only`` to run a part, merged into ``simulate_raw.json``); ``--table`` rewrites the
"Simulated production scale" section of RESULTS.md from the raw JSON without simulating.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import machine, write_section

from sharpguard.simulate import fake_process_group, fake_tensors, parameter_bytes, profile_step

RAW = Path(__file__).with_name("simulate_raw.json")
MODES = ("single", "fsdp8")
WORLD = 8
SAM_VARIANTS = ("SAM", "ASAM", "GSAM", "LookSAM", "GAM")


# ---------------------------------------------------------------------------------------------------
# models


class Logits(nn.Module):
    """An image classifier returning its logits, so ``cross_entropy(model(x), y)`` is its loss and a
    robustness monitor can attack it on ``(images, labels)``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=pixel_values).logits


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def gpt2_124m() -> tuple[nn.Module, list[nn.Module], Callable[[], Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(attn_implementation="sdpa", loss_type="ForCausalLM")
    model = GPT2LMHeadModel(config)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, config.vocab_size, (8, 1024))
        return {"input_ids": ids, "labels": ids}

    return model, list(model.transformer.h), batch


def llama(width: int, layers: int, heads: int, kv_heads: int, mlp: int, rows: int, cols: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=cols,
        attn_implementation="sdpa", loss_type="ForCausalLM",
    )
    model = LlamaForCausalLM(config)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, config.vocab_size, (rows, cols))
        return {"input_ids": ids, "labels": ids}

    return model, list(model.model.layers), batch


def vit_86m() -> tuple[nn.Module, list[nn.Module], Callable[[], Any]]:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_labels=1000, attn_implementation="sdpa")
    model = Logits(ViTForImageClassification(config))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(64, 3, 224, 224), torch.randint(0, 1000, (64,))

    return model, list(model.inner.vit.encoder.layer), batch


MODELS: dict[str, tuple[Callable[[], Any], str]] = {
    "gpt2-124m": (gpt2_124m, "GPT-2 124M (d 768, 12 layers, vocab 50257), 8 x 1024 tokens"),
    "llama-1b": (lambda: llama(2048, 22, 32, 4, 5632, 4, 2048),
                 "Llama-shaped 1.1B (TinyLlama: d 2048, 22 layers, 4 KV heads, vocab 32000), 4 x 2048 tokens"),
    "llama-7b": (lambda: llama(4096, 32, 32, 32, 11008, 1, 4096),
                 "Llama-shaped 6.7B (Llama-2-7B: d 4096, 32 layers, vocab 32000), 1 x 4096 tokens"),
    "vit-86m": (vit_86m, "ViT-Base/16 86M (224 x 224, 1000 classes), 64 images"),
}


def loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------------------------------------
# rows


def _error(exc: BaseException) -> str:
    line = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return line[:300]


def simulate(name: str, mode: str, rows: set[str] | None = None) -> dict[str, Any]:
    """Every row of one model in one mode; errors are recorded per row."""
    import sharpguard as sg
    from sharpguard.monitor import RobustnessMonitor, SharpnessMonitor
    from sharpguard.sharpness import HVPOperator, hessian_eigenvalues, hessian_trace

    _quiet_transformers()
    build, _ = MODELS[name]
    out: dict[str, Any] = {"model": name, "mode": mode, "world": WORLD if mode == "fsdp8" else 1, "rows": {}}
    torch.manual_seed(0)
    with _mesh(mode) as mesh, fake_tensors():
        model, blocks, make_batch = build()
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        batch = make_batch()
        out["params"] = sum(p.numel() for p in model.parameters())
        out["param_bytes"] = parameter_bytes(model)  # this rank's
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train() -> None:
            loss_of(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def fwd_bwd() -> None:
            loss_of(model, batch).backward()
            opt.zero_grad(set_to_none=True)

        train()  # AdamW's state exists from here on

        def row(key: str, fn: Callable[[], Any], optimizers: list[Any], extra: Callable[[Any], dict] | None = None):
            if rows is not None and key not in rows and key.split(":")[0] not in rows:
                return
            start = time.perf_counter()
            result: dict[str, Any] = {}
            holder: dict[str, Any] = {}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prof = profile_step(lambda: holder.setdefault("value", fn()), model=model,
                                        optimizers=optimizers, inputs=[batch])
                result = prof.to_dict()
                if extra is not None and "value" in holder:
                    result.update(extra(holder["value"]))
            except Exception as exc:  # noqa: BLE001 - recorded in the table
                result = {"error": _error(exc), "trace": traceback.format_exc(limit=-3)}
            result["seconds"] = time.perf_counter() - start
            out["rows"][key] = result
            print(f"  {name}/{mode}/{key}: {_short(result)}", flush=True)

        row("train", train, [opt])
        row("fwd_bwd", fwd_bwd, [opt])
        for variant in SAM_VARIANTS:
            def sam_row(variant: str = variant) -> None:
                sam = getattr(sg, variant)(model.parameters(), torch.optim.AdamW, model=model, lr=1e-4)

                def closure() -> torch.Tensor:
                    loss = loss_of(model, batch)
                    loss.backward()
                    return loss

                def step() -> None:
                    sam.step(closure)
                    sam.zero_grad(set_to_none=True)

                try:
                    step()  # warm-up: the base optimizer's state and SAM's own buffers exist
                except Exception as exc:  # noqa: BLE001
                    out["rows"][f"sam:{variant}"] = {"error": _error(exc), "trace": traceback.format_exc(limit=-3)}
                    print(f"  {name}/{mode}/sam:{variant}: {_error(exc)}", flush=True)
                    return
                row(f"sam:{variant}", step, [sam])

            if rows is None or "sam" in rows or f"sam:{variant}" in rows:
                sam_row()

        def peer_sam_row() -> None:
            from pytorch_optimizer import SAM as PeerSAM

            peer = PeerSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)

            def step() -> None:
                loss_of(model, batch).backward()
                peer.first_step(zero_grad=True)
                loss_of(model, batch).backward()
                peer.second_step(zero_grad=True)

            step()
            row("peer:pytorch_optimizer.SAM", step, [peer])

        if rows is None or "peer" in rows:
            try:
                peer_sam_row()
            except Exception as exc:  # noqa: BLE001
                out["rows"]["peer:pytorch_optimizer.SAM"] = {"error": _error(exc)}

        params = [p for p in model.parameters() if p.requires_grad]

        def reference_hvp(products: int) -> Callable[[], Any]:
            """Pearlmutter's product by plain double backward (PyHessian's route): a forward, a backward
            that keeps its graph, then ``products`` backwards through it."""
            def run() -> None:
                grads = torch.autograd.grad(loss_of(model, batch), params, create_graph=True)
                for i in range(products):
                    vs = [torch.randn_like(p) for p in params]
                    torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=i + 1 < products)
            return run

        row("ref:hvp_1", reference_hvp(1), [opt])
        row("ref:hvp_2", reference_hvp(2), [opt])

        def hvp(cached: bool) -> Callable[[], Any]:
            def run() -> None:
                with HVPOperator(model, batch, hvp="autograd", check_determinism=False, cache_graph=cached) as op:
                    v = torch.randn(op.size, dtype=op.dtype)
                    op.matvec(v)
                    if cached:
                        op.matvec(v)
            return run

        row("hvp_exact", hvp(False), [opt])
        row("hvp_cached2", hvp(True), [opt])  # two products, the second on the cached graph
        row("hvp_cached1", _first_cached(model, batch), [opt])
        row("check:lambda_max", lambda: hessian_eigenvalues(model, batch, k=1), [opt],
            lambda r: {"n_hvp": int(r.n_hvp)})
        monitor = SharpnessMonitor(measures=("lambda_max",), probe=[batch], alerts=None)
        row("check:monitor", lambda: monitor.measure(model, opt), [opt],
            lambda m: {"n_hvp": _n_hvp(m)})
        row("check:trace", lambda: hessian_trace(model, batch), [opt], lambda r: {"n_hvp": int(r.n_hvp)})
        if not isinstance(batch, dict):
            robust = RobustnessMonitor(probe=[batch], alerts=None)
            row("check:robustness", lambda: robust.measure(model, opt), [opt])
    return out


def _first_cached(model: nn.Module, batch: Any) -> Callable[[], Any]:
    from sharpguard.sharpness import HVPOperator

    def run() -> None:
        with HVPOperator(model, batch, hvp="autograd", check_determinism=False, cache_graph=True) as op:
            op.matvec(torch.randn(op.size, dtype=op.dtype))
    return run


def _n_hvp(metrics: Any) -> int | None:
    if isinstance(metrics, dict) and "monitor/n_hvp" in metrics:
        try:
            return int(metrics["monitor/n_hvp"])
        except Exception:  # noqa: BLE001 - a fake value cannot be read
            return None
    return None


class _NoMesh:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _mesh(mode: str) -> Any:
    return fake_process_group(WORLD) if mode == "fsdp8" else _NoMesh()


def _short(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"ERROR {result['error'][:120]} ({result['seconds']:.1f} s)"
    m = result["memory"]
    return f"peak {m['peak_bytes'] / 2**30:.2f} GiB, {result['flops']:.3e} FLOPs ({result['seconds']:.1f} s)"


# ---------------------------------------------------------------------------------------------------
# the table


GIB = 2**30


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def targets(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row: the target it is held to, the measured ratio, the bound, pass/fail and the margin."""
    rows = entry["rows"]
    train = rows.get("train", {})
    fb = rows.get("fwd_bwd", {})
    out: dict[str, dict[str, Any]] = {}
    if "memory" not in train:
        return out
    t_peak = train["memory"]["peak_bytes"]
    t_flops = train["flops"]
    pbytes = entry["param_bytes"]
    for key, r in rows.items():
        if key in ("train", "fwd_bwd"):
            continue
        if key.startswith("sam:"):
            tests = []
            if "memory" in r:
                tests.append(("extra peak / param bytes", (r["memory"]["peak_bytes"] - t_peak) / pbytes, 1.0))
                tests.append(("FLOPs / plain step", r["flops"] / t_flops, 2.01))
        elif key == "hvp_exact" and "memory" in r and "flops" in fb:
            tests = [("FLOPs / fwd+bwd", r["flops"] / fb["flops"], 3.0)]
        elif key == "hvp_cached2" and "memory" in r and "flops" in rows.get("hvp_cached1", {}):
            second = r["flops"] - rows["hvp_cached1"]["flops"]
            tests = [("2nd product FLOPs / fwd+bwd", second / fb["flops"], 2.1)]
        elif key == "ref:hvp_1" and "memory" in r and "flops" in fb:
            tests = [("FLOPs / fwd+bwd", r["flops"] / fb["flops"], 3.0)]
        elif key == "ref:hvp_2" and "memory" in r and "flops" in rows.get("ref:hvp_1", {}):
            second = r["flops"] - rows["ref:hvp_1"]["flops"]
            tests = [("2nd product FLOPs / fwd+bwd", second / fb["flops"], 2.1)]
        elif key.startswith("peer:") and "memory" in r:
            tests = [("extra peak / param bytes", (r["memory"]["peak_bytes"] - t_peak) / pbytes, 1.0),
                     ("FLOPs / plain step", r["flops"] / t_flops, 2.01)]
        elif key.startswith("check:") and "memory" in r:
            tests = [("peak / step peak", r["memory"]["peak_bytes"] / t_peak, 1.0)]
        else:
            tests = []
        for label, value, bound in tests:
            out.setdefault(key, {})[label] = {"value": value, "bound": bound, "pass": value <= bound,
                                              "margin": bound - value}
    return out


def table(raw: dict[str, Any]) -> str:
    lines = [
        f"Machine: {machine()}. Simulated with `FakeTensorMode` (nothing allocated): live tensor bytes by "
        "`MemTracker` (single device) / `FSDPMemTracker` (FSDP2, fake process group of 8 ranks, per rank), "
        "FLOPs by `FlopCounterMode` (matmul/conv/attention only). float32 throughout, AdamW, no activation "
        "checkpointing. Ratios are to the plain training step (forward + backward + AdamW step) of the same "
        "model and mode. Raw: `benchmarks/simulate_raw.json`. Run: `python benchmarks/simulate.py`.",
        "",
    ]
    for name, (_, desc) in MODELS.items():
        for mode in MODES:
            entry = raw.get(f"{name}:{mode}")
            if entry is None:
                continue
            rows = entry["rows"]
            train = rows.get("train", {})
            if "memory" not in train:
                lines += [f"### {name}, {mode}", "", f"training step failed: {train.get('error', 'not run')}", ""]
                continue
            t = train["memory"]
            world = "single device" if mode == "single" else f"FSDP2, world {entry['world']}, per rank"
            lines += [
                f"### {desc}; {world}",
                "",
                f"{entry['params'] / 1e6:.1f}M parameters; parameter bytes on this device {entry['param_bytes'] / GIB:.2f} GiB; "
                f"training step peak {t['peak_bytes'] / GIB:.2f} GiB (parameters {_cat(t, 'parameters')}, "
                f"gradients {_cat(t, 'gradients')}, optimizer state {_cat(t, 'optimizer_state')}, activations "
                f"{_cat(t, 'activations')}, temporaries {_cat(t, 'temporaries')}"
                + (f", all-gather {_cat(t, 'all_gather')}, reduce-scatter {_cat(t, 'reduce_scatter')}, "
                   f"unsharded parameters {_cat(t, 'unsharded_parameters')}" if mode != "single" else "")
                + f"), {train['flops']:.3g} FLOPs.",
                "",
                "| row | peak | peak / step | activations+temps / step's | extra peak / param bytes | FLOPs / step | products | target (bound): value | pass (margin) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            tg = targets(entry)
            t_at = t["peak_by_category"]["activations"] + t["peak_by_category"]["temporaries"]
            for key, r in rows.items():
                if "error" in r:
                    lines.append(f"| {key} | not run: `{r['error'][:160].replace('|', '/')}` | | | | | | | |")
                    continue
                m = r["memory"]
                at = m["peak_by_category"]["activations"] + m["peak_by_category"]["temporaries"]
                checks = tg.get(key, {})
                tcol = "; ".join(f"{k} (<= {v['bound']}): {v['value']:.3f}" for k, v in checks.items())
                pcol = "; ".join(("pass" if v["pass"] else "FAIL") + f" ({v['margin']:+.3f})" for v in checks.values())
                lines.append(
                    f"| {key} | {m['peak_bytes'] / GIB:.2f} GiB | {_ratio(m['peak_bytes'], t['peak_bytes'])} | "
                    f"{at / max(t_at, 1):.2f}x | {(m['peak_bytes'] - t['peak_bytes']) / entry['param_bytes']:+.2f} | "
                    f"{_ratio(r['flops'], train['flops'])} | {r.get('n_hvp', '') or ''} | {tcol} | {pcol} |"
                )
            lines.append("")
    return "\n".join(lines)


def _cat(mem: dict[str, Any], name: str) -> str:
    return f"{mem['peak_by_category'].get(name, 0) / GIB:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="model:mode (e.g. gpt2-124m:single); repeatable")
    parser.add_argument("--rows", default=None, help="comma-separated row keys or prefixes (train,sam,check,...)")
    parser.add_argument("--table", action="store_true", help="only rewrite the RESULTS.md section from the raw JSON")
    args = parser.parse_args()
    raw = json.loads(RAW.read_text()) if RAW.exists() else {}
    if not args.table:
        todo = args.only or [f"{n}:{m}" for n in MODELS for m in MODES]
        wanted = None if args.rows is None else set(args.rows.split(","))
        for item in todo:
            name, mode = item.split(":")
            print(f"{name} ({mode})", flush=True)
            entry = simulate(name, mode, wanted)
            if wanted is not None and item in raw:
                raw[item]["rows"].update(entry["rows"])
            else:
                raw[item] = entry
            raw[item]["machine"] = machine()
            RAW.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    write_section("Simulated production scale", table(raw))


if __name__ == "__main__":
    main()
