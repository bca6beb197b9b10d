"""The correctness part of the GPU check: a few SAM steps through every adapter (plain ``sharpguard.SAM``,
the Lightning callback ``SharpnessAwareMinimization``, ``SharpGuardTrainer(sam=...)``, the Accelerate
``SharpnessAwareMinimization``) in fp32, fp16 and bf16, and an fp16 overflow forced into each.

Each run is compared with the same adapter's fp32 run from the same weights on the same batches: the
largest relative weight difference (per tensor ``max|w - w_ref| / max|w_ref|``, max over tensors) and
the relative difference of the whole update (``||dw - dw_ref|| / ||dw_ref||``). A second fp32 run must
give exactly 0 on both; the fp32 runs use true fp32 (TF32 off) and deterministic kernels on a GPU. Under
fp16 an inf is forced into the first (clean) pass of the first step (into one gradient for plain SAM,
into the loss for the adapters): the scaler must skip the step, the weights must stay finite and
bitwise unchanged, and the scale must go down.

On CPU (tiny sizes) where a framework cannot do fp16 it is said in ``ctx.notes``: Lightning turns
``precision="16-mixed"`` into bf16 on CPU (that row is kept, and the fp16 row uses
``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))``), and Accelerate (so the HF Trainer) runs
``mixed_precision="fp16"`` as plain fp32 on CPU, so the run turns on its autocast and gives it a
``GradScaler("cpu")``. The models, sizes, context and memory meter are benchmarks/gpu_check.py's.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import sharpguard as sg
from benchmarks.gpu_check import (
    LR,
    RHO,
    Ctx,
    _error,
    build_gpt,
    build_resnet,
    free,
    gpt_batches,
    image_batches,
    loss_of,
    measured,
    n_params,
)


class ListDataset(torch.utils.data.Dataset):
    """Examples of a list of dict batches, one by one (for the framework DataLoaders)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.rows = [{k: v[i].cpu() for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]



@contextlib.contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """True fp32 and deterministic kernels (GPU), so two fp32 runs agree bitwise."""
    if device.type != "cuda":
        yield
        return
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention backward kernels are not deterministic
            yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def rel_diffs(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
              start: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest per-tensor ``max|w - w_ref| / max|w_ref|``, ``||dw - dw_ref|| / ||dw_ref||``), in float64."""
    if got.keys() != ref.keys():
        raise RuntimeError(f"parameter names differ: {sorted(set(got) ^ set(ref))[:5]}")
    worst, num, den = 0.0, 0.0, 0.0
    for k in ref:
        a, b, s = got[k].double(), ref[k].double(), start[k].double().to(ref[k].device)
        a = a.to(b.device)
        scale = b.abs().max().item()
        d = (a - b).abs().max().item()
        worst = max(worst, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
        num += torch.sum((a - b) ** 2).item()
        den += torch.sum((b - s) ** 2).item()
    update = math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)
    return worst, update


def all_finite(params: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in params.values())


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def run_plain(ctx: Ctx, template: nn.Module, batches: list[Any], precision: str, *,
              poison_grad: bool = False) -> dict[str, Any]:
    """sharpguard.SAM: closure form for fp32/bf16; for fp16 the documented two-step form with a GradScaler."""
    model = copy.deepcopy(template)
    opt = sg.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, model=model)
    info: dict[str, Any] = {}
    if precision == "fp16":
        scaler = torch.amp.GradScaler(ctx.device.type)
        info["scale_before"] = scaler.get_scale()
        for i, batch in enumerate(batches):
            opt.zero_grad()
            with ctx.autocast("fp16"):
                loss = loss_of(model, batch)
            scaler.scale(loss).backward()
            if poison_grad and i == 0:  # the forced overflow: an inf in one gradient of the clean pass
                p = next(q for q in model.parameters() if q.grad is not None)
                p.grad.view(-1)[0] = float("inf")
            if opt.first_step(zero_grad=True):
                with ctx.autocast("fp16"):
                    loss2 = loss_of(model, batch)
                scaler.scale(loss2).backward()
            opt.unperturb()
            scaler.step(opt.base_optimizer)
            scaler.update()
        info["scale_after"] = scaler.get_scale()
    else:
        for batch in batches:
            def closure(batch=batch):
                opt.zero_grad()
                with ctx.autocast(precision):
                    loss = loss_of(model, batch)
                loss.backward()
                return loss

            opt.step(closure)
    info["params"] = snapshot(model)
    return info


def run_sgd(ctx: Ctx, template: nn.Module, batches: list[Any], precision: str) -> dict[str, Any]:
    """Plain SGD without SAM at the same precision (fp16: with a default GradScaler): what the precision
    alone does to the weights, the yardstick for the SAM rows."""
    model = copy.deepcopy(template)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16" else None
    for batch in batches:
        opt.zero_grad()
        with ctx.autocast(precision):
            loss = loss_of(model, batch)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return {"params": snapshot(model)}


def skipped_steps(before: float | None, after: float | None) -> int | None:
    """Steps a GradScaler skipped, from its scale (it halves on each skip and grows only after 2000 good steps)."""
    if before is None or after is None:
        return None
    return max(0, round(math.log2(before / after))) if after > 0 else None


def run_lightning(ctx: Ctx, template: nn.Module, batches: list[dict], precision: str, *,
                  poison: bool = False) -> dict[str, Any]:
    """The Lightning callback on a LightningModule around the decoder; precision "32-true", "16-mixed",
    "bf16-mixed", or "16-mixed+cpu-scaler" (CPU only: MixedPrecision with torch.amp.GradScaler("cpu"))."""
    from sharpguard.integrations.lightning import NAMESPACE, SharpnessAwareMinimization

    pl = importlib.import_module(NAMESPACE)
    net = copy.deepcopy(template)
    net.sg_poison = 1 if poison else 0

    class LitDecoder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return self.net(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    kwargs: dict[str, Any] = {}
    scaler = None
    if precision == "16-mixed+cpu-scaler":
        MixedPrecision = importlib.import_module(f"{NAMESPACE}.plugins.precision").MixedPrecision
        scaler = torch.amp.GradScaler("cpu")
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    else:
        kwargs["precision"] = precision
    loader = torch.utils.data.DataLoader(ListDataset(batches), batch_size=len(batches[0]["input_ids"]), shuffle=False)
    cb = SharpnessAwareMinimization(rho=RHO)
    trainer = pl.Trainer(
        accelerator=ctx.device.type if ctx.cpu else "gpu", devices=1, max_steps=len(batches), callbacks=[cb],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(ctx.tmp), **kwargs,
    )
    plugin = trainer.precision_plugin
    scaler = getattr(plugin, "scaler", None)
    info: dict[str, Any] = {"ran_as": str(getattr(plugin, "precision", precision))}
    if scaler is not None:
        info["scale_before"] = scaler.get_scale()
    lit = LitDecoder()
    trainer.fit(lit, loader)
    if scaler is not None:
        info["scale_after"] = scaler.get_scale()
    info["n_steps"], info["n_fallback"] = cb.n_steps, cb.n_fallback
    info["params"] = snapshot(lit.net)
    return info


def _reset_accelerate() -> None:
    # Accelerate keeps process-wide singletons (its own tests reset them the same way).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _cpu_fp16(ctx: Ctx, accelerator: Any) -> None:
    """On CPU, Accelerate runs mixed_precision="fp16" as plain fp32 (no autocast, no scaler): turn on
    its fp16 autocast and give it a CPU GradScaler, so the dry run goes through the scaler path."""
    if ctx.cpu and accelerator.scaler is None:
        ctx.note(
            "CPU: `Accelerator(mixed_precision=\"fp16\")` (so `TrainingArguments(fp16=True)` too) runs plain fp32 on "
            "CPU, with neither fp16 autocast nor a GradScaler; the dry run sets `accelerator.native_amp = True` "
            "(fp16 autocast) and `accelerator.scaler = torch.amp.GradScaler(\"cpu\")` before `prepare`."
        )
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")


def run_hf(ctx: Ctx, template: nn.Module, batches: list[dict], precision: str, *,
           poison: bool = False) -> dict[str, Any]:
    """SharpGuardTrainer(sam=...) with TrainingArguments(fp16=...) / (bf16=...); SGD, clipping at 1.0."""
    from transformers import TrainingArguments

    from sharpguard.integrations.huggingface import SharpGuardTrainer

    _reset_accelerate()
    model = copy.deepcopy(template)
    model.sg_poison = 1 if poison else 0
    args = TrainingArguments(
        output_dir=str(ctx.tmp / "hf"), use_cpu=ctx.cpu, fp16=precision == "fp16", bf16=precision == "bf16",
        max_steps=len(batches), per_device_train_batch_size=len(batches[0]["input_ids"]), learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=1.0, report_to="none", disable_tqdm=True, save_strategy="no",
        logging_strategy="no", seed=0, dataloader_num_workers=0, remove_unused_columns=False,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trainer = SharpGuardTrainer(model=model, args=args, train_dataset=ListDataset(batches), sam={"rho": RHO},
                                optimizers=(optimizer, None))
    if precision == "fp16":
        _cpu_fp16(ctx, trainer.accelerator)
    scaler = trainer.accelerator.scaler
    info: dict[str, Any] = {"ran_as": str(trainer.accelerator.mixed_precision)}
    if scaler is not None:
        info["scale_before"] = scaler.get_scale()
    trainer.train()
    if scaler is not None:
        info["scale_after"] = scaler.get_scale()
    info["params"] = snapshot(model)
    _reset_accelerate()
    return info


def run_accelerate(ctx: Ctx, template: nn.Module, batches: list[dict], precision: str, *,
                   poison: bool = False) -> dict[str, Any]:
    """The documented Accelerate loop: sam.backward(batch), clip, optimizer.step(), zero_grad()."""
    from accelerate import Accelerator

    from sharpguard.integrations.accelerate import SharpnessAwareMinimization

    _reset_accelerate()
    mp = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision]
    accelerator = Accelerator(mixed_precision=mp, cpu=ctx.cpu)
    if precision == "fp16":
        _cpu_fp16(ctx, accelerator)
    model = copy.deepcopy(template)
    model.sg_poison = 1 if poison else 0
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(ListDataset(batches), batch_size=len(batches[0]["input_ids"]), shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=RHO)
    scaler = accelerator.scaler
    info: dict[str, Any] = {"ran_as": str(accelerator.mixed_precision)}
    if scaler is not None:
        info["scale_before"] = scaler.get_scale()
    skipped = []
    for batch in loader:
        with accelerator.accumulate(model):
            sam.backward(batch)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            skipped.append(bool(optimizer.step_was_skipped))
            optimizer.zero_grad()
    if scaler is not None:
        info["scale_after"] = scaler.get_scale()
    info["skipped_first"] = skipped[0] if skipped else None
    info["params"] = snapshot(accelerator.unwrap_model(model))
    _reset_accelerate()
    return info


ADAPTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "sharpguard.SAM": run_plain,
    "Lightning callback": run_lightning,
    "HF SharpGuardTrainer": run_hf,
    "Accelerate SAM": run_accelerate,
}


def lightning_precision(ctx: Ctx, precision: str) -> str:
    return {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed+cpu-scaler" if ctx.cpu else "16-mixed",
            "fp16-as-requested": "16-mixed"}[precision]


def run_adapters(ctx: Ctx, results: dict[str, Any]) -> None:
    """fp32 (twice), fp16 and bf16 through every adapter; then the forced overflow through each."""
    size = ctx.size
    n = size["adapter_steps"]
    gpt = build_gpt(size["adapter_gpt"], ctx.device)
    gpt_data = gpt_batches(size["adapter_gpt"], n, ctx.device)
    resnet = build_resnet(size["resnet"], ctx.device)
    img_data = image_batches(size["resnet"], n, ctx.device)
    rows, overflow = results.setdefault("adapters", []), results.setdefault("overflow", [])
    yardstick: dict[str, dict[str, float]] = {}

    cases: list[tuple[str, str, nn.Module, list[Any]]] = [("sharpguard.SAM", "ResNet-18", resnet, img_data)]
    cases += [(name, "GPT-2", gpt, gpt_data) for name in ADAPTERS]
    for adapter, model_name, template, data in cases:
        runner = ADAPTERS[adapter]
        start = snapshot(template)
        if model_name not in yardstick:  # plain SGD at each precision against plain SGD in fp32
            try:
                with exact_fp32(ctx.device):
                    sgd_ref = run_sgd(ctx, template, data, "fp32")["params"]
                yardstick[model_name] = {
                    p: rel_diffs(run_sgd(ctx, template, data, p)["params"], sgd_ref,
                                 start)[1] for p in ("fp16", "bf16")}
            except Exception as exc:  # noqa: BLE001
                yardstick[model_name] = {}
                rows.append({"adapter": "plain SGD (yardstick)", "model": model_name, "precision": "-",
                             "error": _error(exc)})
        precisions = ["fp32", "fp32", "fp16", "bf16"]
        if adapter == "Lightning callback" and ctx.cpu:
            precisions.append("fp16-as-requested")
        ref = None
        for i, precision in enumerate(precisions):
            label = "fp32 (repeat)" if (precision == "fp32" and i == 1) else precision
            row: dict[str, Any] = {"adapter": adapter, "model": model_name, "precision": label, "steps": n}
            try:
                with exact_fp32(ctx.device) if precision == "fp32" else contextlib.nullcontext():
                    with measured(ctx.mem) as rec:
                        if adapter == "Lightning callback":
                            info = runner(ctx, template, data, lightning_precision(ctx, precision))
                        else:
                            info = runner(ctx, template, data, precision)
                params = info.pop("params")
                if ref is None:
                    ref = params
                    row["max_rel_weight_diff"], row["rel_update_diff"] = 0.0, 0.0
                    row["reference"] = True
                else:
                    row["max_rel_weight_diff"], row["rel_update_diff"] = rel_diffs(params, ref, start)
                row["finite"] = all_finite(params)
                row["ran_as"] = info.get("ran_as", precision)
                if precision == "fp16-as-requested":
                    row["precision"] = "fp16 (16-mixed as requested)"
                    if row["ran_as"] != "16-mixed":
                        ctx.note(
                            f"CPU: Lightning runs `precision=\"16-mixed\"` as `{row['ran_as']}` on CPU (its own "
                            "warning: \"AMP with fp16 is not supported on CPU\"); the row \"fp16 (16-mixed as "
                            "requested)\" shows that run, and the fp16 row uses `MixedPrecision(\"16-mixed\", \"cpu\", "
                            "scaler=torch.amp.GradScaler(\"cpu\"))` instead."
                        )
                for key in ("scale_before", "scale_after", "n_steps", "n_fallback"):
                    if key in info:
                        row[key] = info[key]
                row["scaler_skipped_steps"] = skipped_steps(info.get("scale_before"), info.get("scale_after"))
                ran = str(row["ran_as"])
                row["sgd_rel_update_diff"] = (0.0 if precision == "fp32" else
                                              yardstick.get(model_name, {}).get("bf16" if "bf16" in ran else "fp16"))
                if ran == "no":
                    row["ran_as"] = "no (fp32)"
                row.update(seconds=rec["seconds"], peak_mib=rec["peak_mib"], resident_mib=rec["resident_mib"])
            except Exception as exc:  # noqa: BLE001 - record and go on: one broken adapter must not hide the rest
                row["error"] = _error(exc)
            rows.append(row)
            free(ctx.device)

        # forced overflow under fp16
        orow: dict[str, Any] = {"adapter": adapter, "model": model_name}
        try:
            with measured(ctx.mem) as rec:
                if adapter == "sharpguard.SAM":
                    orow["injected"] = "inf in one gradient of the clean pass"
                    info = run_plain(ctx, template, data[:1], "fp16", poison_grad=True)
                else:
                    orow["injected"] = "inf loss in the clean pass"
                    prec = lightning_precision(ctx, "fp16") if adapter == "Lightning callback" else "fp16"
                    info = runner(ctx, template, data[:1], prec, poison=True)
            params = info.pop("params")
            orow["weights_finite"] = all_finite(params)
            orow["weights_unchanged"] = bitwise_equal(params, start)
            orow["scale_before"] = info.get("scale_before")
            orow["scale_after"] = info.get("scale_after")
            orow["scale_lowered"] = (
                orow["scale_before"] is not None and orow["scale_after"] is not None
                and orow["scale_after"] < orow["scale_before"]
            )
            orow["step_skipped"] = bool(orow["weights_unchanged"] and orow["scale_lowered"])
            if "skipped_first" in info:
                orow["step_skipped"] = bool(orow["step_skipped"] and info["skipped_first"])
            for key in ("n_steps", "n_fallback"):
                if key in info:
                    orow[key] = info[key]
            orow.update(seconds=rec["seconds"], peak_mib=rec["peak_mib"], resident_mib=rec["resident_mib"])
        except Exception as exc:  # noqa: BLE001
            orow["error"] = _error(exc)
        overflow.append(orow)
        free(ctx.device)
    results["adapter_models"] = {"GPT-2": n_params(gpt), "ResNet-18": n_params(resnet)}
    del gpt, resnet
    free(ctx.device)


def failures(results: dict[str, Any]) -> list[str]:
    """What failed a check of ``run_adapters``' results (one line each; empty when every check passed)."""
    out = []
    for part in ("adapters", "overflow"):
        for row in results.get(part, []):
            if "error" in row:
                out.append(f"{part}: {row.get('adapter') or row.get('model')}: {row['error']}")
    for row in results.get("adapters", []):
        if row.get("precision") == "fp32 (repeat)" and "error" not in row:
            if row["max_rel_weight_diff"] != 0.0 or row["rel_update_diff"] != 0.0:
                out.append(f"adapters: {row['adapter']}: a second fp32 run differs from the first")
        if "error" not in row and not row.get("finite", True):
            out.append(f"adapters: {row['adapter']} {row['precision']}: non-finite weights")
    for row in results.get("overflow", []):
        if "error" not in row and not (row["step_skipped"] and row["weights_finite"] and row["weights_unchanged"]):
            out.append(f"overflow: {row['adapter']}: the forced overflow was not skipped cleanly")
    return out
