"""A save observes and never changes training (run under torchrun by tests).

    observe_job.py RUN_DIR OUT_DIR

For each optimizer state (never stepped, partly frozen and never stepped, partly frozen and
stepped, stepped, stepped with a background save), trains the same model twice from the same
seed, once with a save (model and optimizer) in the middle and once without, and compares
everything training depends on afterwards, exactly: the full weights, the full optimizer state
and param groups, and the RNG. A never-stepped optimizer's checkpoint is then loaded into a fresh
model and optimizer, which must equal a fresh start and train on identically. Writes
``OUT/rank{r}.json``: for each mode (FSDP2-sharded, plain) and case, the differences found (empty when
identical).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from archs import MLPArch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptio

ENV = {"obs_dim": 8, "num_actions": 4}
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(mode: str, world: int, frozen: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLPArch(hidden=16).make_policy(ENV)
    if frozen:  # the optimizer holds it, but it never gets a gradient: it never has state
        model.embed.weight.requires_grad_(False)
    if mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model.embed, model.body, model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, opt, mode: str, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, ENV["obs_dim"])  # from the global RNG: a save that drew from it would show
        model(x).pow(2).mean().backward()
        if mode == "plain":
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def snapshot(model, opt) -> dict:
    osd = opt.state_dict()  # the raw optimizer state (get_optimizer_state_dict would initialise a stateless one)
    return {
        "weights": {k: v.clone() for k, v in get_model_state_dict(model, options=FULL).items()},
        "state": {i: {k: full(v) for k, v in s.items()} for i, s in osd["state"].items()},
        "groups": osd["param_groups"],
        "rng": torch.get_rng_state(),
    }


def differences(a: dict, b: dict) -> list[str]:
    diffs = []
    for k in a["weights"].keys() | b["weights"].keys():
        if k not in a["weights"] or k not in b["weights"] or not torch.equal(a["weights"][k], b["weights"][k]):
            diffs.append(f"weight {k}")
    if a["state"].keys() != b["state"].keys():
        diffs.append(f"optimizer state for params {sorted(a['state'])} vs {sorted(b['state'])}")
    for i in a["state"].keys() & b["state"].keys():
        for k in a["state"][i].keys() | b["state"][i].keys():
            x, y = a["state"][i].get(k), b["state"][i].get(k)
            if x is None or y is None or not torch.equal(x, y):
                diffs.append(f"optimizer state {i}.{k}")
    if a["groups"] != b["groups"]:
        diffs.append("param groups")
    if not torch.equal(a["rng"], b["rng"]):
        diffs.append("RNG state")
    return diffs


def observe(run_dir: str, mode: str, world: int) -> dict[str, list[str]]:
    arch = MLPArch(hidden=16)
    cases = {  # name: (frozen, steps before the save, background save)
        "never-stepped": (False, 0, False),
        "frozen-never-stepped": (True, 0, False),
        "frozen-stepped": (True, 2, False),
        "stepped": (False, 2, False),
        "stepped-async": (False, 2, True),
    }
    report: dict[str, list[str]] = {}
    for name, (frozen, before, in_background) in cases.items():
        results = []
        for with_save in (False, True):
            model, opt = build(mode, world, frozen)
            torch.manual_seed(1)
            train(model, opt, mode, before)
            if with_save:
                ckpt = ckptio.Checkpointer(os.path.join(run_dir, name), arch)
                ckpt.save(model, 1, {"loss": 0.0}, {"step": before}, optimizer=opt, async_=in_background)
            train(model, opt, mode, 3)
            if with_save:
                ckpt.close()
            results.append(snapshot(model, opt))
        report[name] = differences(*results)

    # resuming a never-stepped optimizer's checkpoint equals a fresh start, and trains on identically
    fresh_model, fresh_opt = build(mode, world, frozen=False)
    model, opt = build(mode, world, frozen=False)
    ckpt = ckptio.Checkpointer(os.path.join(run_dir, "never-stepped"), arch)
    assert ckpt.load_into(model, opt)
    report["resumed-never-stepped"] = differences(snapshot(fresh_model, fresh_opt), snapshot(model, opt))
    for m, o in ((fresh_model, fresh_opt), (model, opt)):
        torch.manual_seed(2)
        train(m, o, mode, 3)
    report["resumed-never-stepped-trained"] = differences(snapshot(fresh_model, fresh_opt), snapshot(model, opt))
    # the premise: torch's own API gives a never-stepped optimizer state (an lr=0 step), which ckptio must not
    saved = get_optimizer_state_dict(*build(mode, world, frozen=False))
    report["premise-torch-initialises"] = (
        [] if saved["state"] else ["torch initialised no state: the cases prove nothing"]
    )
    ckpt.close()
    return report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("out")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    report = {mode: observe(os.path.join(args.run_dir, mode), mode, world) for mode in ("fsdp", "plain")}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
