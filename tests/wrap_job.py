"""Save from any wrapping of a model, load into any other (run under torchrun by tests).

    wrap_job.py RUN_DIR OUT_DIR --phase save|load

Wrappings: none, torch.compile, activation checkpointing (checkpoint_wrapper), both, and all three
with DDP (``module.``). ``save``
(any world size): for each wrapping, FSDP2-sharded and not, trains two Adam steps and saves model
and optimizer into ``RUN_DIR/{wrapping}[-fsdp]``; rank 0 writes torch's own full state dicts beside them as the
reference (``OUT/{wrapping}.ref.safetensors``, ``OUT/{wrapping}.ref_optim.safetensors``).
``load`` (any world size): for each saved wrapping, each target wrapping, FSDP2-sharded and not,
builds the model, ``load_into(model, optimizer)``, and compares torch's full state dicts of the
result with the reference; rank 0 writes ``OUT/load.json``: each combination's differences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from archs import MLPArch
from safetensors.torch import load_file, save_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptio

ENV = {"obs_dim": 8, "num_actions": 4}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
WRAPPINGS = ["none", "compile", "ac", "compile+ac", "ddp+compile+ac"]
FSDP = "-fsdp"
# every wrapping, FSDP2-sharded and not (DDP replicates: it is never combined with FSDP2)
SAVED = [w + s for w in WRAPPINGS for s in (FSDP, "") if not (s and "ddp" in w)]


def build(wrapping: str, sharded: bool, world: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model as training calls it, the module whose forward runs)."""
    torch.manual_seed(0)
    model = MLPArch(hidden=16).make_policy(ENV)
    if "ac" in wrapping:
        model.embed, model.body = checkpoint_wrapper(model.embed), checkpoint_wrapper(model.body)
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.embed, model.body, model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if "ddp" in wrapping else model
    # names are what compile changes; the forward runs eagerly (tracing FSDP2 hooks is not under test)
    return (torch.compile(wrapped, backend="eager") if "compile" in wrapping else wrapped), model


def full(model, opt) -> tuple[dict, dict]:
    sd = get_model_state_dict(model, options=FULL)
    osd = get_optimizer_state_dict(model, opt, options=FULL)  # {} on ranks other than 0
    flat = {f"{fqn}.{k}": torch.as_tensor(v).clone() for fqn, st in osd.get("state", {}).items() for k, v in st.items()}
    return {k: v.contiguous() for k, v in sd.items()}, flat


def differences(got: dict, want: dict, what: str) -> list[str]:
    if got.keys() != want.keys():
        return [f"{what} keys: {sorted(got.keys() ^ want.keys())}"]
    return [f"{what} {k}" for k in want if not torch.equal(got[k], want[k])]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--phase", choices=["save", "load"], required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    arch = MLPArch(hidden=16)
    if args.phase == "save":
        for wrapping in SAVED:
            model, inner = build(wrapping.removesuffix(FSDP), wrapping.endswith(FSDP), world)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for i in range(2):
                opt.zero_grad()
                inner(torch.randn(4, ENV["obs_dim"], generator=torch.Generator().manual_seed(i))).sum().backward()
                opt.step()
            ckpt = ckptio.Checkpointer(os.path.join(args.run_dir, wrapping), arch)
            ckpt.save(model, 0, {"loss": 0.0}, optimizer=opt)
            ckpt.close()
            weights, optim = full(model, opt)
            if rank == 0:
                save_file(weights, os.path.join(args.out, f"{wrapping}.ref.safetensors"))
                save_file(optim, os.path.join(args.out, f"{wrapping}.ref_optim.safetensors"))
        dist.destroy_process_group()
        return 0
    results: dict[str, list[str]] = {}
    for saved in SAVED:
        want_w = load_file(os.path.join(args.out, f"{saved}.ref.safetensors"))
        want_o = load_file(os.path.join(args.out, f"{saved}.ref_optim.safetensors"))
        for target in SAVED:
            model, _ = build(target.removesuffix(FSDP), target.endswith(FSDP), world)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            key = f"{saved} -> {target}"
            try:
                ckpt = ckptio.Checkpointer(os.path.join(args.run_dir, saved), arch)
                assert ckpt.load_into(model, opt)
                ckpt.close()
                got_w, got_o = full(model, opt)
                results[key] = differences(got_w, want_w, "weight") + differences(got_o, want_o, "optimizer")
            except Exception as e:
                results[key] = [f"{type(e).__name__}: {e}"]
    if rank == 0:
        with open(os.path.join(args.out, "load.json"), "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
