"""A sharded job that checkpoints with torch.distributed.checkpoint (DCP), as most FSDP2 stacks do, or resumes with
ckptio from a run converted from such a checkpoint.

    dcp_job.py save DCP_URI OUT --mode fsdp|tp [--storage-options JSON]
    dcp_job.py resume RUN_DIR OUT --mode fsdp

``save``: a few AdamW steps, then ``dcp.save`` of ``{"model", "optimizer", "lr_scheduler", "train_state"}`` (through
fsspec's writer for a URI with a scheme), and rank 0 writes torch's full state dicts to ``OUT/ref.safetensors``
and ``OUT/ref_optim.safetensors``. ``resume``: builds the model on meta, shards it at this world size, resumes with
``Checkpointer.load_into(model, optimizer)`` and writes the same two files as ``OUT/resumed*.safetensors``, with
the trainer state ckptio restored as ``OUT/trainer_state.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from archs import MLPArch
from sharded_job import ENV, dump, shard
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import ckptio


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["save", "resume"])
    p.add_argument("where")
    p.add_argument("out")
    p.add_argument("--mode", default="fsdp")
    p.add_argument("--storage-options", default="{}")
    args = p.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    arch = MLPArch(hidden=16)
    if args.action == "save":
        torch.manual_seed(0)
        model = shard(arch.make_policy(ENV), args.mode, world)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, ENV["obs_dim"], generator=gen)).pow(2).mean().backward()
            opt.step()
        state = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, opt),
            "lr_scheduler": {"last_epoch": 3, "_step_count": 4},
            "train_state": {"step": 7},
        }
        if "://" in args.where:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            dcp.save(state, storage_writer=FsspecWriter(args.where, **json.loads(args.storage_options)))
        else:
            dcp.save(state, checkpoint_id=args.where)
        dump(model, opt, args.out, "ref")
    else:
        ckpt = ckptio.Checkpointer(args.where, arch)
        with torch.device("meta"):
            model = shard(arch.make_policy(ENV), args.mode, world)
        model.to_empty(device="cpu")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        assert ckpt.load_into(model, opt)
        dump(model, opt, args.out, "resumed")
        if dist.get_rank() == 0:
            with open(os.path.join(args.out, "trainer_state.json"), "w") as f:
                json.dump({"epoch": ckpt.resumed_from.epoch, "user": ckpt.trainer_state}, f)
        ckpt.close()
    # torch's own object collectives (DCP's, get_*_state_dict's) hand gloo tensors that its worker threads release
    # later, which can abort a process destroying its group meanwhile (see ckptio.ranks.Handoff): every rank
    # reaches this point, its files closed, then leaves without running the group's destructor
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
