"""Helpers for the two-process tests that run over gloo on CPU with ``torch.multiprocessing.spawn``."""

from __future__ import annotations

import contextlib
import datetime
import gc
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """Join a gloo group for the body; leave it together with the other ranks.

    On success the ranks free what holds the group (DDP reducers sit in reference cycles) and meet at a
    barrier before destroying it: a rank left to tear gloo down at interpreter exit while the other is
    still talking to it can die with SIGABRT. After an exception there is no barrier (the other rank may
    never reach it); the timeout turns a hang into a failure.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def exit_torchrun_worker() -> None:
    """End a torchrun worker whose results are on disk: leave the process group together with the other
    ranks, then skip interpreter teardown.

    DDP reducers sit in reference cycles (collected first); an exit with a live gloo group, or a gloo/DDP
    thread destructor run at interpreter teardown, can abort the process under load ('terminate called
    without an active exception') after the work has passed.
    """
    import os
    import sys

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker: Callable[..., Any], *args: Any, nprocs: int = 2) -> None:
    """Run ``worker(rank, port, *args)`` in ``nprocs`` processes and wait for all of them."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=True)
