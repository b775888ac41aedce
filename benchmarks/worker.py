"""One measurement in a fresh process: ``python -m benchmarks.worker JSON`` prints a JSON result.

The timed region excludes interpreter start and imports; memory is the peak RSS growth during
the operation (VmHWM, reset just before it, against the RSS then).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time
from collections.abc import Mapping

import torch

import ckptio
from benchmarks.policy import BenchPolicy
from ckptio.formats import read_header


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    # ru_maxrss survives exec (it would report the parent's size): use VmHWM, reset to "now"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def touch(sd: Mapping[str, torch.Tensor]) -> int:
    """Read every byte of every tensor (so mapped pages really load), at memory bandwidth."""
    total = 0
    for t in sd.values():
        if not t.numel():
            continue
        flat = t.reshape(-1).view(torch.uint8)
        n8 = flat.numel() // 8 * 8
        try:
            total += int(flat[:n8].view(torch.int64).sum()) + int(flat[n8:].sum(dtype=torch.int64))
        except RuntimeError:  # not 8-byte aligned: the slow byte-wise sum still reads everything
            total += int(flat.sum(dtype=torch.int64))
    return total


def _durable(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_durably(tmp: str, path: str) -> None:
    _durable(tmp)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def load(method: str, files: dict[str, str]) -> Mapping[str, torch.Tensor]:
    if method == "torch_load":
        return torch.load(files["pt"], weights_only=False)
    if method == "torch_load_weights_only":
        return torch.load(files["pt"], weights_only=True)
    if method == "torch_load_mmap":
        return torch.load(files["pt"], weights_only=True, mmap=True)
    if method == "safetensors_load_file":
        from safetensors.torch import load_file

        return load_file(files["safetensors"])
    if method == "dcp_load":
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(files["dcp"]).read_metadata()
        sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()}
        dcp.load(sd, checkpoint_id=files["dcp"])
        return sd
    if method == "naive_mmap":  # the reference loader: json.loads, mmap, one frombuffer per tensor, no checks
        return _naive_mmap(files["ckptio"])
    if method == "ckptio":  # what the loader returns: tensor objects are made on first access
        return ckptio.load_from_uri(files["ckptio"]).state_dict  # type: ignore[return-value]
    if method == "ckptio_tensors":  # the same, with all tensor objects made up front
        return dict(ckptio.load_from_uri(files["ckptio"]).state_dict)
    raise ValueError(method)


def _naive_mmap(path: str) -> dict[str, torch.Tensor]:
    from ckptio.formats import _DTYPES

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    header.pop("__metadata__", None)
    out = {}
    for k, e in header.items():
        dtype, (begin, end) = _DTYPES[e["dtype"]], e["data_offsets"]
        count = (end - begin) // dtype.itemsize
        out[k] = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin).view(e["shape"])
    return out


def run(spec: dict) -> dict:
    op, method, files = spec["op"], spec["method"], spec["files"]
    import warnings

    warnings.filterwarnings("ignore")
    result: dict = {}
    _reset_peak()
    rss0 = _rss()
    if op in ("open", "full"):
        t = time.perf_counter()
        sd = load(method, files)
        if op == "full":
            touch(sd)
        result["seconds"] = time.perf_counter() - t
    elif op == "resident_sum":  # the floor for "fully read": the same tensors already in RAM
        sd = {k: v.clone() for k, v in load("ckptio", files).items()}
        touch(sd)
        _reset_peak()
        rss0 = _rss()
        t = time.perf_counter()
        touch(sd)
        result["seconds"] = time.perf_counter() - t
    elif op == "copy":  # the floor for an async save's stall: copy the tensors into reused buffers
        sd = {k: v.clone() for k, v in load("ckptio", files).items()}
        bufs = {k: v.clone() for k, v in sd.items()}
        _reset_peak()
        rss0 = _rss()
        t = time.perf_counter()
        for k, v in sd.items():
            bufs[k].copy_(v)
        result["seconds"] = time.perf_counter() - t
    elif op == "readinto":
        buf = bytearray(os.path.getsize(files["ckptio"]))
        _reset_peak()
        rss0 = _rss()
        t = time.perf_counter()
        with open(files["ckptio"], "rb", buffering=0) as f:
            view, got = memoryview(buf), 0
            while got < len(buf):
                got += f.readinto(view[got:])
        result["seconds"] = time.perf_counter() - t
    elif op == "header":  # ckptio's header read: JSON parse plus every offset/shape/dtype check
        t = time.perf_counter()
        with open(files["ckptio"], "rb") as f:
            read_header(f, os.fstat(f.fileno()).st_size, files["ckptio"])
        result["seconds"] = time.perf_counter() - t
    elif op == "header_json":  # the floor: read the header bytes and json.loads them, nothing checked
        t = time.perf_counter()
        with open(files["ckptio"], "rb") as f:
            json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        result["seconds"] = time.perf_counter() - t
    elif op == "header_safetensors":  # the stock library's header parse and validation (Rust)
        from safetensors import safe_open

        t = time.perf_counter()
        with safe_open(files["ckptio"], "pt") as f:
            f.keys()
        result["seconds"] = time.perf_counter() - t
    elif op == "ready":
        arch = BenchPolicy(spec["target_bytes"])
        t = time.perf_counter()
        if method == "ckptio":
            module = ckptio.load_from_uri(files["ckptio"]).instantiate(None)
        else:  # the usual way: construct (random init), then copy the pickle's tensors in
            module = arch.make_policy(None)
            module.load_state_dict(torch.load(files["pt"], weights_only=True))
        result["seconds"] = time.perf_counter() - t
        result["params"] = sum(p.numel() for p in module.parameters())
    elif op in ("upload", "download"):
        result.update(_transfer(op, method, files["ckptio"], spec["remote"]))
        result["peak_rss_delta"] = max(_peak() - rss0, 0)
        return result
    elif op in ("save", "stall"):
        sd = {k: v.clone() for k, v in load("ckptio", files).items()}  # resident, as after training
        _reset_peak()
        rss0 = _rss()
        out = spec["out"]
        result.update(_save(method, op, sd, out))
        result["peak_rss_delta"] = max(_peak() - rss0, 0)
        if op == "save" and method != "raw_write":
            result["roundtrip"] = _roundtrip(method, sd, out)  # untimed: the saved bytes load back equal
        return result
    else:
        raise ValueError(op)
    result["peak_rss_delta"] = max(_peak() - rss0, 0)
    return result


def _transfer(op: str, method: str, local: str, remote: dict) -> dict:
    """One checkpoint file to or from object storage: through ckptio, or fsspec's own put/get of the same bytes."""
    import shutil
    import tempfile
    import uuid

    import fsspec

    from ckptio.cache import NodeCache
    from ckptio.storage import Storage

    uri, opts = remote["uri"], remote["options"]
    storage = Storage(uri, opts)
    fs, root = fsspec.core.url_to_fs(uri, **opts)
    if op == "upload":
        name = f"upload-{uuid.uuid4().hex[:8]}.safetensors"
        t = time.perf_counter()
        if method == "ckptio":  # the call ckptio's background uploader makes
            storage.put_file(local, name, timeout=None)
        else:
            fs.put_file(local, f"{root.rstrip('/')}/{name}")
        seconds = time.perf_counter() - t
        storage.delete(name)
    else:
        scratch = tempfile.mkdtemp(dir=os.path.dirname(local))
        t = time.perf_counter()
        if method == "ckptio":  # a resume's download into the node cache: temporary, fsync, rename
            NodeCache(scratch).fetch(storage, remote["source"])
        else:
            fs.get_file(f"{root.rstrip('/')}/{remote['source']}", os.path.join(scratch, "copy"))
        seconds = time.perf_counter() - t
        shutil.rmtree(scratch)
    return {"seconds": seconds, "bytes": os.path.getsize(local)}


def _save(method: str, op: str, sd: dict[str, torch.Tensor], out: str) -> dict:
    tmp = out + ".tmp"
    if op == "stall":
        # steady state: a warm-up save first (buffers allocated, threads started), then the timed one
        if method == "ckptio":
            ck = ckptio.Checkpointer(out, BenchPolicy(1), ckptio.CheckpointConfig(async_save=True))
            ck.save(sd, 1, force=True)
            ck.wait()
            t = time.perf_counter()
            ck.save(sd, 2, force=True)
            stall = time.perf_counter() - t
            ck.close()
        else:
            import torch.distributed.checkpoint as dcp

            dcp.async_save(sd, checkpoint_id=out + "-warmup").result()
            t = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=out)
            stall = time.perf_counter() - t
            fut.result()
        total = time.perf_counter() - t
        return {"seconds": stall, "total_seconds": total}
    t = time.perf_counter()
    if method == "raw_write":
        with open(tmp, "wb", buffering=0) as f:
            for v in sd.values():
                if v.numel():
                    f.write(memoryview(v.reshape(-1).view(torch.uint8).numpy()))
        _replace_durably(tmp, out)
    elif method == "torch_save":
        torch.save(sd, tmp)
        _replace_durably(tmp, out)
    elif method == "safetensors_save_file":
        from safetensors.torch import save_file

        save_file(sd, tmp)
        _replace_durably(tmp, out)
    elif method == "dcp_save":
        import torch.distributed.checkpoint as dcp

        dcp.save(sd, checkpoint_id=out)
        for name in os.listdir(out):
            _durable(os.path.join(out, name))
    elif method == "ckptio":
        ckptio.CheckpointManager(out).save_agent(sd, 1)
    else:
        raise ValueError(method)
    return {"seconds": time.perf_counter() - t}


def _roundtrip(method: str, sd: dict[str, torch.Tensor], out: str) -> bool:
    if method == "ckptio":
        back = dict(ckptio.load_from_uri(out).state_dict)
    elif method == "dcp_save":
        back = load("dcp_load", {"dcp": out})
    elif method == "torch_save":
        back = load("torch_load_weights_only", {"pt": out})
    else:
        back = load("safetensors_load_file", {"safetensors": out})
    return back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())


def _anon() -> int:
    """This process's anonymous memory: what it holds that the kernel cannot drop (mapped file pages it can)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def hold(files: dict[str, str], method: str) -> None:
    """Many-ranks mode: load and touch everything, report, then hold it until stdin closes."""
    _reset_peak()
    anon0 = _anon()
    sd = load(method, files)
    touch(sd)
    print(json.dumps({"peak_rss": _peak(), "rss": _rss(), "anon_growth": _anon() - anon0}), flush=True)
    sys.stdin.read()


def serve() -> None:
    """Quick mode: one process measures spec after spec (a JSON line in, a JSON line out) instead of a
    fresh process each; its memory figures carry over between rows, so it is for smoke tests only."""
    for line in sys.stdin:
        spec = json.loads(line)
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit(0)
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["op"] == "hold":
        hold(spec["files"], spec["method"])
    else:
        print(json.dumps(run(spec)))
