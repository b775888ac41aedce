"""A Hugging Face folder from a checkpoint: ``ckptio export --hf`` against ``save_pretrained`` of the loaded model.

    python -m benchmarks.hf_export [--gib 1.0] [--repeats 3] [--shard 5GB] [--out DIR]

A LlamaForCausalLM of about ``--gib`` GiB (float32, built from a config, no hub) is saved once as a ckptio
checkpoint. Then, alternating, each in a fresh process (``MALLOC_MMAP_THRESHOLD_`` set, so freed tensors leave
RSS): ``export`` streams the checkpoint into a folder; ``save_pretrained`` loads the checkpoint into the model
(ckptio's mapped load, then transformers' save, which reads every tensor) and writes the folder. Each row: wall
seconds (the medians) and the process's peak RSS (VmHWM). ``save_pretrained`` is timed for the save alone too.
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

CHILD = r"""
import json, sys, time
import ckptio
ckptio.allow_architecture_modules("transformers")
method, run, out, shard = sys.argv[1:5]
start = time.perf_counter()
if method == "export":
    ckptio.export(run, out, hf=True, max_shard_size=shard)
    saved = time.perf_counter() - start
else:
    model = ckptio.load_from_uri(run).instantiate()
    begin = time.perf_counter()
    model.save_pretrained(out, max_shard_size=shard)
    saved = time.perf_counter() - begin
total = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"total_s": total, "save_s": saved, "peak_rss_mib": hwm / 1024}))
"""


def _config(gib: float):
    from transformers import LlamaConfig

    layer = 4 * 1024 * 1024 + 3 * 1024 * 2816  # attention (GQA: q, o full; k, v a quarter each) and MLP
    embed = 32000 * 1024
    layers = max(1, round((gib * 2**30 / 4 - embed) / layer))
    return LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=4, tie_word_embeddings=True,
    )  # fmt: skip


def _bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="model size in GiB (float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard", default="5GB", help="max_shard_size of both")
    p.add_argument("--out", help="write hf_export.json here")
    args = p.parse_args(argv)
    import torch
    from transformers import LlamaForCausalLM

    import ckptio

    work = tempfile.mkdtemp(prefix="ckptio-hf-")
    try:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(_config(args.gib))
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gave the tied embedding and head memory each: one tensor again
        with torch.no_grad():
            for t in model.parameters():
                t.normal_(0, 0.02)
        run = os.path.join(work, "run")
        ckptio.CheckpointManager(run).save_checkpoint(
            model, 0, policy_architecture=ckptio.TransformersArchitecture.of(model)
        )
        checkpoint_bytes = os.path.getsize(ckptio.latest(run).uri)
        del model
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
        runs: dict[str, list[dict[str, float]]] = {"export": [], "save_pretrained": []}
        written: dict[str, int] = {}
        for i in range(args.repeats):
            for method in ("export", "save_pretrained") if i % 2 == 0 else ("save_pretrained", "export"):
                out = os.path.join(work, f"{method}-{i}")
                proc = subprocess.run([sys.executable, "-c", CHILD, method, run, out, args.shard], env=env,
                                      capture_output=True, text=True, check=True)  # fmt: skip
                runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                written[method] = _bytes(out)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {
        method: {key: statistics.median(r[key] for r in rs) for key in rs[0]} | {"bytes": written[method]}
        for method, rs in runs.items()
    }
    ratios = {
        "time_export_over_save_pretrained": rows["export"]["total_s"] / rows["save_pretrained"]["total_s"],
        "time_export_over_save_pretrained_save_alone": rows["export"]["total_s"] / rows["save_pretrained"]["save_s"],
        "peak_rss_export_over_save_pretrained": rows["export"]["peak_rss_mib"]
        / rows["save_pretrained"]["peak_rss_mib"],
    }
    for method, row in rows.items():
        print(f"{method}: {row['total_s']:.2f} s (save {row['save_s']:.2f} s), peak RSS {row['peak_rss_mib']:.0f} MiB")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "hf_export.json"), "w") as f:
            json.dump({"checkpoint_bytes": checkpoint_bytes, "repeats": args.repeats, "shard": args.shard, "rows": rows,
                       "ratios": ratios}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
