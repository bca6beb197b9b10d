"""A RobustnessMonitor check keeps within a training step's memory: its attacks run each probe batch in as
many parts as that needs (``RobustnessMonitor._attack_parts``), chosen from what the model's forward saves
and the input-sized tensors an attack holds. Checked on Hugging Face's ViT built from its config, on fake
tensors (``FakeTensorMode``, MemTracker), and on a small CNN, whose batches stay whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.initialization import no_init_weights

from sharpguard.monitor import RobustnessMonitor
from sharpguard.simulate import fake_tensors, profile_step


class _Logits(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=pixel_values).logits


@pytest.mark.filterwarnings("ignore:The module hierarchy tracking")
def test_vit_check_stays_within_the_training_step():
    with fake_tensors():
        with no_init_weights():  # trunc_normal_ reads a value, which fake tensors do not have
            model = _Logits(ViTForImageClassification(ViTConfig(num_labels=1000, num_hidden_layers=2,
                                                                attn_implementation="sdpa")))
        batch = (torch.rand(64, 3, 224, 224), torch.randint(0, 1000, (64,)))
        opt = torch.optim.AdamW(model.parameters())

        def train() -> None:
            nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        train()
        step = profile_step(train, model=model, optimizers=[opt], inputs=[batch]).memory.peak_bytes
        monitor = RobustnessMonitor(probe=[batch], alerts=None)
        check = profile_step(lambda: monitor.measure(model, opt), model=model, optimizers=[opt],
                             inputs=[batch]).memory.peak_bytes
        whole = RobustnessMonitor(probe=[batch], alerts=None)
        whole._attack_parts = lambda model, batches: 1  # the attacks on whole batches, as before
        unsplit = profile_step(lambda: whole.measure(model, opt), model=model, optimizers=[opt],
                               inputs=[batch]).memory.peak_bytes
    assert monitor._parts[1] >= 2
    assert check <= step < unsplit


def test_small_images_stay_whole_and_the_accuracies_are_those_of_the_whole_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    monitor = RobustnessMonitor(measures=("clean_acc", "pgd_acc"), probe=[(x, y)], alerts=None)
    metrics = monitor.measure(model)
    assert monitor._parts[1] == 1
    whole = RobustnessMonitor(measures=("clean_acc", "pgd_acc"), probe=[(x, y)], alerts=None)
    whole._attack_parts = lambda model, batches: 1
    assert whole.measure(model) == metrics
