"""The step engine drives any object of the step protocol, not only SAM: a hand-written float64 SAM
that shares no code with sharpguard's, run through ``SAMEngine``, lands on the closed form of one
SAM step (Foret et al., ICLR 2021, eqs. 2-3) on a quadratic, and so does ``SAM.step``. The engine
says which pass is running (``current_pass`` / ``in_perturbed_pass``) and unwraps protocol objects."""

from __future__ import annotations

import torch

from sharpguard.optim import SAM, SAMEngine, unwrap_optimizer
from sharpguard.optim.engine import current_pass, in_perturbed_pass
from sharpguard.optim.protocol import SAMStepProtocol
from sharpguard.optim.sharded import ShardedSAM

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, -0.3], [0.0, -0.3, 1.0]], dtype=torch.float64)
W0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
RHO, LR = 0.1, 0.05


def closed_form_step() -> torch.Tensor:
    """One SAM step on L(w) = w^T A w / 2 by hand: g = A w, e = rho g / ||g||, w - lr A (w + e)."""
    g = A @ W0
    e = RHO * g / torch.linalg.vector_norm(g)
    return W0 - LR * (A @ (W0 + e))


class HandSAM:
    """The step protocol in plain tensor code over one parameter (no sharpguard code inside)."""

    def __init__(self, param: torch.nn.Parameter, rho: float, lr: float) -> None:
        self.base_optimizer = torch.optim.SGD([param], lr=lr)
        self.param, self.rho = param, rho
        self._pass_params: list[torch.Tensor] = []
        self._saved: torch.Tensor | None = None
        self.calls: list[str] = []

    def needs_second_pass(self) -> bool:
        return True

    def prepare(self) -> None:
        self.calls.append("prepare")

    @torch.no_grad()
    def perturb(self) -> bool:
        self.calls.append("perturb")
        g = self.param.grad
        self._pass_params = [self.param]
        self._saved = self.param.detach().clone()
        self.param.add_(self.rho * g / torch.linalg.vector_norm(g))
        return True

    def advance(self) -> bool:
        self.calls.append("advance")
        return False

    @torch.no_grad()
    def unperturb(self) -> None:
        self.calls.append("unperturb")
        self.param.copy_(self._saved)

    @torch.no_grad()
    def cancel(self) -> None:
        self.calls.append("cancel")
        if self._saved is not None:
            self.param.copy_(self._saved)


def _loss(param: torch.Tensor) -> torch.Tensor:
    return 0.5 * param @ (A @ param)


def test_the_engine_drives_a_protocol_object_that_is_not_a_sam_to_the_closed_form():
    param = torch.nn.Parameter(W0.clone())
    hand = HandSAM(param, RHO, LR)
    assert isinstance(hand, SAMStepProtocol)
    engine = SAMEngine(hand)
    seen = []

    def replay() -> None:
        seen.append((current_pass().kind, in_perturbed_pass()))
        _loss(param).backward()

    engine.record(replay)
    seen.append((current_pass().kind, in_perturbed_pass()))
    _loss(param).backward()  # the framework's own clean pass
    assert engine.finish() is True
    hand.base_optimizer.step()
    assert seen == [("clean", False), ("perturbed", True)]
    assert current_pass() is None and not in_perturbed_pass()
    assert hand.calls == ["prepare", "perturb", "advance", "unperturb"]
    torch.testing.assert_close(param.detach(), closed_form_step(), rtol=0, atol=1e-14)


def test_sam_step_reaches_the_same_closed_form():
    param = torch.nn.Parameter(W0.clone())
    opt = SAM([param], torch.optim.SGD, rho=RHO, lr=LR)
    opt.step(lambda: _loss(param).backward())
    torch.testing.assert_close(param.detach(), closed_form_step(), rtol=0, atol=1e-14)


def test_a_replay_that_raises_puts_w_back_through_the_protocol():
    param = torch.nn.Parameter(W0.clone())
    hand = HandSAM(param, RHO, LR)
    engine = SAMEngine(hand)

    def replay() -> None:
        raise RuntimeError("boom")

    engine.record(replay)
    _loss(param).backward()
    try:
        engine.finish()
    except RuntimeError:
        pass
    assert hand.calls[-1] == "cancel" and current_pass() is None
    assert torch.equal(param.detach(), W0)


def test_unwrap_optimizer_looks_through_any_protocol_object():
    param = torch.nn.Parameter(W0.clone())
    hand = HandSAM(param, RHO, LR)
    assert unwrap_optimizer(hand) is hand.base_optimizer
    sam = SAM([torch.nn.Parameter(W0.clone())], torch.optim.SGD, lr=LR)
    assert unwrap_optimizer(sam) is sam.base_optimizer
    sharded = ShardedSAM(torch.optim.SGD([torch.nn.Parameter(W0.clone())], lr=LR), rho=RHO)
    assert isinstance(sharded, SAMStepProtocol) and unwrap_optimizer(sharded) is sharded.base_optimizer
    plain = torch.optim.SGD([param], lr=LR)
    assert unwrap_optimizer(plain) is plain
    assert not isinstance(plain, SAMStepProtocol)
