"""What SAM costs on top of the work it cannot avoid, side by side with pytorch_optimizer's SAM.

(a) The wrapper's own work with the gradients given (norm + perturb + restore + base step) on a
    model of 200 small tensors: sharpguard's ``perturb(); unperturb(); base.step()`` against
    pytorch_optimizer's ``first_step(); second_step()``. Target: at most 0.65x its time, with the
    default fault policy (``nonfinite="skip"``: its check is one fused pass over the gradients).
(b) A whole SAM step (two forward/backward passes + the wrapper) against two plain optimizer steps
    on a small conv net (~8 ms a step). Target: at most 1.05x.
(c) LookSAM (k=5) and SAM every 5 steps (``interval=5``) against one plain step, averaged over
    whole periods. Target: about 1.2x (the 1 + 1/k passes they cost).

Measurements are interleaved (A, B, A, B, ...): per round the median of a few calls, over rounds
the minimum (the least disturbed round on a shared machine), on one intra-op thread.
Run: ``python benchmarks/sam_overhead.py`` (under a minute); it rewrites the "SAM overhead" section
of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn


if __package__:  # imported as part of the benchmarks package (by the tests, or python -m benchmarks.X)
    from benchmarks._results import machine, timed, write_section
else:  # run as python benchmarks/sam_overhead.py: this folder is sys.path[0]
    from _results import machine, timed, write_section

from sharpguard.optim import SAM, LookSAM  # noqa: E402


def interleaved(fns: dict[str, callable], rounds: int, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Seconds per call of each function, measured in alternating rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    # Per round the median of ``repeats`` calls; over rounds the minimum: on a shared machine the
    # quietest round is the closest to the cost of the work itself, for every contestant alike.
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(statistics.median(timed(fn, repeats)))
    return {k: min(v) for k, v in samples.items()}


# ------------------------------------------------------------------------------------ (a) wrapper
def wrapper_only() -> tuple[float, float, float, int]:
    from pytorch_optimizer import SAM as PeerSAM

    def model():
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(32, 32) for _ in range(100)])  # 200 tensors

    ours_model, peer_model = model(), model()
    ours = SAM(ours_model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9)
    peer = PeerSAM(peer_model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9)
    for m in (ours_model, peer_model):
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-2

    def ours_step():
        ours.perturb()
        ours.unperturb()
        ours.base_optimizer.step()

    def peer_step():
        peer.first_step(zero_grad=False)
        peer.second_step(zero_grad=False)

    base = torch.optim.SGD(model().parameters(), lr=1e-3, momentum=0.9)  # the step both must take
    for group in base.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p) * 1e-2
    t = interleaved({"ours": ours_step, "peer": peer_step, "base": base.step}, rounds=15, repeats=20)
    return t["ours"], t["peer"], t["base"], sum(1 for _ in ours_model.parameters())


# ------------------------------------------------------------------------------- (b), (c) conv net
def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def whole_steps(batch: int = 48) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)
    loss_fn = nn.functional.cross_entropy

    plain_model, sam_model, look_model, every_model = conv_net(), conv_net(), conv_net(), conv_net()
    plain = torch.optim.SGD(plain_model.parameters(), lr=1e-3, momentum=0.9)
    sam = SAM(sam_model.parameters(), torch.optim.SGD, lr=1e-3, momentum=0.9, model=sam_model)
    look = LookSAM(look_model.parameters(), torch.optim.SGD, k=5, lr=1e-3, momentum=0.9, model=look_model)
    every = SAM(every_model.parameters(), torch.optim.SGD, interval=5, lr=1e-3, momentum=0.9, model=every_model)

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        return closure

    plain_closure = closure_for(plain_model, plain)

    def plain_step():
        plain_closure()
        plain.step()

    def two_plain_steps():
        plain_step()
        plain_step()

    def steps_of(opt, model, n):
        closure = closure_for(model, opt)

        def run():
            for _ in range(n):
                opt.step(closure)

        return run

    t = interleaved(
        {
            "plain": plain_step,
            "two_plain": two_plain_steps,
            "sam": steps_of(sam, sam_model, 1),
            "plain5": lambda: [plain_step() for _ in range(5)],
            "looksam5": steps_of(look, look_model, 5),
            "interval5": steps_of(every, every_model, 5),
        },
        rounds=15,
        repeats=3,
    )
    return t


def main() -> None:
    torch.set_num_threads(1)
    ours, peer, base, n_tensors = wrapper_only()
    t = whole_steps()
    rows = [
        ("(a) wrapper work, grads given, %d tensors: sharpguard vs pytorch_optimizer SAM" % n_tensors,
         f"{ours * 1e3:.3f} ms", f"{peer * 1e3:.3f} ms", ours / peer, "<= 0.65"),
        ("(a') the same without the base SGD step both take (%.3f ms)" % (base * 1e3),
         f"{(ours - base) * 1e3:.3f} ms", f"{(peer - base) * 1e3:.3f} ms", (ours - base) / (peer - base), "-"),
        ("(b) whole SAM step vs two plain SGD steps (conv net)",
         f"{t['sam'] * 1e3:.2f} ms", f"{t['two_plain'] * 1e3:.2f} ms", t["sam"] / t["two_plain"], "<= 1.05"),
        ("(c) LookSAM k=5, mean step vs one plain step",
         f"{t['looksam5'] / 5 * 1e3:.2f} ms", f"{t['plain5'] / 5 * 1e3:.2f} ms", t["looksam5"] / t["plain5"], "~ 1.2"),
        ("(c) SAM interval=5, mean step vs one plain step",
         f"{t['interval5'] / 5 * 1e3:.2f} ms", f"{t['plain5'] / 5 * 1e3:.2f} ms", t["interval5"] / t["plain5"],
         "~ 1.2"),
    ]
    lines = [
        f"Machine: {machine()}. One intra-op thread; interleaved rounds, min over rounds of the per-round median.",
        f"Plain SGD step of the conv net: {t['plain'] * 1e3:.2f} ms.",
        "",
        "| measurement | ours | reference | ratio | target |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {a} | {b} | {r:.2f}x | {target} |" for name, a, b, r, target in rows]
    table = "\n".join(lines)
    print(table)
    write_section("SAM overhead", table)


if __name__ == "__main__":
    main()
