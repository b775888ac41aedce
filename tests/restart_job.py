"""A DDP policy job on simulated nodes that saves, and resumes in place, as multi-node jobs restart.

    restart_job.py RUN_DIR OUT_DIR --epochs E [--remote-uri URI --storage-options JSON] [--async-save]
                   [--kill-after-epoch K] [--hidden H] [--fail-after K] [--no-process-group]

Every rank resumes with ``load_or_create_policy`` and ``load_optimizer`` (the master's choice), then
trains epochs ``start_epoch..E`` with Adam on batches drawn from its own RNG, saving each epoch with its
optimizer. After each save it writes what it holds (weights, optimizer state, RNG state) to
``OUT/saved-e{epoch}-rank{r}.safetensors``; after a resume, the same to ``OUT/resumed-rank{r}.safetensors``
(with the epoch resumed from). ``--kill-after-epoch K``: once epoch K is saved (and, with async saves,
written), every rank kills itself with SIGKILL, as a preempted node dies. ``--fail-after K``: on the node
with GROUP_RANK 1 the store fails every ranged read after its first K. ``--no-process-group``: the ranks
never initialize torch.distributed. A ckptio error prints ``FAILED <type>: <message>`` and exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from archs import MLPArch
from nodes_job import fail_reads_after
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

import ckptio

ENV = {"obs_dim": 8, "num_actions": 4}


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What a resume must restore bit for bit: weights, optimizer state (by parameter name), the RNG state."""
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        out.update({f"optim.{names[id(p)]}.{k}": torch.as_tensor(v).clone() for k, v in state.items()})
    out["rng"] = torch.get_rng_state()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--remote-uri")
    p.add_argument("--storage-options", default="{}")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--kill-after-epoch", type=int)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--fail-after", type=int)
    p.add_argument("--no-process-group", action="store_true")
    args = p.parse_args()
    if not args.no_process_group:
        dist.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    if args.fail_after is not None and os.environ.get("GROUP_RANK") == "1":
        fail_reads_after(args.fail_after)
    os.makedirs(args.out, exist_ok=True)
    config = ckptio.CheckpointConfig(
        remote_uri=args.remote_uri,
        remote_storage_options=json.loads(args.storage_options),
        async_save=args.async_save,
        keep_last=2,
    )
    ckpt = ckptio.Checkpointer(args.run_dir, MLPArch(hidden=args.hidden), config)
    torch.manual_seed(1000 + rank)  # a fresh run's ranks draw different batches; a resume restores each one's
    try:
        policy = ckpt.load_or_create_policy(ENV)
        opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
        if ckpt.resumed_from is not None:
            ckpt.load_optimizer(policy, opt)
    except ckptio.CheckpointError as e:
        print(f"FAILED {type(e).__name__}: {e}", flush=True)
        return 3
    if ckpt.resumed_from is not None:
        save_file(snapshot(policy, opt), os.path.join(args.out, f"resumed-rank{rank}.safetensors"),
                  {"epoch": str(ckpt.resumed_from.epoch), "uri": ckpt.resumed_from.uri})  # fmt: skip
    model = DistributedDataParallel(policy)
    for epoch in range(ckpt.start_epoch, args.epochs + 1):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, ENV["obs_dim"])).pow(2).mean().backward()
            opt.step()
        ckpt.save(policy, epoch, {"loss": float(epoch)}, optimizer=opt, force=True)
        save_file(snapshot(policy, opt), os.path.join(args.out, f"saved-e{epoch}-rank{rank}.safetensors"))
        if args.kill_after_epoch == epoch:
            ckpt.wait()  # the master's local checkpoint is written; its upload may not be
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
