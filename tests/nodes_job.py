"""An FSDP2 job for simulated nodes (torchrun agents with --nnodes/--node_rank on 127.0.0.1).

    nodes_job.py RUN_DIR OUT_DIR --remote-uri URI --storage-options JSON [--hidden H] [--fail-after K]

Without a checkpoint (remote or local) it trains a few Adam steps, saves epoch 0 with its optimizer,
waits for the upload and writes torch's full view of the saved state to ``OUT/ref.safetensors``
and ``OUT/ref_optim.safetensors``. With one, it builds the model on meta, shards it, resumes with
``load_into`` and writes the same two files as ``OUT/resumed*.safetensors`` (rank 0) before any
step. ``--fail-after K``: on the node with GROUP_RANK 1, the store fails every ranged read after
its first K (as a dropped connection does); each rank then prints ``FAILED <error type>`` and
exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from archs import MLPArch
from safetensors.torch import save_file
from sharded_job import FULL, flat_optim, shard
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import ckptio

ENV = {"obs_dim": 8, "num_actions": 4}


def fail_reads_after(count: int) -> None:
    import s3fs

    real = s3fs.S3FileSystem._cat_file
    calls = {"n": 0}

    async def failing(self, path, *args, **kwargs):
        if kwargs.get("start") is not None:
            calls["n"] += 1
            if calls["n"] > count:
                raise ConnectionResetError("connection reset by peer (injected)")
        return await real(self, path, *args, **kwargs)

    s3fs.S3FileSystem._cat_file = failing


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--remote-uri", required=True)
    p.add_argument("--storage-options", required=True)
    p.add_argument("--hidden", type=int, default=1020)
    p.add_argument("--fail-after", type=int)
    args = p.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    if args.fail_after is not None and os.environ.get("GROUP_RANK") == "1":
        fail_reads_after(args.fail_after)
    arch = MLPArch(hidden=args.hidden)
    config = ckptio.CheckpointConfig(
        remote_uri=args.remote_uri, remote_storage_options=json.loads(args.storage_options)
    )
    ckpt = ckptio.Checkpointer(args.run_dir, arch, config)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = shard(arch.make_policy(ENV), "fsdp", world)
    model.to_empty(device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    try:
        resumed = ckpt.load_into(model, opt)
    except ckptio.CheckpointError as e:
        print(f"FAILED {type(e).__name__}: {e}", flush=True)
        return 3
    if not resumed:
        for q in model.parameters():
            torch.nn.init.normal_(q.to_local(), std=0.05)
        for b in model.buffers():  # to_empty left them uninitialized (NaN, sometimes)
            b.zero_()
        gen = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, ENV["obs_dim"], generator=gen)).pow(2).mean().backward()
            opt.step()
        ckpt.save(model, 0, {"loss": 1.0}, optimizer=opt)
    sd = get_model_state_dict(model, options=FULL)
    osd = get_optimizer_state_dict(model, opt, options=FULL)
    if dist.get_rank() == 0:
        name = "resumed" if resumed else "ref"
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(args.out, f"{name}.safetensors"))
        save_file(flat_optim(osd), os.path.join(args.out, f"{name}_optim.safetensors"))
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
