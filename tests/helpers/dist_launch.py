"""Launch a two-process CPU script with torchrun and check per-worker SAM against a reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # the repository root: the launched scripts import tests.helpers from there


def torchrun(script: str, out: Path, timeout: int = 120) -> list[dict]:
    """Run ``script out`` on 2 CPU processes (gloo); return each rank's saved {"seen", "params"}."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GLOO_SOCKET_IFNAME="lo",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE / script),
           str(out)]
    proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def check_per_worker_sam(ranks: list[dict], micro_per_step: int, *, lr: float, rho: float) -> None:
    """Ranks end bitwise identical, and equal to per-worker SAM rebuilt from each rank's batches."""
    from tests.helpers.tiny_text import params_of, sam_reference, tiny_bert

    p0, p1 = ranks[0]["params"], ranks[1]["params"]
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"ranks differ in {k}"
    seen = [r["seen"] for r in ranks]
    assert not torch.equal(seen[0][0]["input_ids"], seen[1][0]["input_ids"])  # really sharded data
    n_steps = len(seen[0]) // micro_per_step
    per_worker = [
        [s[t * micro_per_step : (t + 1) * micro_per_step] for s in seen] for t in range(n_steps)
    ]
    start = tiny_bert()
    want = params_of(sam_reference(start, [], lr=lr, rho=rho, per_worker=per_worker))
    for k in want:
        torch.testing.assert_close(p0[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # e from the averaged gradient (one all-reduce more) ends elsewhere: the test can tell them apart
    synced = [[sum((w for w in step), [])] for step in per_worker]
    other = params_of(sam_reference(start, [], lr=lr, rho=rho, per_worker=synced))
    assert any(not torch.allclose(p0[k], other[k], rtol=1e-5, atol=1e-6) for k in want)
