"""Resume on N simulated nodes from object storage (sharded and replicated): the bytes the store sends, and the time to resume.

    python -m benchmarks.nodes [--size 32M] [--nodes 1,2,4] [--cap-mib 16] [--repeats 1]

A moto S3 server on 127.0.0.1 sits behind a proxy that caps each connection at ``--cap-mib`` MiB/s
(a real store's per-connection limit) and counts the bytes the store sends. One FSDP2 checkpoint
(the benchmark policy of ``--size`` parameter bytes, with Adam state) is saved to it by ckptio and
by DCP (``FsspecWriter``), from 2 ranks. Each row then resumes it on N nodes: N torchrun agents
(``--nnodes=N --node_rank=i``), one rank each, each with its own empty node cache and run directory:

- ``ckptio``: ``Checkpointer.load_into`` (the nodes fetch the checkpoint's pieces once between them
  and send each other the parts their ranks read);
- ``whole``: each node first downloads the whole files into its cache (ckptio before ranged
  resumes), then ``load_into``;
- ``dcp``: ``torch.distributed.checkpoint.load`` through its fsspec reader;
- ``replicated``: the same model unsharded, as a DDP job holds it (saved by ckptio from 2 ranks, with its
  Adam state), resumed with ``load_or_create_policy`` + ``load_optimizer`` on every node (the nodes fetch
  each byte once between them and share pieces);
- ``replicated_whole``: each node first downloads the whole files into its cache (ckptio before shared
  replicated resumes), then the same load;
- ``restart``: the replicated resume of a job restarted in place: node 0's run directory holds the
  checkpoint (the master wrote it there), the others' are empty; the master's disk serves its peers;
- ``warm`` (only when asked for): ``load_into`` on nodes whose caches already hold what their ranks
  read (an earlier resume, in processes of its own, filled them), so nothing is fetched: what a resume costs here besides the
  fetch (finding the checkpoint, stats, headers, agreeing, loading the blocks), with 4 nodes' ranks,
  the store and the proxy sharing this machine's cores.

Time to resume: from before the load to every rank holding its state (the slowest rank). Writes
``benchmarks/results/nodes.json`` and ``nodes.md``.

moto answers a ranged GET by reading the whole object and slicing it (50 ms for 40 KiB of a 48 MiB
object here), a cost no real store has; the server here keeps each object's bytes between
requests, so a range costs moto's per-request overhead (about 12 ms of CPU on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CappedProxy:
    """A TCP proxy on 127.0.0.1 to ``upstream``: counts the bytes sent back to clients; caps each connection's rate."""

    def __init__(self, upstream: int, cap_bytes_s: float):
        self.upstream, self.cap = upstream, cap_bytes_s
        self.sent = 0
        self.port = _free_port()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        ready.set()
        self._loop.run_until_complete(server.serve_forever())

    async def _pump(self, reader, writer, capped: bool) -> None:
        start, moved = time.monotonic(), 0
        try:
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
                if capped:
                    self.sent += len(data)
                    moved += len(data)
                    ahead = moved / self.cap - (time.monotonic() - start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)  # the rate limit itself, not a synchronisation
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        await asyncio.gather(self._pump(client_r, server_w, False), self._pump(server_r, client_w, True))


def _options(port: int) -> dict:
    return {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}


# -- the jobs, under torchrun ---------------------------------------------------------------------
REPLICATED = ("replicated", "restart")  # the jobs that resume the unsharded (DDP) checkpoint


def job(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    import ckptio
    from benchmarks.policy import BenchPolicy
    from benchmarks.sharded import build, with_adam_state

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    arch = BenchPolicy(args.size)
    opts = json.loads(args.opts)
    config = ckptio.CheckpointConfig(remote_uri=f"{args.uri}/run", remote_storage_options=opts)
    torch.manual_seed(0)
    model = build(arch, init_device_mesh("cpu", (world,)), meta=args.job != "save")
    opt = with_adam_state(model)
    dcp_options = {k: v for k, v in opts.items()}
    replicated = ckptio.CheckpointConfig(remote_uri=f"{args.uri}/ddp", remote_storage_options=opts)
    if args.job == "save":
        with ckptio.Checkpointer(args.run_dir, arch, config) as ckpt:
            ckpt.save(model, 0, {"loss": 1.0}, optimizer=opt)
        torch.manual_seed(0)
        policy = arch.make_policy(None)
        with ckptio.Checkpointer(args.run_dir + "-ddp", arch, replicated) as ckpt:
            ckpt.save(policy, 0, {"loss": 1.0}, optimizer=with_adam_state(policy))
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, storage_writer=FsspecWriter(f"{args.uri}/dcp", **dcp_options))
        dist.destroy_process_group()
        return 0
    ckpt = ckptio.Checkpointer(args.run_dir, arch, replicated if args.job.startswith(REPLICATED) else config)
    if args.job == "replicated_whole" and int(os.environ["LOCAL_RANK"]) == 0:
        from ckptio.layout import cache_checkpoint

        remote = ckptio.storage.Storage(f"{args.uri}/ddp/checkpoints", opts)
        weights = next(n for n in remote.listdir() if n.endswith(".e00000000.safetensors"))
    dist.barrier()
    start = time.perf_counter()
    if args.job.startswith(REPLICATED):
        if args.job == "replicated_whole":
            if int(os.environ["LOCAL_RANK"]) == 0:
                cache_checkpoint(remote, weights, ckpt.cache)
            dist.barrier()
        policy = ckpt.load_or_create_policy(None)
        assert ckpt.resumed_from is not None
        ckpt.load_optimizer(policy, torch.optim.Adam(policy.parameters(), lr=1e-3))
    elif args.job == "dcp":
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, storage_reader=FsspecReader(f"{args.uri}/dcp", **dcp_options))
    else:
        if args.job == "whole" and int(os.environ["LOCAL_RANK"]) == 0:
            from ckptio.layout import cache_checkpoint

            remote = ckptio.storage.Storage(f"{args.uri}/run/checkpoints", opts)
            weights = next(n for n in remote.listdir() if n.endswith(".e00000000.safetensors"))
            cache_checkpoint(remote, weights, ckpt.cache)
        dist.barrier()
        assert ckpt.load_into(model, opt)
    seconds = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"seconds": float(seconds)}, f)
    ckpt.close()
    dist.destroy_process_group()
    return 0


# -- the driver -----------------------------------------------------------------------------------
def _serve_ranges_without_rereading() -> None:
    import moto.s3.models

    read = moto.s3.models.FakeKey.value.fget
    kept: dict[tuple, bytes] = {}

    def value(key) -> bytes:
        version = (id(key), key.contentsize, key.etag)
        if version not in kept:
            while len(kept) >= 8:
                kept.pop(next(iter(kept)))
            kept[version] = read(key)
        return kept[version]

    moto.s3.models.FakeKey.value = property(value, moto.s3.models.FakeKey.value.fset)


def _agents(module_args: list[str], nodes: int, work: str, tag: str) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    procs = []
    for i in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
               f"--node_rank={i}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "benchmarks.nodes",
               *module_args, "--run-dir", os.path.join(work, f"{tag}-run{i}"), "--out", os.path.join(work, f"{tag}.json")]  # fmt: skip
        node_env = {**env, "CKPTIO_CACHE_DIR": os.path.join(work, f"{tag}-cache{i}")}
        procs.append(subprocess.Popen(cmd, env=node_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"{tag} failed ({p.returncode}):\n{out[-2000:]}\n{err[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="32M")
    p.add_argument("--nodes", default="1,2,4")
    p.add_argument("--cap-mib", type=float, default=16.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--methods", default="ckptio,whole,dcp,replicated,replicated_whole,restart")
    p.add_argument(
        "--job", choices=["save", "ckptio", "whole", "dcp", "warm", "replicated", "replicated_whole", "restart"]
    )  # inside torchrun
    p.add_argument("--uri")
    p.add_argument("--opts")
    p.add_argument("--run-dir")
    p.add_argument("--out")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--serve-s3", type=int, help="run the benchmark's S3 server on this port (internal)")
    args = p.parse_args(argv)
    if args.serve_s3:
        from moto.server import ThreadedMotoServer

        _serve_ranges_without_rereading()
        ThreadedMotoServer(ip_address="127.0.0.1", port=args.serve_s3, verbose=False).start()
        print("READY", flush=True)
        threading.Event().wait()
    if args.job:
        args.size = int(args.size)
        return job(args)
    from moto.server import ThreadedMotoServer

    import ckptio
    from benchmarks.__main__ import parse_size

    size = parse_size(args.size)
    moto_port = _free_port()
    # a process of its own: moto's request handling does not share a GIL with the proxy
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.nodes", "--serve-s3", str(moto_port)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})  # fmt: skip
    if server.stdout.readline().strip() != "READY":
        raise RuntimeError("the S3 server did not start")
    work = tempfile.mkdtemp(prefix="ckptio-nodes-")
    try:
        proxy = CappedProxy(moto_port, args.cap_mib * 2**20)
        import s3fs

        s3fs.S3FileSystem(**_options(moto_port)).mkdir("bench")
        uri = "s3://bench/ckpt"
        direct = ["--uri", uri, "--size", str(size)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "benchmarks.nodes", "--job", "save", *direct, "--opts", json.dumps(_options(moto_port)),
               "--run-dir", os.path.join(work, "save-run"), "--out", os.path.join(work, "save.json")]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE),
               "CKPTIO_CACHE_DIR": os.path.join(work, "save-cache")}  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        fs = s3fs.S3FileSystem(**_options(moto_port))
        stored = {
            "ckptio": sum(i["size"] for i in fs.ls("bench/ckpt/run/checkpoints", detail=True) if i["name"].endswith(".safetensors")),
            "dcp": sum(i["size"] for i in fs.ls("bench/ckpt/dcp", detail=True)),
        }  # fmt: skip
        stored["whole"] = stored["warm"] = stored["ckptio"]
        stored["replicated"] = stored["replicated_whole"] = stored["restart"] = sum(
            i["size"] for i in fs.ls("bench/ckpt/ddp/checkpoints", detail=True) if i["name"].endswith(".safetensors")
        )
        rows: dict[str, dict] = {}
        for nodes in [int(n) for n in args.nodes.split(",")]:
            for method in args.methods.split(","):
                samples = []
                for r in range(args.repeats):
                    tag = f"{method}-{nodes}-{r}"
                    if method == "warm":  # a resume of its own (processes too) fills each node's cache first
                        _agents(
                            ["--job", "ckptio", *direct, "--opts", json.dumps(_options(proxy.port))], nodes, work, tag
                        )
                    if method == "restart":  # node 0's run directory holds what the master saved there
                        shutil.copytree(os.path.join(work, "save-run-ddp"), os.path.join(work, f"{tag}-run0"))
                    before = proxy.sent
                    _agents(["--job", method, *direct, "--opts", json.dumps(_options(proxy.port))], nodes, work, tag)
                    with open(os.path.join(work, f"{tag}.json")) as f:
                        seconds = json.load(f)["seconds"]
                    samples.append({"seconds": seconds, "bytes": proxy.sent - before})
                    for name in os.listdir(work):
                        if name.startswith(tag + "-"):
                            shutil.rmtree(os.path.join(work, name), ignore_errors=True)
                best = min(samples, key=lambda s: s["seconds"])
                row = {"nodes": nodes, "method": method, "seconds": best["seconds"], "bytes": best["bytes"],
                       "per_checkpoint_byte": best["bytes"] / stored[method], "checkpoint_bytes": stored[method]}  # fmt: skip
                rows[f"nodes.{method}.{nodes}"] = row
                print(f"  {nodes} node(s) {method:7s} {row['bytes'] / 2**20:8.1f} MiB "
                      f"({row['per_checkpoint_byte']:.2f}x)  {row['seconds']:7.2f} s", flush=True)  # fmt: skip
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    result = {"size": size, "cap_mib_s": args.cap_mib, "ckptio_version": ckptio.__version__, "rows": rows}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "nodes.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.results, "nodes.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        f"# Resume on N nodes ({result['size'] / 2**20:.0f} MiB of parameters + Adam; "
        f"each connection capped at {result['cap_mib_s']:g} MiB/s)",
        "",
        "| nodes | method | bytes the store sent | per checkpoint byte | time to resume |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in rows.values():
        lines.append(f"| {row['nodes']} | {row['method']} | {row['bytes'] / 2**20:.1f} MiB | "
                     f"{row['per_checkpoint_byte']:.2f}x | {row['seconds']:.2f} s |")  # fmt: skip
    lines.append("")
    for nodes in sorted({r["nodes"] for r in rows.values()}):
        a, b, c = (rows.get(f"nodes.{m}.{nodes}") for m in ("replicated", "replicated_whole", "restart"))
        if a and b:
            lines.append(f"- {nodes} node(s), replicated: the store sent {a['per_checkpoint_byte']:.2f}x the checkpoint "
                         f"(whole-file downloads: {b['per_checkpoint_byte']:.2f}x); time to resume "
                         f"{a['seconds'] / b['seconds']:.2f}x the whole-file downloads'")  # fmt: skip
        if c:
            lines.append(f"- {nodes} node(s), restart in place: the store sent {c['bytes'] / 2**20:.2f} MiB "
                         f"({c['per_checkpoint_byte']:.3f}x the checkpoint), {c['seconds']:.2f} s")  # fmt: skip
        a, b = rows.get(f"nodes.ckptio.{nodes}"), rows.get(f"nodes.whole.{nodes}")
        if a and b:
            warm = rows.get(f"nodes.warm.{nodes}")
            floor = f"; a resume fetching nothing (warm caches): {warm['seconds'] / b['seconds']:.2f}x" if warm else ""
            lines.append(f"- {nodes} node(s): ckptio's time to resume is {a['seconds'] / b['seconds']:.2f}x the "
                         f"whole-file download's; bytes {a['bytes'] / b['bytes']:.2f}x{floor}")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
