"""A plain 2-rank gloo job using the Checkpointer and no barrier of its own before destroying the group.

The master's last save is slowed (a slow disk), so a rank that returned from close() before the
master finished would find the last checkpoint missing, and would tear gloo down under the master.
"""

from __future__ import annotations

import errno
import os
import sys
import time

import torch
import torch.distributed as dist
from archs import ENV, MLPArch

import ckptio

EPOCHS = 3


def main() -> int:
    run_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if sys.argv[2:] in (["broken-manifest"], ["broken-listing"]):
        # the master cannot read the run's manifest, or list its checkpoints: every rank must learn it
        if rank == 0 and sys.argv[2] == "broken-manifest":
            os.makedirs(os.path.join(run_dir, "checkpoints", "model_architecture.json"))
        elif rank == 0:
            real_listdir = ckptio.storage.Storage.listdir

            def broken_listdir(self):
                if self.root.endswith("checkpoints"):
                    raise OSError(errno.EIO, "Input/output error")
                return real_listdir(self)

            ckptio.storage.Storage.listdir = broken_listdir
        try:
            ckptio.Checkpointer(run_dir, MLPArch()).load_or_create_policy(ENV)
        except ckptio.CheckpointError as e:
            print(f"rank {rank}: {type(e).__name__}: {e}", flush=True)
            dist.destroy_process_group()
            return 4
        return 0
    if rank == 0:  # a slow disk for the last checkpoint's weights
        real = ckptio.storage.Storage.write

        def slow_write(self, name, writer, **kw):
            if name.endswith(f".e{EPOCHS:08d}.safetensors"):
                time.sleep(1.0)
            return real(self, name, writer, **kw)

        ckptio.storage.Storage.write = slow_write
    ckpt = ckptio.Checkpointer(run_dir, MLPArch(), ckptio.CheckpointConfig(async_save=True))
    model = ckpt.load_or_create_policy(ENV)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for epoch in range(1, EPOCHS + 1):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, ENV["obs_dim"])).pow(2).mean().backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            opt.step()
        ckpt.save(model, epoch, {"epoch": epoch}, {"optimizer": opt.state_dict()})
    ckpt.close()
    # close() returned on every rank only once the master's last checkpoint was committed
    last = ckptio.latest(run_dir).epoch
    print(f"rank {rank}: latest after close {last}", flush=True)
    dist.destroy_process_group()
    return 0 if last == EPOCHS else 3


if __name__ == "__main__":
    sys.exit(main())
