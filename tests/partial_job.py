"""A LoRA-style partial checkpoint under FSDP2 (gloo, CPU; run by tests under torchrun).

    partial_job.py RUN_DIR OUT_DIR --epochs N

Frozen base weights (the same "pretrained" ones at every start) and a low-rank adapter that trains; every
epoch saves the adapter alone with ``only="trainable"`` and its Adam state. A start that finds a checkpoint
resumes it into the full model with ``load_into``. Rank 0 writes torch's own full view of the model and the
optimizer (get_model_state_dict / get_optimizer_state_dict, full_state_dict=True) right after the resume
(``OUT/loaded.safetensors``) and after the last epoch (``OUT/trained.safetensors``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from sharded_job import FULL, flat_optim
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptio


class Adapted(torch.nn.Module):
    def __init__(self, width: int, rank: int):
        super().__init__()
        self.base = torch.nn.Linear(width, width)
        self.down = torch.nn.Linear(width, rank, bias=False)
        self.up = torch.nn.Linear(rank, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


@dataclass
class AdaptedArch:
    width: int = 32
    rank: int = 4

    def make_policy(self, env_metadata: object) -> torch.nn.Module:
        return Adapted(self.width, self.rank)


def full_view(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model, options=FULL).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=FULL)
    tensors.update({f"optim.{k}": v for k, v in (flat_optim(optim) if optim else {}).items()})  # rank 0 only
    return {k: v.contiguous() for k, v in tensors.items()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    arch = AdaptedArch()
    torch.manual_seed(0)  # the pretrained base: the same weights wherever the job starts
    model = arch.make_policy(None)
    model.base.requires_grad_(False)
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.base, model.down, model.up):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-2)
    ckpt = ckptio.Checkpointer(args.run, arch)
    if ckpt.load_into(model, optimizer):
        view = full_view(model, optimizer)
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            save_file(view, os.path.join(args.out, "loaded.safetensors"), {"start": str(ckpt.start_epoch)})
    torch.manual_seed(100 + rank)
    for epoch in range(max(ckpt.start_epoch, 1), args.epochs + 1):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(8, arch.width)).pow(2).mean().backward()
            optimizer.step()
        ckpt.save(model, epoch, {"epoch": epoch}, optimizer=optimizer, only="trainable")
    view = full_view(model, optimizer)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        save_file(view, os.path.join(args.out, "trained.safetensors"))
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
