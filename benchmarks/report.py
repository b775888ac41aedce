"""Markdown table, target check and plots from a results dict."""

from __future__ import annotations

import os
from typing import Any

TARGETS = [
    # (name, numerator row, denominator row, comparison, bound, what it means)
    ("open vs torch.load", "load.open.torch_load", "load.open.ckptio", ">=", 200, "times faster"),
    ("open vs header parse", "load.open.ckptio", "limit.header", "<=", 2, "x the header parse"),
    ("full read vs torch.load", "load.full.ckptio", "load.full.torch_load", "<=", 0.5, "x torch.load"),
    ("full read vs resident sum", "load.full.ckptio", "limit.resident_sum", "<=", 3, "x summing resident tensors"),
    ("ready module vs construct+load", "ready.baseline", "ready.ckptio", ">=", 100, "times faster"),
    ("durable save vs raw write+fsync", "save.ckptio", "save.raw_write", "<=", 1.2, "x raw write"),
    ("async stall vs sync save", "stall.ckptio", "save.ckptio", "<=", 0.10, "x sync save"),
    ("sharded save vs full gather + save_file", "sharded.save.ckptio", "sharded.save.gather_save_file", "<=", 1.3,
     "x full gather + save_file"),
    ("sharded async stall vs copying local shards", "sharded.stall.ckptio", "sharded.stall.copy", "<=", 1.5,
     "x copying the local shards"),
    ("sharded save vs torch.distributed.checkpoint save (every rank writing)", "sharded.save.ckptio",
     "sharded.save.dcp", "<=", 1.0, "x DCP save"),
]  # fmt: skip
# Same-run ratios with no target, printed beside the targets so a reader can judge the baselines.
CONTEXT = [
    ("open vs bare json.loads of the header", "load.open.ckptio", "limit.header_json", "x"),
    ("open vs safetensors safe_open (header only)", "load.open.ckptio", "limit.header_safetensors", "x"),
    ("open with all tensor objects made vs header parse", "load.open.ckptio_tensors", "limit.header", "x"),
    ("naive mmap loader (no checks) vs header parse", "load.open.naive_mmap", "limit.header", "x"),
    ("naive mmap loader vs bare json.loads of the header", "load.open.naive_mmap", "limit.header_json", "x"),
    ("async stall vs torch.distributed.checkpoint.async_save stall", "stall.ckptio", "stall.dcp_async_save", "x"),
    ("async stall vs copying the tensors into reused buffers", "stall.ckptio", "limit.copy", "x"),
    ("copying the tensors into reused buffers vs sync save", "limit.copy", "save.ckptio", "x"),
    ("sharded load into the model vs torch.distributed.checkpoint load", "sharded.load.ckptio", "sharded.load.dcp", "x"),
    ("sharded async stall vs torch.distributed.checkpoint async_save stall", "sharded.stall.ckptio",
     "sharded.stall.dcp_async_save", "x"),
]  # fmt: skip


# The pickle (torch.load / torch.save) row each measurement is compared with: the same operation.
BASELINES = [
    ("load.open.", "load.open.torch_load"),
    ("load.full.", "load.full.torch_load"),
    ("load_cold.open.", "load_cold.open.torch_load"),
    ("load_cold.full.", "load_cold.full.torch_load"),
    ("ready.", "ready.baseline"),
    ("save.", "save.torch_save"),
    ("stall.", "save.torch_save"),  # a blocking pickle save stalls training for all of its time
    ("limit.header", "load.open.torch_load"),
    ("limit.copy", "save.torch_save"),
    ("limit.", "load.full.torch_load"),
    ("sharded.save.", "sharded.save.gather_save_file"),
    ("sharded.stall.", "sharded.stall.copy"),
    ("sharded.load.", "sharded.load.dcp"),
    ("remote.upload.", "remote.upload.fsspec"),
    ("remote.download.", "remote.download.fsspec"),
]


def baseline_of(key: str) -> str | None:
    return next((base for prefix, base in BASELINES if key.startswith(prefix)), None)


def _median(rows: dict, key: str) -> float | None:
    row = rows.get(key)
    return None if row is None else row.get("median_s")


def target_results(rows: dict) -> list[dict[str, Any]]:
    out = []
    for name, num, den, op, bound, unit in TARGETS:
        a, b = _median(rows, num), _median(rows, den)
        if a is None or b is None or b == 0:
            continue
        ratio = a / b
        out.append({"target": name, "ratio": ratio, "bound": f"{op} {bound}", "unit": unit,
                    "met": ratio >= bound if op == ">=" else ratio <= bound})  # fmt: skip
    t, c = rows.get("ranks.torch_load"), rows.get("ranks.ckptio")
    field = "own_anon_growth" if t and "own_anon_growth" in t else "mem_available_drop"  # older results: MemAvailable
    if t and c and t[field] > 0:
        ratio = c[field] / t[field]
        out.append({"target": "2 ranks: RAM used vs torch.load", "ratio": ratio, "bound": "<= 0.25",
                    "unit": "x torch.load's", "met": ratio <= 0.25})  # fmt: skip
    facts, save, load = rows.get("sharded.facts"), rows.get("sharded.save.ckptio"), rows.get("sharded.load.ckptio")
    if facts and save:
        ratio = save["peak_rss_delta"] / facts["model_and_optimizer_bytes"]
        out.append({"target": "sharded save: master's peak RAM growth", "ratio": ratio, "bound": "<= 0.3",
                    "unit": "x model + optimizer", "met": ratio <= 0.3})  # fmt: skip
        raw = _median(rows, "save.raw_write")
        if raw:  # the raw row writes the model's bytes once; the sharded save writes model + optimizer
            ratio = save["median_s"] / (raw * facts["model_and_optimizer_bytes"] / facts["model_bytes"])
            out.append({"target": "sharded save vs a raw write + fsync of the same bytes", "ratio": ratio,
                        "bound": "<= 2", "unit": "x raw write", "met": ratio <= 2})  # fmt: skip
    if facts and load:
        bound = 1 / facts["world_size"] + 0.15
        for what, field in (
            ("private", "max_rank_peak_anon_delta"),
            ("with mapped file pages", "max_rank_peak_rss_delta"),
        ):
            ratio = load[field] / facts["weights_file_bytes"]
            out.append({"target": f"sharded load into: RAM growth per rank ({what})", "ratio": ratio,
                        "bound": f"<= {bound:.3g}", "unit": "x the file", "met": ratio <= bound})  # fmt: skip
    return out


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Checkpoint benchmark",
        "",
        f"torch {env['torch']}, safetensors {env['safetensors']}, ckptio {env['ckptio']}, Python {env['python']}; "
        f"{env['cpu_count']} CPUs, {env['ram_bytes'] / 2**30:.0f} GiB RAM; page cache: {env['cache']}"
        + (f" ({env['cold_cache_note']})" if env.get("cold_cache_note") else "")
        + f"; median of {env['repeats']} fresh processes.",
        "",
    ]
    if env.get("storage"):
        st = env["storage"]
        lines += [f"Files written and read on {st['filesystem']}: {st['reads']} reads, {st['why']}.", ""]
    for nbytes, entry in results["sizes"].items():
        rows = entry["rows"]
        lines += [
            f"## {int(nbytes) / 2**20:.0f} MiB state dict, {entry['tensors']} tensors",
            "",
            "Ratio: this row's median over the pickle row of the same operation (named beside it).",
            "",
            "| measurement | median ms | spread ms | x pickle | pickle row | peak RSS growth MiB |",
            "|---|---:|---:|---:|---|---:|",
        ]
        noisy = noisy_rows(rows)
        for key, row in rows.items():
            if "median_s" not in row:
                continue
            base_key = baseline_of(key)
            base = _median(rows, base_key) if base_key else None
            ratio = f"{row['median_s'] / base:.4g}" if base else "-"
            lines.append(
                f"| {key}{' (noisy)' if key in noisy else ''} | {row['median_s'] * 1e3:.2f} | {row['min_s'] * 1e3:.2f}-{row['max_s'] * 1e3:.2f} | {ratio} | "
                f"{base_key if base else '-'} | {row['peak_rss_delta'] / 2**20:.1f} |"
            )
        for key in ("ranks.torch_load", "ranks.ckptio"):
            if key in rows:
                r = rows[key]
                held = r.get("own_anon_growth", r["mem_available_drop"])
                lines.append(
                    f"| {key}: RAM the ranks hold (their own anonymous memory) | - | - | - | - | {held / 2**20:.1f} "
                    f"(MemAvailable drop {r['mem_available_drop'] / 2**20:.1f}; per-rank peak RSS "
                    f"{', '.join(f'{x / 2**20:.0f}' for x in r['peak_rss'])}) |"
                )
        lines.append("")
        if noisy:
            lines += [
                f"Too noisy to trust: the repeats of {', '.join(sorted(noisy))} spread over more than "
                f"{NOISY_SPREAD:.0%} of their median (the machine was busy). Rerun them alone: "
                f"`python -m benchmarks --only {','.join(sorted(noisy))} --repeats 5`.",
                "",
            ]
        if abs(int(nbytes) - 2**30) > 2**30 // 10:
            lines += ["The targets are set at 1 GiB: at this size they are shown for reference only.", ""]
        lines += ["| target | ratio | bound | met |", "|---|---:|---|---|"]
        for t in target_results(rows):
            lines.append(
                f"| {t['target']} | {t['ratio']:.4g} {t['unit']} | {t['bound']} | {'yes' if t['met'] else 'NO'} |"
            )
        transfers = [
            (k, r) for k, r in rows.items() if k.startswith("remote.") and "bytes" in r.get("samples", [{}])[0]
        ]
        if transfers:
            lines += ["", f"Object storage ({env.get('remote_uri')}): one checkpoint file, through ckptio and "
                      "through fsspec's own put_file/get_file.", "",
                      "| transfer | median s | MB/s | x fsspec |", "|---|---:|---:|---:|"]  # fmt: skip
            for key, r in transfers:
                base = _median(rows, baseline_of(key) or "")
                mbps = r["samples"][0]["bytes"] / r["median_s"] / 1e6
                lines.append(
                    f"| {key} | {r['median_s']:.3f} | {mbps:.1f} | {r['median_s'] / base:.3g} |" if base else ""
                )
        context = [(name, _median(rows, a), _median(rows, b), unit) for name, a, b, unit in CONTEXT]
        lines += ["", "| comparison (no target) | ratio |", "|---|---:|"]
        lines += [f"| {name} | {a / b:.3g} {unit} |" for name, a, b, unit in context if a and b]
        lines.append("")
    return "\n".join(lines)


NOISY_SPREAD = 0.5  # (max - min) / median of a row's repeats above this: the machine, not the method, decided


def noisy_rows(rows: dict) -> set[str]:
    """Rows whose repeats disagree too much to trust their median (3 or more repeats)."""
    return {
        key
        for key, r in rows.items()
        if "median_s" in r
        and len(r.get("samples", [])) >= 3
        and r["median_s"] > 0
        and (r["max_s"] - r["min_s"]) / r["median_s"] > NOISY_SPREAD
    }


def advice(results: dict) -> list[str]:
    """What to pick on this storage and why, in plain words, from the largest size measured."""
    env = results["environment"]
    nbytes, entry = max(results["sizes"].items(), key=lambda kv: int(kv[0]))
    rows = entry["rows"]
    where = env.get("storage") or {}
    lines = [f"What to use here ({where.get('filesystem', 'this disk')}, {int(nbytes) / 2**20:.0f} MiB checkpoint):"]

    def ratio(a: str, b: str) -> float | None:
        x, y = _median(rows, a), _median(rows, b)
        return x / y if x and y else None

    full, opened = ratio("load.full.torch_load", "load.full.ckptio"), ratio("load.open.torch_load", "load.open.ckptio")
    if full and opened:
        reads = where.get("reads", "mmap")
        how = "memory-mapped" if reads == "mmap" else "read eagerly (mapping is slow on this filesystem)"
        verdict = "pick ckptio's safetensors loads" if full >= 1 else "loads are no faster than torch.load here"
        lines.append(
            f"- loading: {verdict}, {how}: ready {opened:.0f}x sooner and fully read {full:.1f}x faster than "
            "torch.load, with no pickle"
        )
    save = ratio("save.ckptio", "save.raw_write")
    if save:
        lines.append(
            f"- saving: a durable ckptio save costs {save:.2f}x a raw write + fsync of the same bytes"
            + ("; the disk, not ckptio, sets the time" if save <= 1.2 else "; above the 1.2x target here")
        )
    stall = ratio("stall.ckptio", "save.ckptio")
    if stall:
        lines.append(
            f"- async_save=True stalls training for {stall:.0%} of a synchronous save: use it when saves are frequent"
        )
    ranks = rows.get("ranks.ckptio"), rows.get("ranks.torch_load")
    if all(ranks) and "own_anon_growth" in ranks[1] and ranks[1]["own_anon_growth"] > 0:
        lines.append(
            f"- ranks on one node holding the same checkpoint: {ranks[0]['own_anon_growth'] / 2**20:.0f} MiB held by "
            f"ckptio's processes against {ranks[1]['own_anon_growth'] / 2**20:.0f} MiB by torch.load's (shared page cache)"
        )
    noisy = noisy_rows(rows)
    if noisy:
        lines.append(f"- not trusted, too noisy: {', '.join(sorted(noisy))} (see results.md)")
    return lines


def plots(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["sizes"], key=int)
    xs = [int(s) / 2**20 for s in sizes]
    written = []
    for prefix, field, ylabel, fname in (
        ("load.full.", "median_s", "seconds (load + read every byte)", "load_time.png"),
        ("load.open.", "median_s", "seconds (load returned)", "open_time.png"),
        ("save.", "median_s", "seconds (durable save)", "save_time.png"),
        # what loading costs in RAM: mapped pages shared by the ranks are not a copy each (peak RSS counts them)
        ("ranks.", "mem_available_drop", "RAM used by 2 processes holding it, MiB", "load_memory.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        keys = sorted({k for s in sizes for k in results["sizes"][s]["rows"] if k.startswith(prefix)})
        for key in keys:
            ys = [results["sizes"][s]["rows"][key][field] for s in sizes]
            ys = [y / 2**20 for y in ys] if field != "median_s" else ys
            ax.plot(xs, ys, marker="o", label=key.removeprefix(prefix))
        ax.set_xscale("log")
        if field == "median_s":
            ax.set_yscale("log")
        else:  # memory from zero: a line at ~0 MiB must show as zero, not vanish under an axis starting higher
            ax.set_ylim(bottom=0)
        ax.set_xlabel("checkpoint size, MiB")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_reports(results: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results) + "\n## What to use here\n\n" + "\n".join(advice(results)[1:]) + "\n")
    plots(results, out_dir)
