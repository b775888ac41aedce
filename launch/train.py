"""Distributed training with ckptio checkpointing; run under torchrun (or alone as one process).

    torchrun --standalone --nproc_per_node=2 -m launch.train --run-dir runs/demo --epochs 6

With --fsdp the policy is sharded with FSDP2 (fully_shard) instead of wrapped in DDP; checkpoints
are still one standard safetensors file, written by the master, resumable at any world size. A restart with the same --run-dir resumes from the latest checkpoint: weights, optimizer state,
epoch, step counter and every rank's RNG state, so it continues the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

if __package__ in (None, ""):  # run by path (python launch/train.py): the repository holds launch/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ckptio
from launch.tasks import BanditTask, PolicyConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo", help="local path or URI (s3://, gs://, memory://)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps-per-epoch", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-interval", type=int, default=1, help="save every N epochs")
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    p.add_argument("--remote-uri", help="also upload checkpoints here (s3://, gs://...) in background")
    p.add_argument("--storage-options", help="JSON for fsspec (endpoint, credentials) for --remote-uri/--run-dir")
    p.add_argument("--cache-dir", help="node-local cache for checkpoints resumed from object storage")
    p.add_argument("--async-save", action="store_true", help="snapshot on the training thread, write in background")
    p.add_argument("--fsdp", action="store_true", help="shard the policy with FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--teacher-uri", help="kickstart from a teacher policy at any URI (mock:// too)")
    p.add_argument("--kickstart-coef", type=float, default=0.5)
    p.add_argument("--allow", action="append", default=[], metavar="MODULE",
                   help="also import a teacher's architecture from this module prefix (repeatable)")  # fmt: skip
    p.add_argument("--stop-after-epoch", type=int, help="exit after this epoch, as a preempted job would")
    p.add_argument("--pause-after-epoch", type=int, help="after this epoch's checkpoint, print PAUSED and block")
    p.add_argument("--dump-state", help="directory: each rank writes its final model and optimizer tensors there")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    info = ckptio.rank_info()
    device = torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed * 1000 + info.rank)  # ranks draw different batches

    def say(*msg: object) -> None:
        if info.is_master:
            print(*msg, flush=True)

    task = BanditTask()
    opts = json.loads(args.storage_options) if args.storage_options else {}
    ckpt = ckptio.Checkpointer(
        args.run_dir,
        PolicyConfig(hidden=args.hidden),
        ckptio.CheckpointConfig(
            checkpoint_format=args.format,
            epoch_interval=args.checkpoint_interval,
            keep_last=args.keep_last,
            storage_options=opts if "://" in args.run_dir else {},
            remote_uri=args.remote_uri,
            remote_storage_options=opts,
            cache_dir=args.cache_dir,
            async_save=args.async_save,
        ),
        allow=["launch"],
    )
    policy = ckpt.load_or_create_policy(task.metadata, device=device)
    if args.fsdp and dist.is_initialized():
        # load, then shard: each rank copies only its slice of the memory-mapped checkpoint
        mesh = init_device_mesh(device.type, (info.world_size,))
        for layer in policy.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    global_step = 0
    if ckpt.resumed_from is not None:
        say(
            f"resumed from {ckpt.resumed_from.uri} (epoch {ckpt.resumed_from.epoch}); continuing at epoch {ckpt.start_epoch}"
        )
        if ckpt.trainer_state is not None:
            if "optimizer" in ckpt.trainer_state:  # saved by an unsharded run
                optimizer.load_state_dict(ckpt.trainer_state["optimizer"])
            else:  # saved with save(..., optimizer=): keyed by parameter name, any world size, sharded or not
                ckpt.load_optimizer(policy, optimizer)
            global_step = ckpt.trainer_state["global_step"]
    else:
        say(f"new run in {ckpt.manager.checkpoint_dir} ({info.world_size} ranks)")
    model = DistributedDataParallel(policy) if dist.is_initialized() and not args.fsdp else policy

    teacher = None
    if args.teacher_uri:
        teacher = ckptio.load_from_uri(
            args.teacher_uri, allow=["launch", *args.allow], storage_options=opts
        ).instantiate(task.metadata, device=device)
        teacher.eval()
        say(f"kickstarting from teacher {args.teacher_uri} ({type(teacher).__name__})")

    for epoch in range(max(ckpt.start_epoch, 1), args.epochs + 1):
        total = torch.zeros(3, device=device)  # imitation loss, reward, kickstart KL
        for _ in range(args.steps_per_epoch):
            obs, target = task.sample(args.batch_size)
            obs, target = obs.to(device), target.to(device)
            logits = model(obs)
            imitation = F.cross_entropy(logits, target)
            kl = torch.zeros((), device=device)
            if teacher is not None:
                with torch.no_grad():
                    teacher_probs = F.softmax(teacher(obs), dim=-1)
                kl = F.kl_div(F.log_softmax(logits, dim=-1), teacher_probs, reduction="batchmean")
            loss = imitation + args.kickstart_coef * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            total += torch.stack([imitation.detach(), (logits.argmax(1) == target).float().mean(), kl.detach()])
        if dist.is_initialized():
            dist.all_reduce(total)
        mean_loss, reward, mean_kl = (total / (args.steps_per_epoch * info.world_size)).tolist()
        kick = f" kickstart KL {mean_kl:.4f}" if teacher is not None else ""
        say(f"epoch {epoch}: loss {mean_loss:.4f} reward {reward:.3f}{kick}")
        metrics = {"loss": mean_loss, "reward": reward, "global_step": global_step}
        if args.fsdp:  # every rank takes part: the master gathers one tensor at a time and writes
            uri = ckpt.save(
                model, epoch, metrics, {"global_step": global_step}, optimizer=optimizer, force=epoch == args.epochs
            )
        else:
            uri = ckpt.save(
                model,
                epoch,
                metrics,
                trainer_state={"optimizer": optimizer.state_dict(), "global_step": global_step},
                force=epoch == args.epochs,
            )
        if uri:
            say(f"  checkpoint {uri}")
        if args.pause_after_epoch == epoch:
            say("PAUSED")
            signal.pause()
        if args.stop_after_epoch == epoch:
            say(f"stopping after epoch {epoch} (simulated preemption)")
            break

    if args.dump_state:
        from safetensors.torch import save_file  # the tests' reference writer, not a dependency of the job

        os.makedirs(args.dump_state, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in policy.state_dict().items()}
        for pid, state in optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{pid}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
        save_file(
            {k: (v.full_tensor() if isinstance(v, DTensor) else v).contiguous() for k, v in tensors.items()},
            os.path.join(args.dump_state, f"rank{info.rank}.safetensors"),
            {"global_step": str(global_step), "start_epoch": str(ckpt.start_epoch)},
        )
    ckpt.close()  # every rank: waits for the master's last save and uploads, so ranks leave together
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
