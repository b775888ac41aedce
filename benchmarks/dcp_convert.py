"""Converting a torch.distributed.checkpoint (DCP) checkpoint into one standard file: ckptio against what users do now.

    python -m benchmarks.dcp_convert [--size 512M] [--repeats 3]

A 2-rank FSDP2 job saves the benchmark policy of ``--size`` parameter bytes with its Adam state with
``dcp.save`` (``{"model", "optimizer"}``, as torchtitan checkpoints). Then, in fresh processes, in turns:

- ``ckptio``: ``ckptio.convert(DCP_DIR, "policy.safetensors")`` (the weights, and the optimizer in the
  trainer-state sidecar), one tensor at a time;
- ``torch``: ``dcp_to_torch_save(DCP_DIR, "state.pt")``, then ``torch.load`` + ``safetensors.torch.save_file``
  of its model (the route users take today: the whole state in memory, a pickle on the way).

Each is timed, and its peak anonymous memory (``RssAnon``, sampled every 2 ms, with
``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors return to the system) measured over the same process
before it started. Writes ``benchmarks/results/dcp_convert.json`` and ``.md``.
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

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

MEASURE = r"""
import json, os, sys, threading, time
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
method, src, out = sys.argv[1:4]
import torch, ckptio, ckptio.dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # both methods' imports before the clock
base, peak, stop = anon(), [0], threading.Event()
def sample():
    while not stop.wait(0.002):
        peak[0] = max(peak[0], anon())
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if method == "ckptio":
    ckptio.convert(src, os.path.join(out, "policy.safetensors"))
else:
    dcp_to_torch_save(src, os.path.join(out, "state.pt"))
    state = torch.load(os.path.join(out, "state.pt"), weights_only=True)
    save_file({k: v.contiguous() for k, v in state["model"].items()}, os.path.join(out, "policy.safetensors"))
seconds = time.perf_counter() - start
stop.set()
peak[0] = max(peak[0], anon())
print(json.dumps({"seconds": seconds, "peak_anon": peak[0] - base}))
"""


def save_job() -> int:
    """Under torchrun: the FSDP2 benchmark policy with Adam state, saved with dcp.save."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.policy import BenchPolicy
    from benchmarks.sharded import build, with_adam_state

    size, where = int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build(BenchPolicy(size), init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = with_adam_state(model)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=where)  # fmt: skip
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="512M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    import ckptio
    from benchmarks.__main__ import parse_size

    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="ckptio-dcp-convert-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE), "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        src = os.path.join(work, "dcp")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "benchmarks.dcp_convert", "--save-job", str(size), src], env=env, check=True,
                       capture_output=True)  # fmt: skip
        described = ckptio.inspect_checkpoint(src)
        largest = max(t["bytes"] for t in described["tensors"].values())
        samples: dict[str, list[dict]] = {"ckptio": [], "torch": []}
        for r in range(args.repeats):
            for method in ("ckptio", "torch") if r % 2 == 0 else ("torch", "ckptio"):
                out = os.path.join(work, f"{method}-{r}")
                os.makedirs(out)
                proc = subprocess.run([sys.executable, "-c", MEASURE, method, src, out], env=env, check=True,
                                      capture_output=True, text=True)  # fmt: skip
                samples[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"  {method:6s} {samples[method][-1]['seconds']:7.2f} s  "
                      f"{samples[method][-1]['peak_anon'] / 2**20:8.1f} MiB", flush=True)  # fmt: skip
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {
        m: {"seconds": statistics.median(s["seconds"] for s in v), "peak_anon": max(s["peak_anon"] for s in v),
            "samples": v}
        for m, v in samples.items()
    }  # fmt: skip
    result = {"size": size, "state_bytes": described["total_bytes"], "largest_tensor": largest,
              "ckptio_version": ckptio.__version__, "rows": rows}  # fmt: skip
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "dcp_convert.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.results, "dcp_convert.md"), "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    c, t, mib = result["rows"]["ckptio"], result["rows"]["torch"], 2**20
    bound = 2 * result["largest_tensor"] + 64 * mib
    return "\n".join([
        f"# Converting a DCP checkpoint ({result['state_bytes'] / mib:.0f} MiB: model + Adam, saved by 2 FSDP2 ranks)",
        "",
        "| method | time (median) | peak anonymous memory (max) |",
        "|---|---:|---:|",
        f"| ckptio convert (streamed) | {c['seconds']:.2f} s | {c['peak_anon'] / mib:.1f} MiB |",
        f"| dcp_to_torch_save + torch.load + save_file | {t['seconds']:.2f} s | {t['peak_anon'] / mib:.1f} MiB |",
        "",
        f"- time: {c['seconds'] / t['seconds']:.2f}x (target <= 1.0x)",
        f"- peak memory: {c['peak_anon'] / mib:.1f} MiB against the bound 2 x the largest tensor "
        f"({result['largest_tensor'] / mib:.1f} MiB) + 64 MiB = {bound / mib:.1f} MiB "
        f"({'met' if c['peak_anon'] <= bound else 'not met'}); torch's route: {t['peak_anon'] / result['state_bytes']:.2f}x "
        "the state",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--save-job":
        sys.exit(save_job())
    sys.exit(main())
