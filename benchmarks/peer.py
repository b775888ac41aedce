"""ckptio beside torch_checkpointing (Meta's, PyPI torch-checkpointing) and torch.distributed.checkpoint, in one run.

    python -m benchmarks.peer [--mib 64] [--repeats 3] [--saves 50] [--out DIR]

The state is a model of 1024x1024 linear layers (``--mib`` MiB of float32 weights) and its Adam state after a
step (3x the weights in all). Every row runs in fresh processes, the methods alternated, on the same disk:

Each timed save starts with the disk's writeback done (``os.sync()``): otherwise a save's fsync waits behind
the dirty pages the previous measurement left, which swung a 2-rank durable save between 0.2 and 0.7 s here.

- single process: an async save's training-thread stall (until the state may be changed again: ckptio's
  ``save`` returning, DCP's ``async_save`` returning, torch_checkpointing's ``save`` and then its ``lock()``,
  which waits out its capture), the time until it is durable, the saving process's peak RSS (its writer
  process's too, read every 20 ms), bytes on disk; a load into a built model and optimizer (time, peak RSS); and the RSS
  after 5 and after ``--saves`` async saves, one per step.
- 2 ranks (torchrun, gloo, FSDP2): the same stall and durable save, a load at 2 ranks, and one at 1 rank
  (resume at another world size).

torch_checkpointing runs in its documented CPU configuration (no pinned memory, no non-blocking copies) and with
``use_direct_io=False``; its writer never calls fsync (its future completes once the bytes are in the page
cache), so its "durable" time includes an fsync of its files and directories, as ckptio's save does and DCP's
writer does for its files. On this machine's ext4 its O_DIRECT writer fails with EINVAL when a file's length is not
block-aligned. Resharding (``DefaultResharder``) gathers its metadata through CUDA tensors, so on a CPU its
checkpoints load only at the world size that saved them; that row says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

METHODS = ("ckptio", "torch_checkpointing", "dcp")
_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


# -- measuring ---------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Children:
    """The peak RSS of this process's child processes (a background writer, started by the warm-up save), read
    every 20 ms. Without children it samples nothing: a sampling thread would take the GIL from a writer thread."""

    def __init__(self) -> None:
        import psutil

        self.peak, self._stop = 0, threading.Event()
        self._children = psutil.Process().children(recursive=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self._children:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                now = sum(c.memory_info().rss for c in self._children)
            except Exception:  # a child that exited
                continue
            self.peak = max(self.peak, now)

    def stop(self) -> int:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak


def _bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


# -- the state -----------------------------------------------------------------------------------
def _model(mib: float, seed: int, sharded: bool):
    import torch

    torch.manual_seed(seed)
    layers = max(2, round(mib * 2**20 / (4 * 1024 * 1025)))
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(layers)))
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _step(model, optimizer)
    return model, optimizer


def _step(model, optimizer) -> None:
    import torch

    model(torch.ones(2, 1024)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _fingerprint(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.full_tensor().double().sum() if hasattr(p, "full_tensor") else p.double().sum()
                         for p in model.parameters()))  # fmt: skip


# -- the methods -------------------------------------------------------------------------------
class _Method:
    """One way of saving and loading the model and optimizer: ``save`` returns (stall, durable) seconds."""

    def __init__(self, name: str, root: str, model, optimizer, sharded: bool):
        self.name, self.root, self.model, self.optimizer, self.sharded = name, root, model, optimizer, sharded
        if name == "ckptio":
            import ckptio
            from benchmarks.policy import BenchPolicy

            self.ckpt = ckptio.Checkpointer(root, BenchPolicy(1), ckptio.CheckpointConfig(async_save=True, keep_last=2))
        elif name == "torch_checkpointing":
            from torch_checkpointing.checkpoint_manager import CheckpointManager
            from torch_checkpointing.config import AsyncCheckpointSaverConfig
            from torch_checkpointing.schema import ItemSpec
            from torch_checkpointing.staging import CheckpointStagerConfig
            from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

            staging = CheckpointStagerConfig(use_pinned_memory=False, use_non_blocking_copy=False)
            self.manager = CheckpointManager.Config(
                items={"model": ItemSpec(requires_copy=True), "optimizer": ItemSpec(requires_copy=True)},
                save=AsyncCheckpointSaverConfig(staging_config=staging),
                storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
            ).build()
        self.future = None

    def _states(self) -> dict:
        if self.sharded or self.name == "dcp":
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

            return {"model": get_model_state_dict(self.model),
                    "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}  # fmt: skip
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step}")

    def save(self, step: int) -> tuple[float, float]:
        start = time.perf_counter()
        if self.name == "ckptio":
            self.ckpt.save(self.model, step, optimizer=self.optimizer, force=True)
            stall = time.perf_counter() - start
            self.ckpt.wait()
        elif self.name == "torch_checkpointing":
            future = self.manager.save(self.path(step), self._states())
            with self.manager.lock():  # what optimizer.step() must take: it waits while the capture runs
                stall = time.perf_counter() - start
            future.result()
            _together(self.sharded)  # every rank's files are in place
            _fsync_tree(self.path(step), _rank() if self.sharded else None)  # its writer never fsyncs
        else:
            import torch.distributed.checkpoint as dcp

            future = dcp.async_save(self._states(), checkpoint_id=self.path(step))
            stall = time.perf_counter() - start
            future.result()
        return stall, time.perf_counter() - start

    def load(self, source_root: str, step: int) -> None:
        if self.name == "ckptio":
            assert self.ckpt.load_into(self.model, self.optimizer), "no checkpoint to load"
        elif self.name == "torch_checkpointing":
            loaded = self.manager.load(os.path.join(source_root, f"step-{step}"), into=self._states())
            self._set_optimizer(loaded["optimizer"])
        else:
            import torch.distributed.checkpoint as dcp

            states = self._states()
            dcp.load(states, checkpoint_id=os.path.join(source_root, f"step-{step}"))
            self._set_optimizer(states["optimizer"])
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.model, states["model"])

    def _set_optimizer(self, state) -> None:
        if self.sharded or self.name == "dcp":
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state)

    def prune(self, keep_from: int) -> None:
        """Keep the newest two saves on disk (ckptio's retention does it for ckptio)."""
        if self.name != "ckptio" and (not self.sharded or _rank() == 0):
            for step in range(keep_from):
                shutil.rmtree(self.path(step), ignore_errors=True)

    def close(self) -> None:
        if self.name == "ckptio":
            self.ckpt.close()
        elif self.name == "torch_checkpointing":
            self.manager.close()


def _fsync_tree(path: str, rank: int | None) -> None:
    """The files under ``path`` (with ``rank``: the ones that rank wrote, ``*_{rank}.pt``), then the directories,
    fsync'ed: what ckptio's save does before it returns."""
    for directory, _, names in os.walk(path):
        for name in names:
            if rank is not None and not name.endswith(f"_{rank}.pt"):
                continue
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in (path, os.path.dirname(path)) if not rank else ():
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _together(sharded: bool) -> None:
    """Ranks start a timed step at once: one rank's clock must not count another's os.sync."""
    if sharded:
        import torch.distributed as dist

        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


# -- one measurement, in this (fresh) process ---------------------------------------------------
def measure(spec: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    op, name, root, mib, sharded = spec["op"], spec["method"], spec["root"], spec["mib"], spec.get("sharded", False)
    if sharded:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    model, optimizer = _model(mib, 0 if op != "load" else 1, sharded)
    method = _Method(name, root, model, optimizer, sharded)
    result: dict = {}
    try:
        if op == "save":
            method.save(0)  # warm: buffers allocated, writer threads or processes started
            os.sync()  # no save waits behind the dirty pages of the one before (its own or another method's)
            _together(sharded)
            _reset_peak()
            base, children = _status("VmRSS"), _Children()
            stall, durable = method.save(1)
            result |= {"stall_s": stall, "durable_s": durable, "peak_rss_mib": (_status("VmHWM") - base) / 2**20,
                       "writer_peak_rss_mib": children.stop() / 2**20}  # fmt: skip
            if name == "ckptio":  # the weights and the trainer-state sidecar of the timed save
                where = os.path.join(root, "checkpoints")
                result["bytes"] = sum(_bytes(os.path.join(where, n)) for n in os.listdir(where) if ".e00000001." in n)
            else:
                result["bytes"] = _bytes(method.path(1))
            result["fingerprint"] = _fingerprint(model)
        elif op == "load":
            os.sync()
            _together(sharded)
            _reset_peak()
            base = _status("VmRSS")
            start = time.perf_counter()
            method.load(spec["source"], 1)
            result |= {"load_s": time.perf_counter() - start, "peak_rss_mib": (_status("VmHWM") - base) / 2**20}
            result["fingerprint"] = _fingerprint(model)
        elif op == "growth":
            for step in range(spec["saves"]):
                _step(model, optimizer)
                method.save(step)
                method.prune(step - 1)
                if step + 1 == 5:
                    result["rss_after_5_mib"] = _status("VmRSS") / 2**20
            result[f"rss_after_{spec['saves']}_mib"] = _status("VmRSS") / 2**20
    finally:
        method.close()
    return result


def _run(spec: dict, nproc: int = 0) -> dict:
    """``measure(spec)`` in a fresh process, or in ``nproc`` torchrun ranks (each rank's result)."""
    env = {**os.environ, **_ENV}
    spec = {**spec, "results": tempfile.mkdtemp(prefix="ckptio-peer-results-")}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
               "benchmarks.peer", "--measure", json.dumps({**spec, "sharded": True})]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "benchmarks.peer", "--measure", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = []
    for name in sorted(os.listdir(spec["results"])):
        with open(os.path.join(spec["results"], name)) as f:
            lines.append(json.load(f))
    shutil.rmtree(spec["results"], ignore_errors=True)
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    if not nproc:
        return lines[0]
    # a save or load is done when its slowest rank is; memory is the largest rank's
    return {k: max(r[k] for r in lines) if isinstance(lines[0][k], float) else lines[0][k] for k in lines[0]}


def _median(results: list[dict]) -> dict:
    good = [r for r in results if "error" not in r]
    if not good:
        return results[0]
    return {k: statistics.median(r[k] for r in good) for k in good[0] if isinstance(good[0][k], (int, float))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=float, default=64.0, help="model weights in MiB (the saved state is 3x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--saves", type=int, default=50, help="async saves in the RSS-growth row")
    p.add_argument("--growth-mib", type=float, default=16.0, help="model size of the RSS-growth row")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    p.add_argument("--out", help="write peer.json and peer.md here")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        spec = json.loads(args.measure)
        result = measure(spec)
        with open(os.path.join(spec["results"], f"{_rank()}.json"), "w") as f:  # ranks' stdout interleave
            json.dump(result, f)
        return 0
    methods = tuple(m for m in METHODS if m in args.methods.split(","))
    work = tempfile.mkdtemp(prefix="ckptio-peer-", dir=os.environ.get("CKPTIO_BENCH_DIR"))
    rows: dict[str, dict] = {}
    try:
        for layout, nproc in (("1 process", 0), ("2 ranks", 2)):
            saves: dict[str, list] = {m: [] for m in methods}
            loads: dict[str, list] = {m: [] for m in methods}
            other: dict[str, dict] = {}
            for i in range(args.repeats):
                order = methods if i % 2 == 0 else methods[::-1]
                for m in order:
                    root = os.path.join(work, f"{layout[0]}-{m}-{i}")
                    saves[m].append(_run({"op": "save", "method": m, "root": root, "mib": args.mib}, nproc))
                for m in order:
                    root = os.path.join(work, f"{layout[0]}-{m}-{i}")
                    spec = {"op": "load", "method": m, "root": root, "source": root, "mib": args.mib}
                    loads[m].append(_run(spec, nproc))
                    if nproc and i == 0:  # the same checkpoint, resumed at another world size
                        other[m] = _run({**spec, "root": root}, 1)
                    if i:
                        shutil.rmtree(root, ignore_errors=True)
            for m in methods:
                row = _median(saves[m]) | {f"load_{k}": v for k, v in _median(loads[m]).items()}
                if nproc:
                    row["resume_at_1_rank"] = "error" not in other[m] and abs(
                        other[m].get("fingerprint", 0) - row.get("fingerprint", 0)) < 1e-6 * (1 + abs(row.get("fingerprint", 0)))  # fmt: skip
                    row["resume_at_1_rank_s"] = other[m].get("load_s")
                    row["resume_at_1_rank_error"] = other[m].get("error")
                row["load_matches_save"] = abs(row.get("load_fingerprint", 0) - row.get("fingerprint", 1)) < 1e-6 * (
                    1 + abs(row.get("fingerprint", 0)))  # fmt: skip
                errors = [r["error"] for r in saves[m] + loads[m] if "error" in r]
                if errors:
                    row["error"] = errors[0]
                rows[f"{layout}.{m}"] = row
        for m in methods:
            root = os.path.join(work, f"growth-{m}")
            rows[f"growth.{m}"] = _run({"op": "growth", "method": m, "root": root, "mib": args.growth_mib,
                                        "saves": args.saves})  # fmt: skip
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {}
    for layout in ("1 process", "2 ranks"):
        ours, peer = rows[f"{layout}.ckptio"], rows[f"{layout}.torch_checkpointing"]
        for key in ("stall_s", "durable_s", "load_load_s"):
            if key in ours and key in peer:
                ratios[f"{layout}: {key} ckptio / torch_checkpointing"] = ours[key] / peer[key]
    for m in methods:
        g = rows[f"growth.{m}"]
        if "rss_after_5_mib" in g:
            ratios[f"growth: rss after {args.saves} / after 5, {m}"] = (
                g[f"rss_after_{args.saves}_mib"] / g["rss_after_5_mib"]
            )
    report = _markdown(rows, ratios, args, methods)
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "peer.json"), "w") as f:
            json.dump({"mib": args.mib, "repeats": args.repeats, "saves": args.saves, "rows": rows, "ratios": ratios},
                      f, indent=1)  # fmt: skip
        with open(os.path.join(args.out, "peer.md"), "w") as f:
            f.write(report)
    return 0


def _markdown(rows: dict, ratios: dict, args: argparse.Namespace, methods: tuple[str, ...]) -> str:
    def cell(row: dict, key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        return fmt.format(row[key] * scale) if isinstance(row.get(key), (int, float)) else "-"

    lines = [
        f"{args.mib:g} MiB of weights + Adam ({3 * args.mib:g} MiB saved), median of {args.repeats}, fresh processes.",
        "",
        "| row | stall ms | durable ms | save peak RSS MiB (writer process) | MiB on disk | load ms | load peak RSS MiB | resume at 1 rank |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, row in rows.items():
        if key.startswith("growth."):
            continue
        resume = "-" if "resume_at_1_rank" not in row else (
            f"yes, {row['resume_at_1_rank_s'] * 1e3:.0f} ms" if row["resume_at_1_rank"] else "no")  # fmt: skip
        lines.append(
            f"| {key} | {cell(row, 'stall_s', 1e3)} | {cell(row, 'durable_s', 1e3)} | {cell(row, 'peak_rss_mib')} "
            f"({cell(row, 'writer_peak_rss_mib')}) | {cell(row, 'bytes', 2**-20)} | {cell(row, 'load_load_s', 1e3)} | "
            f"{cell(row, 'load_peak_rss_mib')} | {resume} |"
        )
    lines += ["", f"RSS across async saves ({args.growth_mib:g} MiB model, one save per step, two kept on disk):", "",
              f"| method | after 5 MiB | after {args.saves} MiB |", "|---|---:|---:|"]  # fmt: skip
    for m in methods:
        g = rows[f"growth.{m}"]
        lines.append(f"| {m} | {cell(g, 'rss_after_5_mib')} | {cell(g, f'rss_after_{args.saves}_mib')} |")
    lines += ["", "| ratio | |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
