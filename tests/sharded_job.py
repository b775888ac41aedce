"""A sharded training job under torchrun (gloo, CPU): FSDP2, tensor parallel, or both on a 2-D mesh.

    sharded_job.py RUN_DIR OUT_DIR --mode fsdp|tp|2d|plain --epochs N [--async] [--load into|policy] [--tied]

Trains a few Adam steps per epoch and saves every epoch with ckptio (weights and optimizer). Rank 0
writes torch's own view of the result beside it, for the tests to compare against:
``OUT/ref.e{epoch}.safetensors`` (get_model_state_dict(full_state_dict=True)) and
``OUT/ref_optim.e{epoch}.safetensors`` (get_optimizer_state_dict(full_state_dict=True), flattened).
When RUN_DIR holds a checkpoint, it resumes from it (``--load into``: build on meta, shard, load
into; ``--load policy``: load the full module, then shard) and writes ``OUT/resumed.safetensors``
and ``OUT/resumed_optim.safetensors`` right after loading, before any step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from archs import MLPArch
from guarded_train import _forbid
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ckptio

ENV = {"obs_dim": 8, "num_actions": 4}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module, mode: str, world: int) -> torch.nn.Module:
    if mode == "plain":
        return model
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        tied = [model.tied_out] if hasattr(model, "tied_out") else []  # a tie lives in one FSDP group
        for layer in (model.embed, [model.body, *tied], model.head):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if mode == "tp":
        mesh = init_device_mesh("cpu", (world,))
        return parallelize_module(model, mesh, {"embed": ColwiseParallel(), "body": RowwiseParallel()})
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))  # "2d": FSDP x TP
    parallelize_module(model, mesh["tp"], {"embed": ColwiseParallel(), "body": RowwiseParallel()})
    for layer in (model.embed, model.body, model.head):
        fully_shard(layer, mesh=mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"])


def flat_optim(osd: dict) -> dict[str, torch.Tensor]:
    return {f"{fqn}.{k}": v.detach().clone() for fqn, st in osd["state"].items() for k, v in st.items()}


def dump(model, opt, out: str, name: str) -> None:
    sd = get_model_state_dict(model, options=FULL)
    osd = get_optimizer_state_dict(model, opt, options=FULL)
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, f"{name}.safetensors"))
        save_file(flat_optim(osd), os.path.join(out, f"{name}_optim.safetensors"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--mode", default="fsdp")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--async", dest="async_", action="store_true")
    p.add_argument("--load", choices=["into", "policy"], default="into")
    p.add_argument(
        "--in-gather", choices=["die", "hang"], help="rank 1 dies (as if SIGKILLed) or hangs in its first send"
    )
    p.add_argument("--shard-timeout", type=float, default=60.0)
    p.add_argument("--batch-bytes", type=int, help="CheckpointConfig.shard_batch_bytes (default: its default)")
    p.add_argument("--tied", action="store_true", help="a model with tied weights (MLPArch(tied=True))")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    if rank != 0:
        _forbid(args.run_dir)  # only the master touches the run directory: any other rank's write fails the job
    arch = MLPArch(hidden=16, tied=args.tied)
    config = ckptio.CheckpointConfig(async_save=args.async_, shard_timeout_s=args.shard_timeout)
    if args.batch_bytes is not None:
        config.shard_batch_bytes = args.batch_bytes
    ckpt = ckptio.Checkpointer(args.run_dir, arch, config)
    resuming = bool(ckptio.list_checkpoints(args.run_dir)) if os.path.isdir(args.run_dir) else False
    if resuming and args.load == "policy":
        model = shard(ckpt.load_or_create_policy(ENV), args.mode, world)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ckpt.load_optimizer(model, opt)
    else:
        torch.manual_seed(0)
        with torch.device("meta" if resuming else "cpu"):
            model = arch.make_policy(ENV)
        model = shard(model, args.mode, world)
        if resuming:
            model.to_empty(device="cpu")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        if resuming:
            assert ckpt.load_into(model, opt)
    if resuming:
        dump(model, opt, args.out, "resumed")
    # a pending reduction has no block to gather: refused on every rank, nothing written
    partial = DTensor.from_local(torch.ones(3), init_device_mesh("cpu", (world,)), [Partial()])
    try:
        ckpt.save({"x": partial}, 10**6, force=True)
        raise AssertionError("a Partial DTensor was saved")
    except ckptio.CheckpointFormatError:
        pass
    if args.in_gather and rank == 1:

        def failing_send(*a, **k):
            if args.in_gather == "die":
                os.kill(os.getpid(), signal.SIGKILL)  # mid-gather, nothing flushed
            threading.Event().wait()  # a rank stuck for good (a hung device, a stalled host)

        dist.send = failing_send
    sends: list[int] = []  # rank 1: the messages each save of the epochs sent to the master (sync saves)
    send = dist.send

    def counted_send(*a, **k):
        sends[-1] += 1
        return send(*a, **k)

    dist.send = counted_send
    for epoch in range(ckpt.start_epoch, ckpt.start_epoch + args.epochs):
        gen = torch.Generator().manual_seed(1000 * epoch + rank)  # the same data whether resumed or not
        for _ in range(3):
            opt.zero_grad()
            x = torch.randn(8, ENV["obs_dim"], generator=gen)
            model(x).pow(2).mean().backward()
            if args.mode == "plain":
                for q in model.parameters():
                    dist.all_reduce(q.grad)
            opt.step()
        sends.append(0)
        ckpt.save(model, epoch, {"epoch": epoch}, optimizer=opt)
        dump(model, opt, args.out, f"ref.e{epoch}")
    dist.send = send
    if rank == 1:
        with open(os.path.join(args.out, "sends_rank1.json"), "w") as f:
            json.dump(sends, f)
    # the same Checkpointer resumes after saving (every rank enters the same collectives, whatever it did alone)
    with torch.device("meta"):
        again = shard(arch.make_policy(ENV), args.mode, world)
    again.to_empty(device="cpu")
    assert ckpt.load_into(again)
    for (k, a), b in zip(
        get_model_state_dict(model, options=FULL).items(), get_model_state_dict(again, options=FULL).values()
    ):
        assert torch.equal(a, b), k
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
