"""Sharded-model benchmark rows, run under torchrun by ``python -m benchmarks --sharded``.

An FSDP2 model (the benchmark policy, fully_shard per block) with Adam state, at ``--nproc``
ranks. Each method runs in the same job, in turns, so the ratios compare like with like:

- save: ckptio (every rank sends its blocks to the master, which streams the weights and trainer-state
  files), a full gather (get_model_state_dict/get_optimizer_state_dict full_state_dict) + save_file, DCP
  save; seconds, and the master's peak RSS growth. Each save writes new names; older ones are deleted
  between timed parts (ckptio's retention, keep_last=1, runs then too: off the training thread).
- load into the sharded model: ckptio ``load_into`` and DCP load; seconds and each rank's RSS growth.
- async stall: ckptio async save, copying the model's and optimizer's local shards into reused
  buffers (the floor of any snapshot), DCP async_save.

Each save and stall method runs once before the timed rounds (rows ``sharded.first_save.*`` and
``sharded.first_stall.*``): the job's first operation, whichever it is, pays for the process's warm-up.

Rank 0 writes a JSON object of rows to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import ckptio
from benchmarks.policy import BenchPolicy
from benchmarks.worker import _peak, _reset_peak, _rss

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def build(arch: BenchPolicy, mesh, meta: bool = False) -> torch.nn.Module:
    with torch.device("meta" if meta else "cpu"):
        model = arch.make_policy(None)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if meta:
        model.to_empty(device="cpu")
        for p in model.parameters():
            p.to_local().detach().zero_()  # allocated and touched, as a built model is, before any load
    return model


def with_adam_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # Adam's state exists from the first step
    opt.zero_grad(set_to_none=True)
    return opt


def _anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def timed(fn) -> dict:
    """Seconds on this rank (after a barrier); this rank's peak RSS growth (page-cache pages it maps
    count too) and peak growth of its private memory (RssAnon, sampled every millisecond) while fn ran."""
    dist.barrier()
    _reset_peak()
    rss0, anon0 = _rss(), _anon()
    peak_anon, stop = [anon0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.001):
            peak_anon[0] = max(peak_anon[0], _anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    grown = max(_peak() - rss0, 0)
    dist.barrier()
    return {"seconds": seconds, "peak_rss_delta": grown, "peak_anon_delta": max(peak_anon[0], _anon()) - anon0}


def gathered(samples: list[dict]) -> list[dict]:
    """Every rank's samples on every rank (index = rank)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, samples)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, required=True, help="parameter bytes")
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    arch = BenchPolicy(args.size)
    torch.manual_seed(0)
    model = build(arch, mesh)
    opt = with_adam_state(model)
    run = os.path.join(args.dir, "run")
    dcp_dir = os.path.join(args.dir, "dcp")
    full_dir = os.path.join(args.dir, "full")
    if rank == 0:
        for d in (run, dcp_dir, full_dir):
            shutil.rmtree(d, ignore_errors=True)
        os.makedirs(full_dir)
    dist.barrier()
    ckpt = ckptio.Checkpointer(run, arch, ckptio.CheckpointConfig(keep_last=1))
    async_ckpt = ckptio.Checkpointer(
        os.path.join(args.dir, "async"), arch, ckptio.CheckpointConfig(keep_last=1, async_save=True)
    )

    # every save writes new names, as training does each epoch: overwriting a large file costs more than a fresh
    # write on this disk (discard). What an earlier save left is deleted between the timed parts (settle), as
    # ckptio's retention deletes it off the training thread.
    fresh = iter(range(10_000))

    def full_gather_save_file() -> None:
        from safetensors.torch import save_file

        sd = get_model_state_dict(model, options=FULL)
        osd = get_optimizer_state_dict(model, opt, options=FULL)
        if rank == 0:
            n = next(fresh)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(full_dir, f"model-{n}.safetensors"))
            flat = {f"{fqn}.{k}": v.contiguous() for fqn, st in osd["state"].items() for k, v in st.items()}
            save_file(flat, os.path.join(full_dir, f"optim-{n}.safetensors"))

    def dcp_save() -> None:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(dcp_dir, str(next(fresh))))  # fmt: skip

    buffers: dict[str, torch.Tensor] = {}

    def copy_local_shards() -> None:
        # what an async save must snapshot: the model's and the optimizer's local shards
        tensors = {f"m.{k}": v for k, v in model.state_dict().items()}
        for i, state in enumerate(opt.state.values()):
            tensors.update({f"o.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
        for k, v in tensors.items():
            local = v.to_local() if isinstance(v, DTensor) else v
            buf = buffers.get(k)
            if buf is None:
                buf = buffers[k] = torch.empty_like(local)
            buf.copy_(local)

    pending: list = []

    def dcp_async() -> None:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        pending.append(dcp.async_save(state, checkpoint_id=os.path.join(dcp_dir + "-async", str(next(fresh)))))

    epoch = iter(range(1, 10_000))
    saves = {
        "ckptio": lambda: ckpt.save(model, next(epoch), {"r": 1.0}, optimizer=opt, force=True),
        "gather_save_file": full_gather_save_file,
        "dcp": dcp_save,
    }
    stalls = {
        "ckptio": lambda: async_ckpt.save(model, next(epoch), {"r": 1.0}, optimizer=opt, force=True),
        "copy": copy_local_shards,
        "dcp_async_save": dcp_async,
    }

    def settle() -> None:  # the previous background save and retention finish outside the timed part
        async_ckpt.wait()
        ckpt.wait()
        while pending:
            pending.pop().result()
        dist.barrier()
        if rank == 0:
            for d in (full_dir, dcp_dir, dcp_dir + "-async"):
                for name in os.listdir(d) if os.path.isdir(d) else ():
                    path = os.path.join(d, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        dist.barrier()

    samples: dict[str, list[dict]] = {}
    # the job's first operation pays for what any first one does (the allocator growing its heap, pages
    # faulted in, lazily made groups): one untimed-in-the-medians round of each method, reported as first_*
    for group, methods in (("save", saves), ("stall", stalls)):
        for key, method in methods.items():
            os.sync()
            samples.setdefault(f"sharded.first_{group}.{key}", []).append(timed(method))
            settle()
    for r in range(args.repeats):
        for group, methods in (("save", saves), ("stall", stalls)):
            keys = list(methods)
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:  # each round starts one method later
                os.sync()
                samples.setdefault(f"sharded.{group}.{key}", []).append(timed(methods[key]))
                settle()
    # loads into a freshly built sharded model (allocated before the timed part, as a resume would),
    # of checkpoints of the model alone: the same bytes for both methods
    model_only = ckptio.Checkpointer(os.path.join(args.dir, "model-only"), arch)
    model_only.save(model, 0, force=True)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=dcp_dir + "-model")
    for r in range(args.repeats):
        for key in ("ckptio", "dcp")[r % 2 :] + ("ckptio", "dcp")[: r % 2]:
            target = build(arch, mesh, meta=True)

            def load(target=target, key=key) -> None:
                if key == "ckptio":
                    assert model_only.load_into(target)
                else:
                    sd = get_model_state_dict(target)
                    dcp.load({"model": sd}, checkpoint_id=dcp_dir + "-model")

            samples.setdefault(f"sharded.load.{key}", []).append(timed(load))
            del target
    model_only.close()
    every = gathered([samples])
    weights = ckptio.latest(os.path.join(args.dir, "model-only"))
    rows = {}
    for key in samples:
        per_rank = [every[r][0][key] for r in range(world)]
        master = per_rank[0]
        rows[key] = {
            "median_s": statistics.median(s["seconds"] for s in master),
            "min_s": min(s["seconds"] for s in master),
            "max_s": max(s["seconds"] for s in master),
            "peak_rss_delta": statistics.median(s["peak_rss_delta"] for s in master),
            "peak_anon_delta": statistics.median(s["peak_anon_delta"] for s in master),
            "max_rank_peak_rss_delta": max(statistics.median(s["peak_rss_delta"] for s in rs) for rs in per_rank),
            "max_rank_peak_anon_delta": max(statistics.median(s["peak_anon_delta"] for s in rs) for rs in per_rank),
            "samples": per_rank,
        }
    if rank == 0:
        model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
        facts = {
            "world_size": world,
            "model_bytes": model_bytes,
            "model_and_optimizer_bytes": 3 * model_bytes,  # Adam: exp_avg and exp_avg_sq per parameter
            "weights_file_bytes": os.path.getsize(weights.uri),  # the model-only file the load rows read
            # ckptio's master holds one gathered tensor at a time: its save's RAM bound by construction
            "largest_tensor_bytes": largest,
        }
        with open(args.out, "w") as f:
            json.dump({"facts": facts, "rows": rows}, f, indent=1)
    async_ckpt.close()
    ckpt.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
