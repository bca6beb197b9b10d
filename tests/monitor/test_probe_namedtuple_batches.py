"""Namedtuple batches stay namedtuples through the monitor: the probe set's copies, its captures, the
micro-batch split and the measured batch all go through the one batch walker (``_batches.apply_to_tensors``).

The probe set's copies once came back as plain tuples, so a ``loss_fn`` that reads ``batch.inputs`` failed.
The measurement is checked against the dense Hessian of a least-squares loss in float64.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

from sharpguard.monitor import ProbeSet, SharpnessMonitor

Example = namedtuple("Example", "inputs targets")


def _squared_error(model: nn.Module, batch: Example) -> torch.Tensor:
    return ((model(batch.inputs).squeeze(-1) - batch.targets) ** 2).mean()


def _batches(sizes: list[int], d: int = 5) -> list[Example]:
    g = torch.Generator().manual_seed(3)
    return [Example(torch.randn(n, d, generator=g, dtype=torch.float64),
                    torch.randn(n, generator=g, dtype=torch.float64)) for n in sizes]


def test_a_captured_probe_keeps_namedtuples_and_their_values():
    batch = _batches([5])[0]
    probe = ProbeSet(size=6, batch_size=4)
    probe.capture(batch)  # 4 examples into the first probe batch, the fifth into the next
    assert not probe.ready
    probe.capture(_batches([3])[0]._replace(inputs=torch.zeros(3, 5, dtype=torch.float64)))
    assert probe.ready
    held = probe.batches
    assert [type(b) for b in held] == [Example, Example, Example]
    assert [len(b.targets) for b in held] == [4, 1, 1]
    assert torch.equal(held[0].inputs, batch.inputs[:4]) and torch.equal(held[1].targets, batch.targets[4:])
    assert held[0].inputs.data_ptr() != batch.inputs.data_ptr()  # copies, not views of the training batch
    assert torch.count_nonzero(held[2].inputs) == 0


def test_monitor_measures_namedtuple_probe_batches_against_the_dense_hessian():
    batches = _batches([6, 4])
    model = nn.Linear(5, 1, bias=False).double()
    # L(w) = mean over all examples of (x.w - y)^2, so H = 2 X^T X / N (the probe's size-weighted mean)
    x = torch.cat([b.inputs for b in batches])
    want = float(torch.linalg.eigvalsh(2 * x.T @ x / len(x))[-1])
    for micro_batches in (1, 2):  # 2: every probe batch is split by the walker too
        monitor = SharpnessMonitor(["lambda_max"], probe=batches, loss_fn=_squared_error,
                                   micro_batches=micro_batches, measure_kwargs={"lambda_max": {"tol": 1e-10}})
        assert all(type(b) is Example for b in monitor.probe.batches)
        got = monitor.measure(model)["sharpness/lambda_max"]
        assert abs(got - want) <= 1e-8 * want, (micro_batches, got, want)
