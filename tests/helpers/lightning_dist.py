"""A callback for the Lightning ``ddp_spawn`` tests (module level, so Lightning can pickle it to the workers)."""

from __future__ import annotations

import gc

import torch.distributed as dist

from sharpguard.integrations._lightning_namespace import pl


class LeaveTogether(pl.Callback):
    """At teardown, free what holds the gloo group and leave it together with the other rank.

    Lightning leaves the process group to interpreter exit, where a worker whose peer already tore
    gloo down can die with SIGABRT (seen in CI); ``tests/helpers/distributed.py`` does the same for mp.spawn.
    """

    def teardown(self, trainer, pl_module, stage):
        if dist.is_available() and dist.is_initialized():
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
