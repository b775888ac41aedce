"""Sharded saves that must fail on every rank, quickly, writing nothing (run under torchrun by tests).

    agreement_job.py RUN_DIR OUT_DIR

Saves epoch 0 of an FSDP2 model, then tries saves that cannot succeed, each on every rank:
ranks holding different tensors (names, dtypes, global shapes, placements, an extra tensor on one
rank or on the master, another optimizer state), a pending reduction on one rank only, a run
whose manifest names another architecture, and a disk failure on the master while it writes
gathered tensors. Each rank appends one JSON line per attempt to ``OUT/rank{r}.jsonl``: the
error's type, message and how long the rank took to learn of it. Then it saves epoch 22 (the
gloo groups are still usable) and exits 0.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from archs import MLPArch
from guarded_train import _forbid
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Shard

import ckptio
import ckptio.formats

ENV = {"obs_dim": 8, "num_actions": 4}


def dtensor(local: torch.Tensor, mesh, placement, world: int, dim: int = 0, shape: list[int] | None = None) -> DTensor:
    if shape is None:
        shape = list(local.shape)
        shape[dim] *= world
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=torch.Size(shape), stride=stride)


def states(kind: str, rank: int, world: int, mesh) -> dict[str, torch.Tensor]:
    """What each rank saves for one kind of disagreement: the last rank differs (the master, for extra-master)."""
    odd = rank == world - 1
    a = dtensor(torch.full((2, 12), float(rank)), mesh, Shard(0), world)
    b = dtensor(torch.full((1, 4), float(rank)), mesh, Shard(0), world)
    sd = {"x.a": a, "x.b": b, "bias": torch.zeros(3)}
    if kind == "names" and odd:  # same count, another name
        sd["x.c"] = sd.pop("x.b")
    elif kind == "swapped" and odd:  # two tensors' names swapped by a model-building bug
        sd["x.a"], sd["x.b"] = b, a
    elif kind == "dtype" and odd:
        sd["x.a"] = dtensor(torch.full((2, 12), rank, dtype=torch.int32), mesh, Shard(0), world)
    elif kind == "extra" and odd:
        sd["x.d"] = dtensor(torch.ones(2, 2), mesh, Shard(0), world)
    elif kind == "extra-master" and rank == 0:
        sd["x.d"] = dtensor(torch.ones(2, 2), mesh, Shard(0), world)
    elif kind == "shape" and odd:  # a consistent shard of another global shape
        sd["x.a"] = dtensor(torch.full((3, 12), float(rank)), mesh, Shard(0), world)
    elif kind == "placement" and odd:  # the same global shape, split along the other dimension
        sd["x.a"] = dtensor(torch.full((2 * world, 12 // world), float(rank)), mesh, Shard(1), world, dim=1)
    elif kind == "plain-weight" and odd:  # a plain tensor of another shape: the model differs between ranks
        sd["bias"] = torch.zeros(5)
    elif kind == "padded":  # agreed, but the last rank's shard is padded: its own failure, raised on every rank
        sd["x.a"] = dtensor(torch.ones(2, 4), mesh, Shard(0), world, shape=[2 * world - 1, 4])
    elif kind == "partial" and odd:  # a pending reduction on one rank only: no block to gather
        sd["x.b"] = dtensor(torch.ones(1, 4), mesh, Partial(), world, shape=[1, 4])
    return sd


def attempt(out: str, rank: int, kind: str, fn) -> None:
    start = time.monotonic()
    record = {"kind": kind, "rank": rank}
    try:
        fn()
        record["error"] = None
    except Exception as e:
        record.update(error=type(e).__name__, message=str(e), mro=[c.__name__ for c in type(e).__mro__])
    record["elapsed_s"] = time.monotonic() - start
    with open(os.path.join(out, f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def step(model, opt) -> None:
    opt.zero_grad()
    model(torch.randn(4, ENV["obs_dim"], generator=torch.Generator().manual_seed(0))).pow(2).mean().backward()
    opt.step()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--shard-timeout", type=float, default=120.0)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    mesh = init_device_mesh("cpu", (world,))
    arch = MLPArch(hidden=16)
    run, other_run = os.path.join(args.run_dir, "run"), os.path.join(args.run_dir, "other")
    if rank != 0:
        _forbid(args.run_dir)  # the failures too are the master's alone to write, or not
    config = ckptio.CheckpointConfig(shard_timeout_s=args.shard_timeout)
    ckpt = ckptio.Checkpointer(run, arch, config)

    torch.manual_seed(0)
    model = arch.make_policy(ENV)
    for layer in (model.embed, model.body, model.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    step(model, opt)
    ckpt.save(model, 0, {"loss": 1.0}, optimizer=opt)

    kinds = [
        "names",
        "swapped",
        "dtype",
        "extra",
        "extra-master",
        "shape",
        "placement",
        "plain-weight",
        "partial",
        "padded",
    ]
    for epoch, kind in enumerate(kinds, start=1):
        attempt(args.out, rank, kind, lambda k=kind, e=epoch: ckpt.save(states(k, rank, world, mesh), e, force=True))

    # the optimizer state differs (AMSGrad's extra state on the last rank), the model does not
    other_opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=rank == world - 1)
    step(model, other_opt)
    attempt(args.out, rank, "optimizer", lambda: ckpt.save(model, 20, optimizer=other_opt))

    # a run created by another architecture, saved into without a resume first: the master's check fails
    if rank == 0:
        ckptio.CheckpointManager(other_run).ensure_manifest(MLPArch(hidden=32))
    dist.barrier()
    attempt(args.out, rank, "manifest", lambda: ckptio.Checkpointer(other_run, arch, config).save(model, 0))

    # the master's disk fails after the header, while the gathered tensors stream out
    original = ckptio.formats.write_all
    calls = []

    def failing_write(f, data):
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(f, data)

    if rank == 0:
        ckptio.formats.write_all = failing_write
    attempt(args.out, rank, "master-write", lambda: ckpt.save(model, 21, optimizer=opt))
    ckptio.formats.write_all = original

    ckpt.save(model, 22, {"loss": 0.5}, optimizer=opt)  # the groups still work: every rank is in step
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
