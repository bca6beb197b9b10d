import pytest
import torch
from torch import nn

from sharpguard._batches import as_batches, checked_loss, default_loss_fn
from sharpguard._state import side_effect_free
from sharpguard.errors import ConfigurationError, NonFiniteLossError


def _model():
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    m[1].eval()  # a frozen-BN block inside a training model
    return m


def test_side_effect_free_restores_everything_even_on_error():
    m = _model()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    default_loss_fn(m, (x, y)).backward()
    before_params = [p.detach().clone() for p in m.parameters()]
    before_grads = [p.grad for p in m.parameters()]
    before_grad_values = [g.clone() for g in before_grads]
    before_buffers = [b.clone() for b in m.buffers()]
    before_modes = [mod.training for mod in m.modules()]
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="boom"):
        with side_effect_free(m, train=True):
            m.train()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(1.0)
            default_loss_fn(m, (x, y)).backward()
            torch.randn(3)
            raise RuntimeError("boom")
    assert all(torch.equal(a, p) for a, p in zip(before_params, m.parameters()))
    assert all(g is p.grad for g, p in zip(before_grads, m.parameters()))
    assert all(torch.equal(v, p.grad) for v, p in zip(before_grad_values, m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_buffers, m.buffers()))
    assert before_modes == [mod.training for mod in m.modules()]
    assert torch.equal(rng, torch.get_rng_state())


def test_batches_protocol_and_errors():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    assert len(as_batches((x, y))) == 1
    assert len(as_batches([x, y])) == 1
    assert len(as_batches([(x, y), (x, y)])) == 2
    with pytest.raises(ConfigurationError, match="empty"):
        as_batches([])
    with pytest.raises(ConfigurationError, match="scalar"):
        checked_loss(torch.ones(3))
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        checked_loss(torch.tensor(float("nan")))
