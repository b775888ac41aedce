"""One rank fails inside a collective operation; every rank must raise, promptly (run under torchrun by tests).

    fail_together_job.py RUN_DIR MODE [--remote URI --options JSON]

Modes:
- ``download``: resuming from object storage, the node's first rank fails to fill the node cache;
- ``load``: rank 1 fails to load its part of a checkpoint (``load_into``);
- ``close``: the master's last save, in the background, fails; ``close()`` is where it surfaces.

Each rank writes ``rank R: ErrorType: message`` to ``rank{R}.txt`` beside RUN_DIR and exits 4 when it
raised, 0 when nothing raised.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

import torch.distributed as dist
from archs import ENV, MLPArch

import ckptio
import ckptio.cache
import ckptio.sharded
import ckptio.storage


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("mode", choices=["download", "load", "close"])
    p.add_argument("--remote")
    p.add_argument("--options", default="{}")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = ckptio.CheckpointConfig(
        remote_uri=args.remote, remote_storage_options=json.loads(args.options), async_save=args.mode == "close"
    )

    def fail(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    ckpt = ckptio.Checkpointer(args.run_dir, MLPArch(), config)
    try:
        if args.mode == "download":  # the remote holds the run's only checkpoint (the test put it there)
            if rank == 0:
                ckptio.cache.NodeCache.fetch = fail
            ckpt.load_or_create_policy(ENV)
        elif args.mode == "load":
            model = ckpt.load_or_create_policy(ENV)
            ckpt.save(model, 1)
            ckpt.wait()
            if rank == 1:
                ckptio.sharded.load_model_state = fail
            ckpt.load_into(model)
        else:
            model = ckpt.load_or_create_policy(ENV)
            if rank == 0:
                ckptio.storage.Storage.write = fail
            ckpt.save(model, 1)  # returns at once: the write fails in the background
            ckpt.close()
    except Exception as e:  # the failing rank's own error; the others' must be a ckptio error naming it
        # a file per rank: the ranks' stdout lines interleave in torchrun's output
        with open(os.path.join(os.path.dirname(args.run_dir), f"rank{rank}.txt"), "w") as f:
            f.write(f"rank {rank}: {type(e).__name__}: {e}")
        dist.destroy_process_group()
        return 4
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
