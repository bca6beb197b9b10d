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
* ``hvp_exact``: one exact product (``HVPOperator(hvp="auto", cache_graph=False)``: double backward, through
  the math attention kernel where the fused one has no double backward);
  ``hvp_cached``: the second product on a cached gradient graph;
* ``check:lambda_max``: ``hessian_eigenvalues(model, batch, k=1)`` at the function's defaults (on these
  CPU-resident models the Lanczos basis shares the device); ``check:lambda_max_host``: the same with the
  basis (and every vector of a finite-difference product: the Lanczos vector, the entry weights, both
  gradients) in host memory, as ``basis_device="auto"`` places them on an accelerator (simulated on the
  meta device, which the tracker counts apart);
  ``check:monitor``: ``SharpnessMonitor(measures=("lambda_max",)).measure(model, opt)`` at the
  monitor's defaults on these CPU-resident models; ``check:monitor_host``: the same with the basis in host
  memory, as the monitor runs on an accelerator; ``check:trace``: ``hessian_trace(model, batch, n_hvp=9)``
  (Hutch++ with 3 sketch vectors; the default 60 products hold 17 parameter-sized vectors more);
  ``check:trace_host``: the same with its vectors in host memory (``basis_device``, as above);
  ``check:robustness`` (ViT): ``RobustnessMonitor().measure(model)`` at its defaults.

A row that cannot run records the error instead of a number. Targets: a check's peak <= the training
step's peak (within 1 KiB of scalars, ``SCALAR_SLACK_BYTES``); a SAM step's peak over the plain step's
<= 1.0x the parameter bytes (per rank); SAM FLOPs <= 2.01x the plain step; an exact product <= 3.0x a
forward+backward, a cached one <= 2.1x.

Run: ``.venv/bin/python benchmarks/simulate.py`` (all models and modes; ``--only gpt2-124m:single``
and repeated ``--only`` to run a part, merged into ``simulate_raw.json``); ``--table`` rewrites the
"Simulated production scale" section of RESULTS.md from the raw JSON without simulating.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, write_section
else:  # run as python benchmarks/simulate.py: this folder is sys.path[0]
    from _results import machine, write_section
from sharpguard.simulate import fake_process_group, fake_tensors, parameter_bytes, profile_step

RAW = Path(__file__).with_name("simulate_raw.json")
MODES = ("single", "fsdp8")
WORLD = 8
SAM_VARIANTS = ("SAM", "ASAM", "GSAM", "LookSAM", "GAM")
TRACE_PRODUCTS = 9


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


def gpt2_124m(layers: int = 12) -> tuple[nn.Module, list[nn.Module], Callable[[], Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, attn_implementation="sdpa", loss_type="ForCausalLM")
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
    from transformers.initialization import no_init_weights

    config = ViTConfig(num_labels=1000, attn_implementation="sdpa")
    with no_init_weights():  # nn.init.trunc_normal_ reads a value, which fake tensors do not have
        model = Logits(ViTForImageClassification(config))

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(64, 3, 224, 224), torch.randint(0, 1000, (64,))

    vit = model.inner.vit  # transformers 5 keeps the blocks in vit.layers, 4.x in vit.encoder.layer
    blocks = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    return model, list(blocks), batch


MODELS: dict[str, tuple[Callable[[], Any], str]] = {
    "gpt2-124m": (gpt2_124m, "GPT-2 124M (d 768, 12 layers, vocab 50257), 8 x 1024 tokens"),
    "llama-1b": (lambda: llama(2048, 22, 32, 4, 5632, 4, 2048),
                 "Llama-shaped 1.1B (TinyLlama: d 2048, 22 layers, 4 KV heads, vocab 32000), 4 x 2048 tokens"),
    "llama-7b": (lambda: llama(4096, 32, 32, 32, 11008, 1, 4096),
                 "Llama-shaped 6.7B (Llama-2-7B: d 4096, 32 layers, vocab 32000), 1 x 4096 tokens"),
    "vit-86m": (vit_86m, "ViT-Base/16 86M (224 x 224, 1000 classes), 64 images"),
}


# The same shapes with fewer blocks ("llama-7b@2": two of its 32): every simulated figure is affine in
# the number of identical blocks, so two short runs give the full depth (with_layer_fits).
LAYERED: dict[str, Callable[[int], Any]] = {
    "llama-7b": lambda n: llama(4096, n, 32, 32, 11008, 1, 4096),
    "llama-1b": lambda n: llama(2048, n, 32, 4, 5632, 4, 2048),
    "gpt2-124m": gpt2_124m,
}
FULL_LAYERS = {"llama-7b": 32, "llama-1b": 22, "gpt2-124m": 12}


def with_layer_fits(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill rows missing at full depth from the ``@1`` and ``@2`` runs: ``v(L) = v1 + (v2 - v1)(L - 1)``
    for peaks, categories and FLOPs (rows marked ``from_layers``); the directly simulated training step
    stays, and its layer-fitted twin is added as ``train (fit)`` to show the fit's error."""
    out = json.loads(json.dumps(raw))
    for base, depth in FULL_LAYERS.items():
        for mode in MODES:
            one, two = out.get(f"{base}@1:{mode}"), out.get(f"{base}@2:{mode}")
            if not one or not two:
                continue
            full = out.setdefault(f"{base}:{mode}", {"model": base, "mode": mode, "world": one["world"], "rows": {}})
            for k in ("params", "param_bytes"):
                full[k] = one[k] + (two[k] - one[k]) * (depth - 1)
            for key, r1 in one["rows"].items():
                r2 = two["rows"].get(key, {})
                if "error" in r1 or "error" in r2:
                    full["rows"].setdefault(key, {"error": (r1.get("error") or r2.get("error")), "from_layers": [1, 2]})
                    continue
                if "memory" not in r1 or "memory" not in r2:
                    continue
                target = f"{key} (fit)" if key in full["rows"] and "memory" in full["rows"][key] else key
                if target != key and key != "train":
                    continue
                if _plans_differ(key, one["rows"], two["rows"]):
                    # a line through two different plans is no check's cost (1.1B: -16 GiB was fitted once)
                    full["rows"][key] = {"error": "not fitted: the plan differs at 1 and 2 blocks (simulate it "
                                                  "at full depth)", "from_layers": [1, 2]}
                    continue
                lin = lambda a, b: a + (b - a) * (depth - 1)  # noqa: E731
                m1, m2 = r1["memory"], r2["memory"]
                full["rows"][target] = {
                    "memory": {
                        "start_bytes": lin(m1["start_bytes"], m2["start_bytes"]),
                        "peak_bytes": lin(m1["peak_bytes"], m2["peak_bytes"]),
                        "end_bytes": lin(m1["end_bytes"], m2["end_bytes"]),
                        "peak_by_category": {c: lin(m1["peak_by_category"][c], m2["peak_by_category"][c])
                                             for c in m1["peak_by_category"]},
                        "end_by_category": {c: lin(m1["end_by_category"][c], m2["end_by_category"][c])
                                            for c in m1["end_by_category"]},
                    },
                    "flops": lin(r1["flops"], r2["flops"]),
                    "from_layers": [1, 2],
                    **{k: v for k, v in r1.items() if k in ("n_hvp", "micro_batches", "steps", "hvp")},
                    **{k: lin(r1[k], r2[k]) for k in ("saved_bytes", "saved_math_bytes") if k in r1 and k in r2},
                }
    return {k: v for k, v in out.items() if "@" not in k}


def _plans_differ(key: str, one: dict[str, Any], two: dict[str, Any]) -> bool:
    """Whether a check row ran different plans (micro-batches, product method) at 1 and 2 blocks."""
    if not key.startswith("check:") or key.startswith("check:plan"):
        return False
    plan = "check:plan_host" if key.endswith("_host") else "check:plan"

    def chosen(rows: dict[str, Any]) -> tuple[Any, Any]:
        row, made = rows.get(key, {}), rows.get(plan, {})
        return (row.get("micro_batches") or made.get("micro_batches"),
                str(row.get("hvp") or made.get("hvp") or "").split("+")[0])

    return chosen(one) != chosen(two)


def loss_of(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------------------------------------
# rows


def _error(exc: BaseException) -> str:
    line = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return line[:300]


def simulate(name: str, mode: str, rows: set[str] | None = None,
             on_row: Callable[[dict[str, Any]], None] | None = None,
             plans: dict[bool, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every row of one model in one mode; errors are recorded per row. ``plans`` (keyed by "basis in host
    memory"): the micro-batches and product method the checks run instead of planning their own; a layered
    run (``llama-7b@2``) takes the full-depth model's, so its checks are the full-depth checks' per block."""
    import sharpguard as sg
    from sharpguard.optim import SAMConfig, SAMEngine
    from sharpguard.sharpness import HVPOperator, hessian_eigenvalues, hessian_trace

    _quiet_transformers()
    base, _, layers = name.partition("@")
    build = MODELS[base][0] if not layers else (lambda: LAYERED[base](int(layers)))
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

        def row(key: str, fn: Callable[[], Any], optimizers: list[Any], extra: Callable[[Any], dict] | None = None,
                prepare: Callable[[], Any] | None = None):
            if rows is not None and key not in rows and key.split(":")[0] not in rows:
                return
            start = time.perf_counter()
            result: dict[str, Any] = {}
            holder: dict[str, Any] = {}
            try:
                if prepare is not None:  # before the measured call (a check's plan: a phase of its own)
                    prepare()
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
            if on_row is not None:
                on_row(out)
            print(f"  {name}/{mode}/{key}: {_short(result)}", flush=True)

        def fwd_bwd_eval() -> None:  # the pass a check runs (eval mode: no dropout), for the live cost model
            was = model.training
            model.eval()
            try:
                fwd_bwd()
            finally:
                model.train(was)

        row("train", train, [opt])
        row("fwd_bwd", fwd_bwd, [opt])
        row("fwd_bwd_eval", fwd_bwd_eval, [opt])
        for variant in SAM_VARIANTS:
            def sam_row(variant: str = variant) -> None:
                def closure() -> torch.Tensor:
                    loss = loss_of(model, batch)
                    loss.backward()
                    return loss

                if mode == "single":
                    sam = getattr(sg, variant)(model.parameters(), torch.optim.AdamW, model=model, lr=1e-4)
                    tracked = [sam]

                    def one_step() -> None:
                        sam.step(closure)
                        sam.zero_grad(set_to_none=True)
                else:
                    # FSDP2: the sharded engine (each rank's shards, norms all-reduced), as the front ends run it
                    base = torch.optim.AdamW(model.parameters(), lr=1e-4)
                    sam = SAMConfig(variant=variant.lower()).build(base, model=model, sharded=True)
                    engine = SAMEngine(sam, sharded=True)
                    tracked = [base]  # the tracker reads a torch optimizer's state; the sharded SAM keeps its own

                    def one_step() -> None:
                        engine.record(closure)
                        closure()
                        engine.finish()
                        base.step()
                        base.zero_grad(set_to_none=True)

                # LookSAM perturbs on one step in k: its row is k consecutive steps, reported per step
                steps = getattr(sam, "k", 1) if variant == "LookSAM" else 1

                def step() -> None:
                    for _ in range(steps):
                        one_step()

                try:
                    step()  # warm-up: the base optimizer's state and SAM's own buffers exist
                except Exception as exc:  # noqa: BLE001
                    out["rows"][f"sam:{variant}"] = {"error": _error(exc), "trace": traceback.format_exc(limit=-3)}
                    print(f"  {name}/{mode}/sam:{variant}: {_error(exc)}", flush=True)
                    return
                row(f"sam:{variant}", step, tracked, lambda _: {"steps": steps})

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
                with HVPOperator(model, batch, hvp="auto", check_determinism=False, cache_graph=cached) as op:
                    v = torch.randn(op.size, dtype=op.dtype)
                    op.matvec(v)
                    if cached:
                        op.matvec(v)
            return run

        row("hvp_exact", hvp(False), [opt])
        row("hvp_cached2", hvp(True), [opt])  # two products, the second on the cached graph
        row("hvp_cached1", _first_cached(model, batch), [opt])
        # The plan (micro-batches, product method: micro_batches="auto") is a phase of its own, before the first
        # product: its measuring forwards hold nothing afterwards. It is its own row and the checks below take it
        # as made, so each row's peak is one phase's, linear in the depth where the layered fit needs it (a
        # constant planning transient would otherwise be fitted as the check's own peak at 1 and 2 blocks).
        chosen: dict[bool, dict[str, Any]] = {host: dict(plan) for host, plan in (plans or {}).items()}

        def planned(host: bool) -> dict[str, Any]:
            if host not in chosen:
                from sharpguard.sharpness import plan_products

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = plan_products(model, [batch], basis_on_device=not host)
                chosen[host] = {"micro_batches": plan.micro_batches, "hvp": plan.hvp}
            return chosen[host]

        def plan_row(host: bool) -> Callable[[], Any]:
            def run() -> Any:
                from sharpguard.sharpness import plan_products

                return plan_products(model, [batch], basis_on_device=not host)
            return run

        def eig_settings(r: Any) -> dict[str, Any]:
            return {"n_hvp": int(r.n_hvp), "micro_batches": _plain(r.settings.get("micro_batches")),
                    "hvp": str(r.hvp_method)}

        def plan_settings(p: Any) -> dict[str, Any]:
            return {"micro_batches": p.micro_batches, "hvp": p.hvp, "saved_bytes": p.saved_bytes,
                    "saved_math_bytes": p.saved_math_bytes}

        row("check:plan", plan_row(False), [opt], plan_settings)
        row("check:plan_host", plan_row(True), [opt], plan_settings)
        row("check:lambda_max", lambda: hessian_eigenvalues(model, batch, k=1, **planned(False)), [opt], eig_settings,
            lambda: planned(False))
        # the same check with the Krylov basis in host memory, where basis_device="auto" keeps it on an
        # accelerator: on these CPU-resident fake models "meta" stands for the host (a device the tracker
        # counts apart from the one the model runs on)
        row("check:lambda_max_host",
            lambda: hessian_eigenvalues(model, batch, k=1, basis_device="meta", **planned(True)),
            [opt], eig_settings, lambda: planned(True))

        def monitor_check(host: bool) -> Callable[[], Any]:
            from sharpguard.monitor import SharpnessMonitor

            # host: the monitor as it runs on an accelerator, basis (and warm-start vector) in host memory
            kwargs: dict[str, Any] = {"basis_device": "meta"} if host else {}
            micro: int | str = "auto"
            if plans is not None:  # the full-depth plan, not this depth's (a layered run)
                micro, kwargs["hvp"] = planned(host)["micro_batches"], planned(host)["hvp"]
            monitor = SharpnessMonitor(measures=("lambda_max",), probe=[batch], alerts=None, micro_batches=micro,
                                       measure_kwargs={"lambda_max": kwargs} if kwargs else None)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the first (quick) check plans (the plan rows above): the row is the steady-state check after it
                monitor.measure(model, opt)
            return lambda: monitor.measure(model, opt)

        for key, host in (("check:monitor", False), ("check:monitor_host", True)):
            made: dict[str, Any] = {}
            row(key, lambda made=made: made["check"](), [opt],
                lambda m, host=host: {"n_hvp": _n_hvp(m), **planned(host)},
                lambda made=made, host=host: made.setdefault("check", monitor_check(host)))
        # Hutch++ with 9 products (3 sketch vectors), not the default 60 (20 sketch vectors, 20 x 3 passes
        # of simulation per check); the sketch adds one parameter-sized vector per 3 products.
        row("check:trace", lambda: hessian_trace(model, batch, n_hvp=TRACE_PRODUCTS, **planned(False)), [opt],
            lambda r: {"n_hvp": int(r.n_hvp), **planned(False)}, lambda: planned(False))
        row("check:trace_host", lambda: hessian_trace(model, batch, n_hvp=TRACE_PRODUCTS, basis_device="meta",
                                                      **planned(True)),
            [opt], lambda r: {"n_hvp": int(r.n_hvp), **planned(True)}, lambda: planned(True))
        if not isinstance(batch, dict):
            def robustness_check() -> Any:
                from sharpguard.monitor import RobustnessMonitor

                return RobustnessMonitor(probe=[batch], alerts=None).measure(model, opt)

            row("check:robustness", robustness_check, [opt])
    return out


_PLANNED: set[str] = set()  # the full-depth models whose plans this run simulated


def _full_depth_plans(name: str, mode: str, raw: dict[str, Any], wanted: set[str] | None
                      ) -> dict[bool, dict[str, Any]] | None:
    """For a layered run (``llama-7b@2``), the full-depth model's check plans, simulated once per run of this
    script (a full-depth forward of a slice: seconds; a stored plan may be an older planner's). ``None`` for a
    full-depth run."""
    base, _, layers = name.partition("@")
    if not layers or (wanted is not None and not any(w.startswith("check") for w in wanted)):
        return None
    keys = {False: "check:plan", True: "check:plan_host"}
    if f"{base}:{mode}" not in _PLANNED:
        _PLANNED.add(f"{base}:{mode}")
        print(f"  {base}/{mode}: full-depth plans first", flush=True)
        entry = simulate(base, mode, set(keys.values()))
        _save_rows(f"{base}:{mode}", entry, raw)
    rows = raw[f"{base}:{mode}"]["rows"]
    return {host: {"micro_batches": rows[k]["micro_batches"], "hvp": rows[k]["hvp"]} for host, k in keys.items()}


def _save_rows(item: str, entry: dict[str, Any], raw: dict[str, Any], old_rows: dict[str, Any] | None = None) -> None:
    """Merge ``entry``'s rows into the raw file's ``item`` (under a lock: runs of other models may write it)."""
    import fcntl

    with open(RAW.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = json.loads(RAW.read_text()) if RAW.exists() else {}
        kept = current.get(item, {}).get("rows", {}) if old_rows is None else old_rows
        current[item] = {**current.get(item, {}), **entry, "rows": {**kept, **entry["rows"]}, "machine": machine()}
        RAW.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    raw.update(current)


def _first_cached(model: nn.Module, batch: Any) -> Callable[[], Any]:
    from sharpguard.sharpness import HVPOperator

    def run() -> None:
        with HVPOperator(model, batch, hvp="auto", check_determinism=False, cache_graph=True) as op:
            op.matvec(torch.randn(op.size, dtype=op.dtype))
    return run


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else str(value)


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


# A check whose peak passes the step's by at most this counts as not raising it: the scalars a check keeps
# beside the step's own (the probe's world-scaled loss under FSDP2, 4 bytes; the monitor's guard's copy of the
# model's buffers, 256 bytes for a Llama's rotary frequencies). CUDA's allocator rounds each block to 512 bytes.
SCALAR_SLACK_BYTES = 1024


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
                tests.append(("FLOPs / plain step", r["flops"] / r.get("steps", 1) / t_flops, 2.01))
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
            # within SCALAR_SLACK_BYTES of the step: a check's few scalars (see its definition)
            tests = [("peak / step peak", r["memory"]["peak_bytes"] / t_peak, 1.0 + SCALAR_SLACK_BYTES / t_peak)]
        else:
            tests = []
        for label, value, bound in tests:
            out.setdefault(key, {})[label] = {"value": value, "bound": round(bound, 6), "pass": value <= bound,
                                              "margin": bound - value}
    return out


def table(raw: dict[str, Any]) -> str:
    raw = with_layer_fits(raw)
    # where the rows were simulated (each raw entry records its run's machine), not where the table is rendered
    machines = sorted({entry["machine"] for entry in raw.values() if "machine" in entry}) or [machine()]
    where = f"Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}"
    lines = [
        f"{where}. Simulated with `FakeTensorMode` (nothing allocated): live tensor bytes by "
        "`MemTracker` (single device) / `FSDPMemTracker` (FSDP2, fake process group of 8 ranks, per rank), "
        "FLOPs by `FlopCounterMode` (matmul/conv/attention only). float32 throughout, AdamW, no activation "
        "checkpointing. Ratios are to the plain training step (forward + backward + AdamW step) of the same "
        "model and mode. Inside `SAM.step(closure)` the tracker files every tensor the step allocates (the passes' "
        "activations included) as optimizer state: its hook marks the whole `step` call as the optimizer's. "
        "LookSAM's row is k = 5 consecutive steps (one perturbed), its FLOPs per step. GAM is 4F+4B by design. "
        "Rows ending `_host` keep the Krylov basis (and every vector of a finite-difference product: the Lanczos "
        "vector it reads, the entry weights, both gradients) in host memory, as `basis_device=\"auto\"` does on an "
        "accelerator; the meta device stands for the host, and every peak is the model's device's. A check passes "
        "its target when its peak is within 1 KiB of the step's (a check's scalars: `SCALAR_SLACK_BYTES`). Rows "
        "`from 1- and 2-block runs` are fitted linearly in the depth. A check row is the cost-only run of its "
        "`products`, the default determinism check's second product (the first product applied again) counted "
        "among them, as a real check runs them: only the comparison, which reads values, is left out "
        "(tests/sharpness/test_simulation_against_cpu.py). "
        "Raw: `benchmarks/simulate_raw.json`. Run: `python benchmarks/simulate.py`.",
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
                f"{entry['params'] / 1e6:.1f}M parameters; parameter bytes on this device "
                f"{entry['param_bytes'] / GIB:.2f} GiB; training step peak {t['peak_bytes'] / GIB:.2f} GiB (parameters "
                f"{_cat(t, 'parameters')}, gradients {_cat(t, 'gradients')}, optimizer state "
                f"{_cat(t, 'optimizer_state')}, activations {_cat(t, 'activations')}, temporaries "
                f"{_cat(t, 'temporaries')}"
                + (f", all-gather {_cat(t, 'all_gather')}, reduce-scatter {_cat(t, 'reduce_scatter')}, "
                   f"unsharded parameters {_cat(t, 'unsharded_parameters')}" if mode != "single" else "")
                + f"), {train['flops']:.3g} FLOPs.",
                "",
                "| row | peak | peak / step | at the peak: parameters / gradients / optimizer state / "
                "activations+temporaries (GiB) | extra peak / param bytes | FLOPs / step | products | target (bound): "
                "value | pass (margin) |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            tg = targets(entry)
            for key, r in sorted(rows.items(), key=lambda kv: _order(kv[0])):
                if "error" in r:
                    lines.append(f"| {key} | not run: `{r['error'][:160].replace('|', '/')}` | | | | | | | |")
                    continue
                m = r["memory"]
                checks = tg.get(key, {})
                tcol = "; ".join(f"{k} (<= {v['bound']}): {v['value']:.4f}" for k, v in checks.items())
                pcol = "; ".join(("pass" if v["pass"] else "FAIL") + f" ({v['margin']:+.4f})" for v in checks.values())
                extra = m["peak_bytes"] - t["peak_bytes"]
                over = extra - entry["param_bytes"]
                if key.startswith(("sam:", "peer:")) and 0 < over < 1024:
                    pcol += f" ({over} bytes over the parameter bytes)"
                label = key + (" (from 1- and 2-block runs)" if r.get("from_layers") and "(fit)" not in key else "")
                lines.append(
                    f"| {label} | {m['peak_bytes'] / GIB:.2f} GiB | {_ratio(m['peak_bytes'], t['peak_bytes'])} | "
                    f"{_split(m)} | {(m['peak_bytes'] - t['peak_bytes']) / entry['param_bytes']:+.2f} | "
                    f"{_ratio(r['flops'] / r.get('steps', 1), train['flops'])} | {r.get('n_hvp', '') or ''} | {tcol} | "
                    f"{pcol} |"
                )
            lines.append("")
    lines += ["### The cost model against the simulation", "", cost_model_table(raw), ""]
    if VALIDATION_RAW.exists():
        lines += ["### The simulation against the CPU (benchmarks/scale.py's models)", "",
                  "`python benchmarks/simulate.py --validate`: each run simulated, then run on real CPU tensors with "
                  "the CPU allocator's live bytes counted (*CPU live*: its own running count, reported to "
                  "`torch.profiler`; `scale.live_peak_bytes`), like for like, the difference in brackets; *CPU RSS*: "
                  "benchmarks/scale.py's fresh-process extra peak RSS (scale_raw.json), allocator and lazy "
                  "initialisation included (docs/cost_model.md says where and why it differs).", "",
                  validation_table(json.loads(VALIDATION_RAW.read_text())), ""]
    return "\n".join(lines)


# Shapes for sharpguard.sharpness.cost.transformer_activation_bytes (the models above).
SHAPES = {
    "gpt2-124m": dict(batch=8, seq_len=1024, hidden=768, layers=12, heads=12, vocab=50257, layout="gpt2"),
    "llama-1b": dict(batch=4, seq_len=2048, hidden=2048, layers=22, heads=32, vocab=32000, layout="llama", mlp=5632,
                     kv_heads=4),
    "llama-7b": dict(batch=1, seq_len=4096, hidden=4096, layers=32, heads=32, vocab=32000, layout="llama", mlp=11008),
}


def _live_check_memory(name: str, entry: dict[str, Any], key: str, micro: int, hvp: str, n_hvp: int,
                       plan: dict[str, Any]) -> Any:
    """``estimate_check_memory`` for one simulated check, from the same entry's training step (its peak and
    resident bytes), its eval-mode forward and backward (the pass a check runs) and the plan's measurement."""
    from sharpguard.sharpness.cost import estimate_check_memory
    from sharpguard.sharpness.micro import largest_slice
    from sharpguard.simulate import RESIDENT_CATEGORIES

    rows = entry["rows"]
    step, passed = rows.get("train", {}).get("memory"), rows.get("fwd_bwd_eval", {}).get("memory")
    if step is None or passed is None or (hvp == "autograd" and not plan.get("saved_math_bytes")):
        return None
    resident = sum(step["peak_by_category"].get(c, 0) for c in RESIDENT_CATEGORIES)
    examples = SHAPES.get(name, {}).get("batch", micro)
    measure = "trace" if key.startswith("check:trace") else ("monitor" if key.startswith("check:monitor")
                                                             else "lambda_max")
    return estimate_check_memory(
        step_peak_bytes=step["peak_bytes"], resident_bytes=resident, vector_bytes=entry["param_bytes"],
        pass_bytes=passed["peak_bytes"] - resident, hvp=hvp, micro_batches=micro,
        slice_fraction=largest_slice(examples, micro), basis_on_device=not key.endswith("_host"),
        measure=measure, n_hvp=n_hvp, graph_bytes=plan.get("saved_math_bytes") or None)


def cost_model_table(raw: dict[str, Any]) -> str:
    """``sharpguard.sharpness.cost`` predictions against the simulated figures (relative error)."""
    raw = with_layer_fits(raw)
    from sharpguard.sharpness.cost import (
        HVP_FLOPS,
        HVP_FLOPS_CACHED,
        estimate_check_cost,
        estimate_sam_cost,
        transformer_activation_bytes,
    )

    lines = ["| model, mode | quantity | predicted | simulated | error |", "|---|---|---|---|---|"]

    def add(label: str, what: str, pred: float, sim: float, unit: str = "") -> None:
        scale_ = GIB if unit == "GiB" else 1.0
        lines.append(f"| {label} | {what} | {pred / scale_:.3f}{' ' + unit if unit else ''} | {sim / scale_:.3f}"
                     f"{' ' + unit if unit else ''} | {(pred - sim) / sim:+.1%} |")

    for name in MODELS:
        for mode in MODES:
            entry = raw.get(f"{name}:{mode}")
            if not entry or "memory" not in entry["rows"].get("train", {}):
                continue
            rows, label = entry["rows"], f"{name}, {mode}"
            t = rows["train"]["memory"]
            cat = t["peak_by_category"]
            if name in SHAPES:
                add(label, "training step: activations + temporaries at the peak",
                    transformer_activation_bytes(**SHAPES[name]), cat["activations"] + cat["temporaries"], "GiB")
            p_local = entry["param_bytes"] / 4
            for key, r in rows.items():
                if key in ("sam:SAM", "sam:ASAM", "sam:GSAM") and "memory" in r:
                    sam = estimate_sam_cost(int(p_local), step_seconds=1.0)
                    extra = r["memory"]["peak_bytes"] - t["peak_bytes"]
                    lines.append(f"| {label} | {key}: extra peak over the step (the model's bound: the weight copy) | "
                                 f"<= {sam.extra_bytes / GIB:.3f} GiB | {extra / GIB:.6f} GiB | "
                                 f"{'within the bound' if extra <= sam.extra_bytes else 'ABOVE the bound'} |")
                    add(label, f"{key}: FLOPs / step", sam.flops_over_step, r["flops"] / rows["train"]["flops"])
            fb = rows.get("fwd_bwd", {}).get("flops")
            if fb:
                for key, pred in (("hvp_exact", HVP_FLOPS["autograd"]), ("ref:hvp_1", HVP_FLOPS["autograd"])):
                    if "flops" in rows.get(key, {}):
                        add(label, f"{key}: FLOPs / fwd+bwd", pred, rows[key]["flops"] / fb)
                for two, one in (("hvp_cached2", "hvp_cached1"), ("ref:hvp_2", "ref:hvp_1")):
                    if "flops" in rows.get(two, {}) and "flops" in rows.get(one, {}):
                        add(label, f"{two}: 2nd product FLOPs / fwd+bwd", HVP_FLOPS_CACHED,
                            (rows[two]["flops"] - rows[one]["flops"]) / fb)
            for key in ("check:lambda_max", "check:lambda_max_host", "check:monitor", "check:monitor_host",
                        "check:trace", "check:trace_host"):
                r = rows.get(key, {})
                if "memory" not in r or not r.get("n_hvp"):
                    continue
                host = key.endswith("_host")
                plan = rows.get("check:plan_host" if host else "check:plan", {})
                # the plan the check ran (the monitor's is the function's on the same probe)
                micro = next((m for m in (r.get("micro_batches"), plan.get("micro_batches")) if isinstance(m, int)), 1)
                method = str(r.get("hvp") or plan.get("hvp") or "autograd")
                hvp = "finite_difference" if method.startswith("finite") else "autograd"
                flops = estimate_check_cost(int(p_local), step_peak_bytes=t["peak_bytes"], step_seconds=1.0,
                                            n_hvp=int(r["n_hvp"]), micro_batches=micro, hvp=hvp)
                add(label, f"{key}: FLOPs / step", flops.flops_over_step, r["flops"] / rows["train"]["flops"])
                live = _live_check_memory(name, entry, key, micro, hvp, int(r["n_hvp"]), plan)
                if live is not None:
                    add(label, f"{key} ({micro} micro-batch{'es' if micro > 1 else ''}, {hvp}): peak, {live.phase}",
                        live.peak_bytes, r["memory"]["peak_bytes"], "GiB")
    return "\n".join(lines)


def summary_table(raw: dict[str, Any]) -> str:
    """One line per model and mode: what docs/cost_model.md and the README quote."""
    raw = with_layer_fits(raw)
    lines = [
        "| model | mode | params | train step peak | SAM extra peak / param bytes | SAM FLOPs / step | exact product "
        "FLOPs / fwd+bwd (cached 2nd) | lambda_max check peak / step peak (function defaults; basis in host memory; "
        "monitor; monitor with its basis in host memory) | trace check peak / step peak (function defaults; basis in "
        "host memory) | RobustnessMonitor check "
        "peak / step peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        for mode in MODES:
            entry = raw.get(f"{name}:{mode}")
            if not entry or "memory" not in entry["rows"].get("train", {}):
                continue
            rows = entry["rows"]
            t = rows["train"]
            sam = rows.get("sam:SAM", {})
            fb = rows.get("fwd_bwd", {}).get("flops")

            def peak(key: str) -> str:
                r = rows.get(key)
                if r is None:
                    return "not run"
                if "memory" not in r:
                    return _failure(r)
                return f"{r['memory']['peak_bytes'] / t['memory']['peak_bytes']:.2f}x"

            hvp = "not run"
            one = rows.get("hvp_exact", rows.get("ref:hvp_1", {}))
            if fb and "flops" in one:
                hvp = f"{one['flops'] / fb:.2f}"
                c1, c2 = rows.get("hvp_cached1",
                                  rows.get("ref:hvp_1", {})), rows.get("hvp_cached2", rows.get("ref:hvp_2", {}))
                if "flops" in c1 and "flops" in c2:
                    hvp += f" ({(c2['flops'] - c1['flops']) / fb:.2f})"
            lines.append(
                f"| {name} | {'single device' if mode == 'single' else 'FSDP2 x8, per rank'} | "
                f"{entry['params'] / 1e6:.0f}M | {t['memory']['peak_bytes'] / GIB:.1f} GiB | "
                + (f"{(sam['memory']['peak_bytes'] - t['memory']['peak_bytes']) / entry['param_bytes']:.4f} | "
                   f"{sam['flops'] / t['flops']:.3f} | " if "memory" in sam else f"{_failure(sam)} | | ")
                + f"{hvp} | {peak('check:lambda_max')}; {peak('check:lambda_max_host')}; {peak('check:monitor')}; "
                f"{peak('check:monitor_host')} | "
                f"{peak('check:trace')}; {peak('check:trace_host')} | "
                f"{peak('check:robustness') if 'check:robustness' in rows else '-'} |"
            )
    return "\n".join(lines)


def _failure(row: dict[str, Any]) -> str:
    err = row.get("error", "")
    if err.startswith("not completed"):
        return "not completed in time"
    return f"fails: `{err.split(':')[0]}`" if err else "not run"


def _split(mem: dict[str, Any]) -> str:
    c = mem["peak_by_category"]
    parts = (c["parameters"] + c["unsharded_parameters"], c["gradients"] + c["unsharded_gradients"],
             c["optimizer_state"],
             c["activations"] + c["temporaries"])
    return " / ".join(f"{v / GIB:.2f}" for v in parts)


def _order(key: str) -> tuple[int, str]:
    prefixes = ("train", "fwd_bwd", "sam:", "peer:", "hvp_", "ref:", "check:")
    return next((i for i, p in enumerate(prefixes) if key.startswith(p)), len(prefixes)), key


def _cat(mem: dict[str, Any], name: str) -> str:
    return f"{mem['peak_by_category'].get(name, 0) / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------------
# the simulation against the CPU: benchmarks/scale.py's models, simulated, against scale_raw.json

SCALE_RAW = Path(__file__).with_name("scale_raw.json")
VALIDATION_RAW = Path(__file__).with_name("simulate_vs_cpu.json")
MIB = 2**20


def validate(only: set[str] | None = None, previous: dict[str, Any] | None = None,
             on_model: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Simulate what ``scale.py`` measures (fresh-process extra peaks: the first training step with a new
    AdamW, a SAM step, the peer SAM step, one product on two half batches, a check with ``max_iter=20``
    whole and in the micro-batches the monitor chose, its products fixed at the cost-only run's six, which fill
    the basis), run each again on real tensors counting the CPU allocator's live bytes
    (``scale.live_peak_bytes``: the like-for-like figure), and return both, per model."""
    import scale
    from sharpguard.optim import SAM
    from sharpguard.sharpness import HVPOperator, hessian_eigenvalues
    from sharpguard.sharpness.lanczos import default_max_basis, fixed_product_count

    measured = json.loads(SCALE_RAW.read_text())
    torch.set_num_threads(1)  # as scale.py measures
    out: dict[str, Any] = {}
    for name, rec in measured.items():
        print(f"validate {name}", flush=True)
        res: dict[str, Any] = dict((previous or {}).get(name, {}))
        res["params"] = rec["time"]["params"]

        def one(key: str, make: Callable[[nn.Module, Any], tuple[Callable[[], Any], list[Any]]],
                train_mode: bool = True) -> None:
            if only is not None and key not in only:
                return
            start = time.perf_counter()
            try:
                with fake_tensors(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.manual_seed(0)
                    model, batch = scale.build(name, False)
                    model.train(train_mode)
                    fn, opts = make(model, batch)
                    prof = profile_step(fn, model=model, optimizers=opts, inputs=[batch])
                res[key] = {"extra_bytes": prof.memory.peak_bytes - prof.memory.start_bytes, "flops": prof.flops,
                            "peak_by_category": prof.memory.peak_by_category}
            except Exception as exc:  # noqa: BLE001 - recorded
                res[key] = {"error": _error(exc)}
            res[key]["seconds"] = time.perf_counter() - start
            # the same thing on real tensors, counted by the CPU allocator: the like-for-like measurement
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(0)
                model, batch = scale.build(name, False)
                model.train(train_mode)
                fn, _ = make(model, batch)
                res[key]["live_bytes"] = scale.live_peak_bytes(fn)
            print(f"  {key}: {res[key].get('error') or round(res[key]['extra_bytes'] / MIB, 1)} simulated, "
                  f"{round(res[key]['live_bytes'] / MIB, 1)} on the CPU", flush=True)

        def train(model, batch):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def fn() -> None:
                scale.loss_of(model, batch).backward()
                opt.step()
            return fn, []

        def fwd_bwd(model, batch):
            return (lambda: scale.loss_of(model, batch).backward()), []

        def sam(nonfinite: str):
            def make(model, batch):
                opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4, nonfinite=nonfinite)

                def closure() -> torch.Tensor:
                    opt.zero_grad()
                    loss = scale.loss_of(model, batch)
                    loss.backward()
                    return loss
                return (lambda: opt.step(closure)), []
            return make

        def peer(model, batch):
            from pytorch_optimizer import SAM as PeerSAM

            opt = PeerSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4)

            def fn() -> None:
                scale.loss_of(model, batch).backward()
                opt.first_step(zero_grad=True)
                scale.loss_of(model, batch).backward()
                opt.second_step(zero_grad=True)
            return fn, []

        def hvp(model, batch):
            probe = scale.halves(batch, name)

            def fn() -> None:
                with HVPOperator(model, probe, scale.loss_of, check_determinism=False) as op:
                    op.matvec(torch.randn(op.size))
            return fn, []

        def ref_hvp(model, batch):
            probe = scale.halves(batch, name)
            params = [p for p in model.parameters() if p.requires_grad]

            def fn() -> None:  # uncached exact product on each half: forward, backward with graph, double backward
                for part in probe:
                    grads = torch.autograd.grad(scale.loss_of(model, part) / 2, params, create_graph=True)
                    torch.autograd.grad(grads, params, grad_outputs=[torch.ones_like(p) for p in params])
            return fn, []

        # the products a cost-only run takes (enough to fill the bounded basis, where the memory peaks), taken
        # by the real run too: the profiler's records of a 20-product check at 29M outgrow this machine's memory
        products = fixed_product_count(None, True, scale.MAX_ITER, default_max_basis(1, "largest"))

        def check(micro: int):
            def make(model, batch):
                if micro == 1:  # whole batches, as scale.py's whole-batch check
                    return (lambda: hessian_eigenvalues(model, batch, scale.loss_of, k=1, max_iter=scale.MAX_ITER,
                                                        micro_batches=1, fixed_products=products)), []
                # as scale.py: targets kept batch-first so the batch splits by examples, the same loss
                x, y = batch
                probe = (x, x[:, 1:] if name.startswith("gpt2") else y)

                def loss(m: nn.Module, b: Any) -> torch.Tensor:
                    return nn.functional.cross_entropy(m(b[0]), b[1].reshape(-1))
                return (lambda: hessian_eigenvalues(model, probe, loss, k=1, max_iter=scale.MAX_ITER,
                                                    micro_batches=micro, fixed_products=products)), []
            return make

        one("train", train)
        one("fwd_bwd", fwd_bwd)
        one("sam_fallback", sam("fallback"))
        one("sam", sam("skip"))
        one("peer_sam", peer)
        one("ref_hvp", ref_hvp, train_mode=False)
        one("hvp", hvp, train_mode=False)
        one("check", check(1))
        # scale.py's re-measured models call the micro-batched check `check`, the older rows `check_mb`
        sliced = rec["mem"]["check"] if "check_whole" in rec["mem"] else rec["mem"]["check_mb"]
        one("check_mb", check(int(sliced.get("micro_batches", 8))))
        out[name] = res
        if on_model is not None:
            on_model(out)
    return out


def validation_table(sim: dict[str, Any]) -> str:
    """Simulated against the same runs on the CPU: live bytes (the CPU allocator's count, like for like; the
    difference in brackets) and scale.py's peak RSS (scale_raw.json), as the ratios scale.py reports."""
    measured = json.loads(SCALE_RAW.read_text())
    lines = [
        "| model | train step extra peak, MiB: simulated / CPU live / CPU RSS | SAM extra / param bytes (fallback, "
        "skip): simulated / CPU live / CPU RSS | peer SAM extra / param bytes: simulated / CPU live / CPU RSS | one "
        "product's extra / train's: simulated / CPU live / CPU RSS | check / train: simulated / CPU live / CPU RSS | "
        "check, monitor's micro-batches / train: simulated / CPU live / CPU RSS | exact product / fwd+bwd: FLOPs "
        "(simulated) / time (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def figure(res: dict[str, Any], field: str, key: str, over: str | None = None, scale: float = 1.0,
               less: str | None = None) -> float | None:
        """``(res[key][field] - res[less][field]) / (res[over][field] or scale)``, or None where one is missing."""
        keys = [key] + [k for k in (over, less) if k is not None]
        if any(field not in res.get(k, {}) for k in keys):
            return None
        value = res[key][field] - (res[less][field] if less else 0)
        return value / (res[over][field] if over else scale)

    def cell(a: float | None, b: float | None, rss: float, fmt: str = "{:.2f}") -> str:
        sim_s = "not run" if a is None else fmt.format(a)
        live_s = "not run" if b is None else fmt.format(b)
        diff = "" if a is None or b is None or b == 0 else f" ({(a - b) / b:+.0%})"
        return f"{sim_s} / {live_s}{diff} / {fmt.format(rss)}"

    for name, res in sim.items():
        rec = measured[name]
        m = rec["mem"]
        # scale.py's re-measured models name the whole-batch check `check_whole` and the default (micro-batched)
        # one `check`; the older rows call them `check` and `check_mb`
        whole, micro = (m["check_whole"], m["check"]) if "check_whole" in m else (m["check"], m["check_mb"])
        pb = 4 * res["params"]
        tm = m["train"]["extra_mib"] * MIB
        sams = []
        for field in ("extra_bytes", "live_bytes"):
            both = [figure(res, field, k, scale=pb, less="train") for k in ("sam_fallback", "sam")]
            sams.append("n/a" if None in both else ", ".join(f"{v:.2f}" for v in both))
        fb = res.get("fwd_bwd", {}).get("flops")
        ref = res.get("ref_hvp", {}).get("flops")
        flops = "not run" if not (fb and ref) else f"{ref / fb:.2f}"

        def both(key: str, **how: Any) -> tuple[float | None, float | None]:
            return figure(res, "extra_bytes", key, **how), figure(res, "live_bytes", key, **how)

        def rss_ratio(entry: dict[str, Any]) -> float:
            return entry["extra_mib"] * MIB / tm

        lines.append(
            f"| {name} | {cell(*both('train', scale=MIB), tm / MIB, '{:.0f}')} | "
            f"{sams[0]} / {sams[1]} / {(m['sam']['extra_mib'] * MIB - tm) / pb:.2f} | "
            f"{cell(*both('peer_sam', scale=pb, less='train'), (m['peer_sam']['extra_mib'] * MIB - tm) / pb)} | "
            f"{cell(*both('hvp', over='train'), rss_ratio(m['hvp']))} | "
            f"{cell(*both('check', over='train'), rss_ratio(whole))} | "
            f"{cell(*both('check_mb', over='train'), rss_ratio(micro))} | "
            f"{flops} / {rec['time']['hvp'] / rec['time']['fwd_bwd']:.2f} |"
        )
    errors = sorted({f"{k}: {v['error']}" for res in sim.values() for k, v in res.items()
                     if isinstance(v, dict) and "error" in v})
    if errors:
        lines += ["", "Rows not simulated: " + "; ".join(f"`{e[:200]}`" for e in errors[:6]) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="model:mode (e.g. gpt2-124m:single); repeatable")
    parser.add_argument("--rows", default=None, help="comma-separated row keys or prefixes (train,sam,check,...)")
    parser.add_argument("--table", action="store_true", help="only rewrite the RESULTS.md section from the raw JSON")
    parser.add_argument("--summary", action="store_true", help="print the one-line-per-model summary and exit")
    parser.add_argument("--validate", action="store_true",
                        help="simulate benchmarks/scale.py's models and compare with scale_raw.json")
    args = parser.parse_args()
    raw = json.loads(RAW.read_text()) if RAW.exists() else {}
    if args.summary:
        print(summary_table(raw))
        return
    if args.validate:
        previous = json.loads(VALIDATION_RAW.read_text()) if VALIDATION_RAW.exists() else None
        only = None if args.rows is None else set(args.rows.split(","))
        def save(out: dict[str, Any]) -> None:  # after every model: a run stopped part-way keeps what it measured
            VALIDATION_RAW.write_text(json.dumps({**(previous or {}), **out}, indent=1, sort_keys=True) + "\n")

        save(validate(only, previous, on_model=save))
    elif not args.table:
        todo = args.only or [f"{n}:{m}" for n in MODELS for m in MODES]
        wanted = None if args.rows is None else set(args.rows.split(","))
        for item in todo:
            name, mode = item.split(":")
            print(f"{name} ({mode})", flush=True)
            # a part (--rows) merges into the rows on file when it saves, which another run filling other rows
            # of the same model may have written since this one started; a whole run replaces them
            old_rows = None if wanted is not None else {}

            def save(entry: dict[str, Any], item: str = item, old_rows: dict[str, Any] | None = old_rows) -> None:
                # after every row: a long run killed part-way keeps what it measured
                _save_rows(item, entry, raw, old_rows)

            save(simulate(name, mode, wanted, on_row=save, plans=_full_depth_plans(name, mode, raw, wanted)))
    write_section("Simulated production scale", table(raw))


if __name__ == "__main__":
    main()
