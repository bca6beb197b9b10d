"""Out-of-range class indices in a monitor's probe (or any batch through the default loss) are one sentence,
not torch's raw IndexError, and the check that finds them changes nothing."""

import pytest
import torch
import torch.nn.functional as F

from sharpguard._batches import default_loss_fn
from sharpguard.errors import ConfigurationError
from sharpguard.monitor import SharpnessMonitor
from sharpguard.monitor.driver import MonitorDriver


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def test_default_loss_in_range_is_torch_cross_entropy_bitwise():
    model, x = _model(), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    model.eval()
    assert torch.equal(default_loss_fn(model, (x, y)), F.cross_entropy(model(x), y))


@pytest.mark.parametrize("bad", [3, 7, -2])
def test_default_loss_names_the_labels_and_the_output_size(bad):
    model, x = _model(), torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, bad, 1, 0])
    with pytest.raises(ConfigurationError, match=r"class indices in \[.*\] for a model with 3 outputs"):
        default_loss_fn(model, (x, y))


def test_language_model_targets_keep_ignore_index_and_refuse_out_of_range():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 5)
    x = torch.randint(0, 5, (2, 3))
    y = torch.tensor([[1, -100, 2], [0, 4, -100]])
    assert torch.isfinite(default_loss_fn(emb, (x, y)))
    y[0, 0] = 9
    with pytest.raises(ConfigurationError, match="or -100 to ignore a position"):
        default_loss_fn(emb, (x, y))


@pytest.mark.parametrize("micro_batches", ["auto", 1, 2])
def test_monitor_with_out_of_range_probe_labels_says_so_at_its_first_check_and_changes_nothing(micro_batches):
    model = _model()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    y[5] = 11
    monitor = SharpnessMonitor(probe=[(x, y)], every_n_steps=1, micro_batches=micro_batches)
    driver = MonitorDriver(monitor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(ConfigurationError, match="for a model with 3 outputs") as info:
        driver.step(model, step=1)
    assert "IndexError" not in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and model.training
