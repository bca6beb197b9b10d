"""SharpnessAwareMinimization in a hand-written Accelerate loop (single process, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import accelerate  # noqa: F401
import transformers  # noqa: F401

from tests.helpers.tiny_text import FirstTokenTask, params_of, sam_reference, tiny_bert  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from sharpguard.errors import ConfigurationError  # noqa: E402
from sharpguard.integrations.accelerate import (  # noqa: E402
    MonitorStep,
    SharpnessAwareMinimization,
    check_distributed_type,
)


# Accelerate keeps process-wide singletons: every test here gets its own (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("_fresh_accelerate_state")


def _loop(accelerator, model, loader, optimizer, sam, n_micro, loss_log=None):
    seen = []
    it = iter(loader)
    for _ in range(n_micro):
        batch = next(it)
        seen.append({k: v.clone() for k, v in batch.items()})
        with accelerator.accumulate(model):
            loss = sam.backward(batch)
            if loss_log is not None:
                loss_log.append(loss)
            optimizer.step()
            optimizer.zero_grad()
    return seen


def _setup(ga=2, lr=0.5, scaler=None):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ga)
    if scaler is not None:
        # Accelerator(cpu=True, mixed_precision="fp16") has no scaler on CPU: inject torch's own, so
        # backward scales the loss and AcceleratedOptimizer.step goes through scaler.step/update.
        accelerator.scaler = scaler
    start = tiny_bert()
    model = tiny_bert()
    loader = torch.utils.data.DataLoader(FirstTokenTask(32), batch_size=4, shuffle=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, start, model, optimizer, loader


def test_sam_under_accumulate_equals_hand_written_sam():
    accelerator, start, model, optimizer, loader = _setup(ga=2)
    assert accelerator.distributed_type == DistributedType.NO
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.2)
    losses = []
    seen = _loop(accelerator, model, loader, optimizer, sam, n_micro=4, loss_log=losses)
    assert sam.pending_micro_batches == 0

    ref = sam_reference(start, [seen[0:2], seen[2:4]], lr=0.5, rho=0.2)
    got, want = params_of(accelerator.unwrap_model(model)), params_of(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # the returned loss is the loss at w (first micro-batch: the untouched start model)
    torch.testing.assert_close(losses[0], start(**seen[0]).loss.detach())


def test_fp16_scaler_path_unscales_and_checks_the_sam_gradient():
    """With a GradScaler both passes are scaled by S; the update must equal the fp32 one (S = 2^k is
    exact), which it would not (S times too large) if the second gradient escaped unscale_."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerator, start, model, optimizer, loader = _setup(ga=2, scaler=scaler)
    assert optimizer.scaler is scaler
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.2)
    seen = _loop(accelerator, model, loader, optimizer, sam, n_micro=4)

    ref = sam_reference(start, [seen[0:2], seen[2:4]], lr=0.5, rho=0.2)
    got, want = params_of(accelerator.unwrap_model(model)), params_of(ref)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert scaler.get_scale() == 2.0**10  # no overflow, no skipped step


def test_fp16_overflow_in_the_clean_pass_skips_the_step():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    accelerator, start, model, optimizer, loader = _setup(ga=1, scaler=scaler)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        # the very first forward (clean pass of step 1) overflows, as fp16 does with a too-large scale
        return loss * float("inf") if len(calls) == 1 else loss

    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.2, loss_fn=loss_fn)
    before = params_of(accelerator.unwrap_model(model))
    _loop(accelerator, model, loader, optimizer, sam, n_micro=1)
    after = params_of(accelerator.unwrap_model(model))
    assert len(calls) == 2
    assert optimizer.step_was_skipped
    assert scaler.get_scale() == 2.0**9  # backed off
    for k in before:
        assert torch.equal(before[k], after[k]), k  # restored by copy: no NaN, no step


def test_deepspeed_and_bad_settings_are_refused_before_anything_changes():
    fake = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ConfigurationError, match="DeepSpeed"):
        check_distributed_type(fake)
    with pytest.raises(ConfigurationError, match="DeepSpeed"):
        SharpnessAwareMinimization(fake, torch.nn.Linear(2, 2), None)
    accelerator, _, model, optimizer, _ = _setup(ga=1)
    with pytest.raises(ConfigurationError, match="rho"):
        SharpnessAwareMinimization(accelerator, model, optimizer, rho=-0.1)


class _CountingMonitor:
    def __init__(self):
        self.steps = []

    def on_step_end(self, step, model, optimizer=None, loss=None, batch=None, started=None):
        self.steps.append(step)
        return {"sharpness/lambda_max": float(step)} if step % 2 == 0 else {}

    def state_dict(self):
        return {"steps": list(self.steps)}

    def load_state_dict(self, state):
        self.steps = list(state["steps"])


def test_monitor_step_runs_only_on_sync_steps():
    accelerator, _, model, optimizer, loader = _setup(ga=2)
    monitor = _CountingMonitor()
    helper = MonitorStep(accelerator, monitor)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.1)
    out = []
    it = iter(loader)
    for _ in range(6):
        batch = next(it)
        with accelerator.accumulate(model):
            sam.backward(batch)
            optimizer.step()
            optimizer.zero_grad()
            out.append(helper.step(model, optimizer=optimizer))
    assert monitor.steps == [1, 2, 3]  # 6 micro-batches, GA=2: three optimizer steps
    assert out == [{}, {}, {}, {"sharpness/lambda_max": 2.0}, {}, {}]
    state = helper.state_dict()
    resumed = MonitorStep(accelerator, _CountingMonitor())
    resumed.load_state_dict(state)
    assert resumed.global_step == 3 and resumed.monitor.steps == [1, 2, 3]


def test_an_error_in_the_perturbed_pass_restores_the_weights():
    accelerator, _, model, optimizer, loader = _setup(ga=1)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 2:  # the perturbed pass
            raise RuntimeError("boom")
        return m(**batch).loss

    sam = SharpnessAwareMinimization(accelerator, model, optimizer, rho=0.5, loss_fn=loss_fn)
    before = params_of(accelerator.unwrap_model(model))
    with pytest.raises(RuntimeError, match="boom"):
        with accelerator.accumulate(model):
            sam.backward(next(iter(loader)))
    after = params_of(accelerator.unwrap_model(model))
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_state_dict_resume_is_bitwise_for_looksam():
    """LookSAM k=2: the 2nd step reuses the g_v of the 1st, so stopping after one optimizer step and
    resuming equals never stopping only if the wrapper's own state is saved with the optimizer's."""
    accelerator, _, model, optimizer, loader = _setup(ga=1, lr=0.1)
    sam = SharpnessAwareMinimization(accelerator, model, optimizer, variant="looksam", k=2, rho=0.5)
    batches = [{k: v.clone() for k, v in b.items()} for _, b in zip(range(3), loader)]

    def run(sam, model, optimizer, chunk):
        for batch in chunk:
            with accelerator.accumulate(model):
                sam.backward(batch)
                optimizer.step()
                optimizer.zero_grad()

    run(sam, model, optimizer, batches[:1])
    saved = {
        "model": {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "sam": sam.state_dict(),
    }
    assert saved["sam"]["sam"]["step"] == 1 and saved["sam"]["sam"]["buffers"]["gv"]
    run(sam, model, optimizer, batches[1:])
    want = params_of(accelerator.unwrap_model(model))

    def resume(load_sam_state):
        model2 = tiny_bert()
        model2.load_state_dict(saved["model"])
        optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1)
        model2, optimizer2 = accelerator.prepare(model2, optimizer2)
        optimizer2.load_state_dict(saved["optimizer"])
        sam2 = SharpnessAwareMinimization(accelerator, model2, optimizer2, variant="looksam", k=2, rho=0.5)
        if load_sam_state:
            sam2.load_state_dict(saved["sam"])
        run(sam2, model2, optimizer2, batches[1:])
        return params_of(accelerator.unwrap_model(model2))

    got = resume(True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the negative control: without the wrapper's state the resumed run ends elsewhere
    other = resume(False)
    assert any(not torch.equal(other[k], want[k]) for k in want)
