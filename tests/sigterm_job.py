"""A training process preempted right after an async save returned (SIGTERM, as schedulers and torchrun send it).

    sigterm_job.py RUN_DIR REMOTE_URI STORAGE_OPTIONS_JSON GO_FILE [--leave-sigterm-alone]

Saves epoch 1 asynchronously with a remote copy, prints ``SAVED`` once ``save`` returned, then trains on
(a loop) until a signal ends it. Uploads are held until ``GO_FILE`` exists (a slow network: the first
upload prints ``UPLOADING`` and waits), so the test can send SIGTERM while the checkpoint is in flight.
``--leave-sigterm-alone``: ``CheckpointConfig(sigterm_finish_s=None)``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from archs import ENV, MLPArch

import ckptio
from ckptio.storage import Storage


def main() -> int:
    run_dir, remote, options, go = sys.argv[1:5]
    real = Storage.put_file

    def slow(self, local_path, name, **kw):
        print("UPLOADING", flush=True)
        while not os.path.exists(go):
            time.sleep(0.01)  # the network is slow (the job's own wait, not the test's synchronisation)
        return real(self, local_path, name, **kw)

    Storage.put_file = slow
    config = ckptio.CheckpointConfig(
        remote_uri=remote, remote_storage_options=json.loads(options), async_save=True,
        sigterm_finish_s=None if "--leave-sigterm-alone" in sys.argv else 25.0,
    )  # fmt: skip
    ckpt = ckptio.Checkpointer(run_dir, MLPArch(hidden=64), config)
    policy = ckpt.load_or_create_policy(ENV)
    ckpt.save(policy, 1, {"loss": 1.0}, force=True)
    print("SAVED", flush=True)
    while True:  # training goes on until the scheduler's signal
        policy(torch.randn(4, ENV["obs_dim"])).sum().backward()


if __name__ == "__main__":
    sys.exit(main())
