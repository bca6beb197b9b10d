"""Cost of a monitor's first check in training steps of the same run, on two documented paths.

    python benchmarks/first_check_cost.py [--first-check quick|full] [--out result.json]

1. ``examples/lightning_digits.py``'s set-up (the digits CNN, SGD with momentum and weight decay, the
   SharpnessAwareMinimization callback, ``SharpnessMonitor(measures=("lambda_max", "eos_ratio"))`` at
   its defaults), one epoch (22 steps).
2. A Hugging Face client: GPT-2 built from a small config (2 layers, width 64, vocabulary 1000,
   sequences of 32 tokens, batches of 8) under ``SharpGuardTrainer`` with ``SharpnessMonitorCallback()``,
   8 steps.

For each: the first check's seconds (``monitor/first_check_s``), the run's mean training step
(the monitor schedule's training time over the steps; the monitor's own time excluded) and their ratio,
the first check in training steps; the first check's settings (quick or full, probe examples,
tolerance, converged). ``--first-check`` is left out to measure a version without that keyword. Prints
one JSON object. Wall times on a shared machine vary; the ratio to the same run's step is the figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import torch


def _first(monitor, steps: int) -> dict:
    s = monitor.schedule
    step_s = s.train_seconds / max(steps, 1)
    first = next((r for r in monitor.history.records if r["metric"].startswith("sharpness/")), None)
    keep = ("check", "probe_size", "of_probe", "tol", "converged", "n_hvp", "residual")
    return {
        "first_check_s": s.first_check_seconds,
        "step_s": step_s,
        "first_check_steps": (s.first_check_seconds or 0.0) / step_s if step_s else None,
        "steps": steps,
        "first_value": None if first is None else first["value"],
        "first_metric": None if first is None else first["metric"],
        "first_settings": {} if first is None else {k: first["settings"][k] for k in keep if k in first["settings"]},
    }


def digits(kw: dict) -> dict:
    if __package__:  # imported as benchmarks.first_check_cost
        from benchmarks._results import example
    else:  # run as python benchmarks/first_check_cost.py: this folder is sys.path[0]
        from _results import example
    digits_example = example("lightning_digits")
    DigitsCNN, digits_loaders = digits_example.DigitsCNN, digits_example.digits_loaders

    from sharpguard.integrations.lightning import NAMESPACE, SharpnessAwareMinimization, SharpnessMonitor

    pl = __import__(NAMESPACE, fromlist=["Trainer"])
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    monitor = SharpnessMonitor(measures=("lambda_max", "eos_ratio"), **kw)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[SharpnessAwareMinimization(), monitor],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(DigitsCNN(), train)
    return _first(monitor.monitor, trainer.global_step)


def gpt2(kw: dict) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from sharpguard.integrations.huggingface import SharpGuardTrainer, SharpnessMonitorCallback

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1000, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 1000, (128, 32), generator=torch.Generator().manual_seed(0))

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "labels": ids[i]}

    callback = SharpnessMonitorCallback(**kw)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
                                 report_to=[], save_strategy="no", logging_steps=100, use_cpu=True,
                                 disable_tqdm=True, seed=0)
        trainer = SharpGuardTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback])
        trainer.train()
    return _first(callback.monitor, trainer.state.global_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-check", choices=("quick", "full"), default=None)
    parser.add_argument("--only", choices=("digits", "gpt2"), default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    kw = {} if args.first_check is None else {"first_check": args.first_check}
    import sharpguard

    result = {"sharpguard": str(Path(sharpguard.__file__).parent),
              "first_check": args.first_check or "(keyword absent)",
              "threads": torch.get_num_threads()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, run in (("lightning_digits", digits), ("hf_gpt2", gpt2)):
            if args.only in (None, name.split("_")[-1]):
                result[name] = run(kw)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
