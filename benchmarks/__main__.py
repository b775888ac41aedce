"""Run the checkpoint benchmarks: ``python -m benchmarks [--sizes 64M,1G] [--repeats 3] [--out DIR]``.

Every measurement runs in a fresh subprocess. Results: DIR/results.json (every raw measurement
and environment facts), DIR/results.md (medians, spreads, ratios to torch.load, targets) and
DIR/*.png (time and peak memory against checkpoint size).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

import ckptio
from benchmarks.policy import BenchPolicy, state_dict_bytes
from benchmarks.report import advice, write_reports

LOAD_METHODS = [
    "torch_load",
    "torch_load_weights_only",
    "torch_load_mmap",
    "safetensors_load_file",
    "dcp_load",
    "ckptio",
]
SAVE_METHODS = ["raw_write", "torch_save", "safetensors_save_file", "dcp_save", "ckptio"]
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def warm(path: str) -> None:
    for root, _, names in (
        os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]
    ):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                while f.read(16 << 20):
                    pass


def prepare(size: int, data_dir: str) -> dict[str, str]:
    """The same state dict in every format under test."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    os.makedirs(data_dir, exist_ok=True)
    arch = BenchPolicy(size)
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = arch.make_policy(None).state_dict()
    sd = {k: torch.randn(v.shape).to(v.dtype) for k, v in shapes.items()}
    files = {
        "pt": os.path.join(data_dir, "sd.pt"),
        "safetensors": os.path.join(data_dir, "stock.safetensors"),
        "ckptio": os.path.join(data_dir, "ckptio.safetensors"),
        "dcp": os.path.join(data_dir, "dcp"),
    }
    torch.save(sd, files["pt"])
    save_file(sd, files["safetensors"])
    ckptio.save_policy_artifact(files["ckptio"].removesuffix(".safetensors"), sd, arch)
    shutil.rmtree(files["dcp"], ignore_errors=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=files["dcp"])
    files["bytes"] = str(state_dict_bytes(sd))
    files["tensors"] = str(len(sd))
    return files


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


_server: subprocess.Popen | None = None  # --quick: one worker process for every row


def _stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        _server.wait(timeout=60)


def measure(spec: dict, timeout: float = 900) -> dict:
    """One measurement in a fresh worker process (with --quick, in the one shared worker)."""
    if _server is not None:
        _server.stdin.write(json.dumps(spec) + "\n")
        _server.stdin.flush()
        line = _server.stdout.readline()
        if not line:
            raise RuntimeError(f"worker failed for {spec['op']}/{spec['method']} (see its stderr above)")
        return json.loads(line)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {spec['op']}/{spec['method']}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def many_ranks(files: dict[str, str], method: str, ranks: int = 2) -> dict:
    """Processes loading the same file at once: the memory they hold that cannot be reclaimed (their own
    anonymous memory, summed; other processes on the machine do not count), and the MemAvailable drop."""

    def available() -> int:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))

    warm(files["ckptio"] if method == "ckptio" else files["pt"])
    before = available()
    spec = json.dumps({"op": "hold", "method": method, "files": files})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(ranks)
    ]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]  # each line: loaded, touched, holding
        during = available()
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=120)
    return {
        "own_anon_growth": sum(r["anon_growth"] for r in reports),
        "mem_available_drop": before - during,
        "peak_rss": [r["peak_rss"] for r in reports],
    }


def sharded_rows(size: int, data_dir: str, ranks: int, repeats: int) -> dict:
    """The FSDP2 rows (benchmarks/sharded.py), measured in one torchrun job of ``ranks`` processes."""
    out = os.path.join(data_dir, "sharded.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "benchmarks.sharded", "--size", str(size), "--dir", os.path.join(data_dir, "sharded"),
           "--out", out, "--repeats", str(repeats)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    shutil.rmtree(os.path.join(data_dir, "sharded"), ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sharded benchmark failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        result = json.load(f)
    for key, row in result["rows"].items():
        print(
            f"  {key:40s} {row['median_s'] * 1e3:10.2f} ms  master +{row['peak_rss_delta'] / 2**20:.1f} MiB", flush=True
        )
    return {**result["rows"], "sharded.facts": result["facts"]}


def summarize(samples: list[dict]) -> dict:
    secs = [s["seconds"] for s in samples]
    mem = [s.get("peak_rss_delta", 0) for s in samples]
    return {
        "median_s": statistics.median(secs),
        "min_s": min(secs),
        "max_s": max(secs),
        "peak_rss_delta": statistics.median(mem),
        "samples": samples,
    }


def repeat(specs: dict[str, dict], files: dict[str, str], size: int, repeats: int, cold_cache: bool) -> dict:
    """Measure each spec ``repeats`` times, round-robin, each round starting one method later, so
    a slow phase of the machine (the first large write of a sequence especially) falls on every
    method alike rather than on whichever ran then."""
    samples: dict[str, list[dict]] = {key: [] for key in specs}
    keys = list(specs)
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            spec = specs[key]
            if spec["op"] == "save":
                write_before_save(files, os.path.dirname(spec["out"]))
            os.sync()  # earlier measurements' dirty pages must not be flushed inside this one
            if cold_cache:
                drop_caches()
            else:
                for k in ("ckptio", "pt", "safetensors", "dcp"):
                    warm(files[k])
            samples[key].append(measure({**spec, "files": files, "target_bytes": size}))
            for path in spec.get("outputs", ()):
                _remove(path)
    return {key: summarize(s) for key, s in samples.items()}


def write_before_save(files: dict[str, str], directory: str) -> None:
    """An untimed durable write of the checkpoint's size, so every timed save follows the same.

    The virtual disk here is still absorbing a large write after sync returns (a 1 GiB save right
    after another 1 GiB write takes about 2.5x longer than after a pause): without this, a save's
    time would depend on which method ran before it.
    """
    tmp = os.path.join(directory, "write-before-save")
    shutil.copyfile(files["ckptio"], tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.unlink(tmp)


def describe_storage(path: str) -> dict[str, str]:
    """The filesystem under ``path`` and whether ckptio maps or reads files there, and why."""
    from ckptio.storage import is_network_filesystem

    real, fstype, best = os.path.realpath(path), "unknown", ""
    with open("/proc/mounts") as f:
        for fields in map(str.split, f):
            mount = fields[1].replace("\\040", " ")
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, fields[2]
    if is_network_filesystem(path):
        return {"filesystem": fstype, "reads": "eager",
                "why": "a network or FUSE filesystem: mapped page faults would be network round trips, so "
                       "ckptio reads each file in one sequential pass (mmap=True overrides)"}  # fmt: skip
    return {"filesystem": fstype, "reads": "mmap",
            "why": "a local filesystem: ckptio maps files, pages load on first touch and processes share "
                   "the page cache (mmap=False overrides)"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64M,1G", help="comma-separated checkpoint sizes (K/M/G)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--cold", action="store_true", help="also measure loads after dropping the page cache (needs root)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, 1 many-ranks run: a smoke test")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated row-name prefixes to measure (e.g. save.,stall.)")
    p.add_argument(
        "--dir", help="where checkpoint files are written and read (a local NVMe, a network mount); default OUT/data"
    )
    p.add_argument(
        "--remote-uri", help="also measure uploading and downloading the checkpoint here (s3://, gs://, ...)"
    )
    p.add_argument("--storage-options", help="JSON object for fsspec with --remote-uri: endpoint, credentials")
    args = p.parse_args(argv)
    opts = json.loads(args.storage_options) if args.storage_options else {}
    if args.quick:
        args.sizes, args.repeats = "2M", 1
        global _server
        _server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        atexit.register(_stop_server)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    os.makedirs(args.out, exist_ok=True)
    cold = args.cold and can_drop_caches()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckptio": ckptio.__version__,
        "safetensors": __import__("safetensors").__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "cache": "warm and cold" if cold else "warm",
        "cold_cache_note": None
        if cold
        else ("not requested" if not args.cold else "cannot drop the page cache here (not root)"),
        "repeats": args.repeats,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    data_root = os.path.abspath(args.dir or os.path.join(args.out, "data"))
    os.makedirs(data_root, exist_ok=True)
    env["storage"] = describe_storage(data_root)
    print(f"files in {data_root} ({env['storage']['filesystem']}): {env['storage']['reads']} reads, "
          f"{env['storage']['why']}", flush=True)  # fmt: skip
    if args.remote_uri:
        env["remote_uri"] = args.remote_uri
    results: dict = {"environment": env, "sizes": {}}
    for size in sizes:
        data_dir = os.path.join(data_root, str(size))
        files = prepare(size, data_dir)
        nbytes = int(files["bytes"])
        print(f"== {nbytes / 2**20:.0f} MiB, {files['tensors']} tensors", flush=True)
        rows: dict = {}

        def wanted(key: str) -> bool:
            return not args.only or key.startswith(tuple(args.only.split(",")))

        def run_group(specs: dict[str, dict], cold_cache: bool = False, files=files, size=size, rows=rows) -> None:
            specs = {key: spec for key, spec in specs.items() if wanted(key)}
            if not specs:
                return
            rows.update(repeat(specs, files, size, args.repeats, cold_cache))
            for key in specs:
                print(f"  {key:40s} {rows[key]['median_s'] * 1e3:10.2f} ms", flush=True)

        def run(key: str, spec: dict, cold_cache: bool = False) -> None:
            run_group({key: spec}, cold_cache)

        for op in ("open", "full"):
            for m in LOAD_METHODS:
                run(f"load.{op}.{m}", {"op": op, "method": m})
                if cold:
                    run(f"load_cold.{op}.{m}", {"op": op, "method": m}, cold_cache=True)
        run("load.open.ckptio_tensors", {"op": "open", "method": "ckptio_tensors"})
        run("load.open.naive_mmap", {"op": "open", "method": "naive_mmap"})
        run("limit.readinto", {"op": "readinto", "method": "raw"})
        run("limit.header", {"op": "header", "method": "raw"})
        run("limit.header_json", {"op": "header_json", "method": "raw"})
        run("limit.header_safetensors", {"op": "header_safetensors", "method": "raw"})
        run("limit.resident_sum", {"op": "resident_sum", "method": "raw"})
        for m in ("baseline", "ckptio"):
            run(f"ready.{m}", {"op": "ready", "method": m})
        writes: dict[str, dict] = {}
        for m in SAVE_METHODS:
            out = os.path.join(data_dir, f"save-{m}")
            writes[f"save.{m}"] = {"op": "save", "method": m, "out": out, "outputs": [out]}
        for m in ("ckptio", "dcp_async_save"):
            out = os.path.join(data_dir, f"stall-{m}")
            writes[f"stall.{m}"] = {"op": "stall", "method": m, "out": out, "outputs": [out, out + "-warmup"]}
        writes["limit.copy"] = {"op": "copy", "method": "raw"}
        run_group(writes)
        if args.remote_uri and wanted("remote."):
            remote = {"uri": f"{args.remote_uri.rstrip('/')}/ckptio-bench-{size}", "options": opts,
                      "source": "source.safetensors"}  # fmt: skip
            source = ckptio.storage.Storage(remote["uri"], opts)
            source.put_file(files["ckptio"], remote["source"], timeout=None)  # what the downloads read
            run_group({f"remote.{op}.{m}": {"op": op, "method": m, "remote": remote}
                       for op in ("upload", "download") for m in ("ckptio", "fsspec")})  # fmt: skip
            source.delete(remote["source"])
        for m in ("torch_load", "ckptio") if wanted("ranks.") else ():
            reps = [many_ranks(files, m, args.ranks) for _ in range(1 if args.quick else args.repeats)]
            rows[f"ranks.{m}"] = {
                "own_anon_growth": statistics.median(r["own_anon_growth"] for r in reps),
                "mem_available_drop": statistics.median(r["mem_available_drop"] for r in reps),
                "peak_rss": reps[-1]["peak_rss"],
                "samples": reps,
            }
            print(f"  ranks.{m:34s} {rows[f'ranks.{m}']['own_anon_growth'] / 2**20:10.1f} MiB held", flush=True)
        if wanted("sharded."):
            rows.update(sharded_rows(size, data_dir, args.ranks, 1 if args.quick else args.repeats))
        results["sizes"][str(nbytes)] = {
            "tensors": int(files["tensors"]),
            "file_bytes": os.path.getsize(files["ckptio"]),
            "rows": rows,
        }
        for key in ("pt", "safetensors", "ckptio"):
            os.unlink(files[key])
        shutil.rmtree(files["dcp"], ignore_errors=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_reports(results, args.out)
    for line in advice(results):
        print(line)
    print(f"wrote {args.out}/results.json, results.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
