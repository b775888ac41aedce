"""The benchmark harness in --quick mode: structure and sanity, never timings."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, subprocess_env

from benchmarks.__main__ import LOAD_METHODS, SAVE_METHODS

pytestmark = pytest.mark.slow


def _quick(tmp_path, only: str) -> tuple[dict, str]:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--only", only],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    assert {"torch", "safetensors", "cpu_count", "ram_bytes", "cache", "repeats"} <= set(env)
    (entry,) = results["sizes"].values()
    return entry["rows"], (out / "results.md").read_text()


def _expected() -> set[str]:
    expected = {f"load.{op}.{m}" for op in ("open", "full") for m in LOAD_METHODS}
    expected |= {f"save.{m}" for m in SAVE_METHODS} | {"ready.baseline", "ready.ckptio", "stall.ckptio"}
    expected |= {"stall.dcp_async_save", "limit.readinto", "limit.header", "limit.resident_sum"}
    expected |= {"load.open.ckptio_tensors", "load.open.naive_mmap", "limit.header_json", "limit.header_safetensors"}
    expected.add("limit.copy")
    expected |= {f"sharded.save.{m}" for m in ("ckptio", "gather_save_file", "dcp")}
    expected |= {f"sharded.stall.{m}" for m in ("ckptio", "copy", "dcp_async_save")}
    expected |= {f"sharded.first_{row[8:]}" for row in expected if row.startswith(("sharded.save.", "sharded.stall."))}
    return expected | {"sharded.load.ckptio", "sharded.load.dcp"}


GROUPS = ["load.open.,sharded.", "load.full.,limit.", "save.,ready.,stall.,ranks."]


def test_the_quick_groups_cover_every_row():
    assert all(key.startswith(tuple(",".join(GROUPS).split(","))) for key in _expected())


# the quick run in three parts, so that each stays well under its time limit on a loaded 2-core machine
@pytest.mark.parametrize("only", GROUPS)
def test_quick_benchmark_measures_every_row(tmp_path, only):
    rows, md = _quick(tmp_path, only)
    prefixes = tuple(only.split(","))
    expected = {key for key in _expected() if key.startswith(prefixes)}
    assert expected <= set(rows), sorted(expected - set(rows))
    for key in expected:
        assert rows[key]["median_s"] > 0 and rows[key]["min_s"] <= rows[key]["median_s"] <= rows[key]["max_s"]
    assert all(key.startswith(prefixes) for key in rows), sorted(rows)
    assert "| target |" in md and "| comparison (no target) |" in md
    if only.startswith("load.full."):
        assert "| load.full.ckptio |" in md
    if only.startswith("save."):
        for m in SAVE_METHODS:
            if m != "raw_write":
                assert all(s["roundtrip"] for s in rows[f"save.{m}"]["samples"]), m
        assert rows["ready.ckptio"]["samples"][0]["params"] == rows["ready.baseline"]["samples"][0]["params"] > 0
        for m in ("torch_load", "ckptio"):
            assert len(rows[f"ranks.{m}"]["peak_rss"]) == 2
        # the memory the ranks hold is measured on their own processes, not machine-wide
        assert rows["ranks.torch_load"]["own_anon_growth"] > rows["ranks.ckptio"]["own_anon_growth"]
        assert "| ranks.ckptio: RAM the ranks hold (their own anonymous memory) |" in md
    if "sharded." in only:
        assert rows["sharded.facts"]["world_size"] == 2 and rows["sharded.facts"]["weights_file_bytes"] > 0
        assert "| sharded save vs full gather + save_file |" in md and "| sharded load into: RAM growth per rank" in md
    for png in ("load_time.png", "open_time.png", "save_time.png", "load_memory.png"):
        assert (tmp_path / "bench" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_divides_each_row_by_the_pickle_row_of_the_same_operation():
    from benchmarks.report import markdown

    def row(ms):
        return {"median_s": ms / 1e3, "min_s": ms / 1e3, "max_s": ms / 1e3, "peak_rss_delta": 0}

    rows = {"load.open.torch_load": row(100), "load.open.ckptio": row(1), "load.full.torch_load": row(400),
            "load.full.ckptio": row(40), "save.torch_save": row(2000), "save.ckptio": row(1000),
            "stall.ckptio": row(50), "ready.baseline": row(3000), "ready.ckptio": row(30),
            "ranks.ckptio": {"mem_available_drop": 0, "peak_rss": [2**30, 2**30], "samples": []}}  # fmt: skip
    env = {"torch": "t", "safetensors": "s", "ckptio": "c", "python": "p", "cpu_count": 2, "ram_bytes": 2**34,
           "cache": "warm", "cold_cache_note": None, "repeats": 3}  # fmt: skip
    md = markdown({"environment": env, "sizes": {str(2**30): {"tensors": 9, "rows": rows}}})
    table = {line.split("|")[1].strip(): line.split("|")[4:6] for line in md.splitlines() if line.startswith("| ")}
    assert [c.strip() for c in table["load.open.ckptio"]] == ["0.01", "load.open.torch_load"]
    assert [c.strip() for c in table["load.full.ckptio"]] == ["0.1", "load.full.torch_load"]
    assert [c.strip() for c in table["save.ckptio"]] == ["0.5", "save.torch_save"]
    assert [c.strip() for c in table["stall.ckptio"]] == ["0.025", "save.torch_save"]
    assert [c.strip() for c in table["ready.ckptio"]] == ["0.01", "ready.baseline"]
    assert "shown for reference only" not in md
    measurements = md[md.index("| measurement |") :].split("\n\n")[0].splitlines()
    assert any(line.startswith("| ranks.ckptio") for line in measurements)
    assert {line.count("|") for line in measurements} == {measurements[0].count("|")}


def test_report_flags_noisy_rows_and_says_what_to_use():
    from benchmarks.report import advice, markdown

    def row(ms, spread=0.0):
        samples = [{"seconds": ms / 1e3}] * 3
        return {"median_s": ms / 1e3, "min_s": ms / 1e3, "max_s": ms * (1 + spread) / 1e3, "peak_rss_delta": 0,
                "samples": samples}  # fmt: skip

    rows = {"load.open.torch_load": row(100), "load.open.ckptio": row(1), "load.full.torch_load": row(400),
            "load.full.ckptio": row(40, spread=2.0), "save.raw_write": row(1000), "save.ckptio": row(1100),
            "stall.ckptio": row(55),
            "ranks.torch_load": {"own_anon_growth": 2 * 2**30, "mem_available_drop": 0, "peak_rss": [1, 1]},
            "ranks.ckptio": {"own_anon_growth": 2**20, "mem_available_drop": 5 * 2**30, "peak_rss": [1, 1]}}  # fmt: skip
    env = {"torch": "t", "safetensors": "s", "ckptio": "c", "python": "p", "cpu_count": 2, "ram_bytes": 2**34,
           "cache": "warm", "cold_cache_note": None, "repeats": 3,
           "storage": {"filesystem": "ext4", "reads": "mmap", "why": "local disk"}}  # fmt: skip
    results = {"environment": env, "sizes": {str(2**30): {"tensors": 9, "rows": rows}}}
    md = markdown(results)
    assert "| load.full.ckptio (noisy) |" in md and "| load.open.ckptio |" in md
    assert "Too noisy to trust: the repeats of load.full.ckptio" in md
    # the ranks target uses the processes' own memory: another process's 5 GiB on the machine does not count
    assert "| 2 ranks: RAM used vs torch.load | 0.0004883 x torch.load's | <= 0.25 | yes |" in md
    text = "\n".join(advice(results))
    assert "pick ckptio's safetensors loads, memory-mapped: ready 100x sooner and fully read 10.0x faster" in text
    assert "1.10x a raw write" in text and "stalls training for 5% of a synchronous save" in text
    assert "not trusted, too noisy: load.full.ckptio" in text


def test_storage_benchmark_on_a_directory_and_a_bucket(tmp_path, s3):
    """--dir puts every file there and says how ckptio reads it; --remote-uri measures transfers both ways."""
    bucket = s3.make_bucket()
    out, where = tmp_path / "bench", tmp_path / "user-disk"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--dir", str(where),
           "--remote-uri", f"s3://{bucket}/bench", "--storage-options", json.dumps(s3.options()),
           "--only", "remote.,load.open.ckptio,save.ckptio"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"files in {where}" in proc.stdout and "mmap reads" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["storage"]["reads"] == "mmap"
    (entry,) = results["sizes"].values()
    rows = entry["rows"]
    for key in ("remote.upload.ckptio", "remote.upload.fsspec", "remote.download.ckptio", "remote.download.fsspec"):
        assert rows[key]["median_s"] > 0 and rows[key]["samples"][0]["bytes"] == entry["file_bytes"], key
    assert {"load.open.ckptio", "save.ckptio"} <= set(rows) and not any(k.startswith("ranks.") for k in rows)
    assert os.listdir(where)  # the files lived under --dir, not under --out
    assert not (out / "data").exists()
    report = (out / "results.md").read_text()
    assert "| remote.download.ckptio |" in report and "mmap reads" in report
    import s3fs

    left = s3fs.S3FileSystem(**s3.options()).find(f"{bucket}/bench")
    assert left == [], left  # uploads and the download source are removed


def test_the_lease_benchmark_measures_its_rows(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.lease", "--repeats", "2", "--ttl", "6", "--out",
                          str(tmp_path)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.load(open(tmp_path / "lease.json"))
    keys = ("local_take_release_ms", "s3_take_release_ms", "s3_refused_beside_a_live_holder_s")
    assert all(rows[k] > 0 for k in keys), rows


def test_the_hf_export_benchmark_measures_both_methods(tmp_path):
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-m", "benchmarks.hf_export", "--gib", "0.05", "--repeats", "1", "--out",
                          str(tmp_path)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.load(open(tmp_path / "hf_export.json"))
    rows = doc["rows"]
    assert set(rows) == {"export", "save_pretrained"}
    assert all(r["total_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows.values())
    # the same weights written both ways (transformers leaves the same tie out), headers (digests) aside
    size = rows["save_pretrained"]["bytes"]
    assert abs(rows["export"]["bytes"] - size) < size / 100 and abs(doc["checkpoint_bytes"] - size) < size / 100


def test_the_peer_benchmark_measures_ckptio_beside_torch_checkpointing(tmp_path):
    pytest.importorskip("torch_checkpointing")
    cmd = [sys.executable, "-m", "benchmarks.peer", "--mib", "2", "--repeats", "1", "--saves", "6", "--growth-mib", "2",
           "--methods", "ckptio,torch_checkpointing", "--out", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.load(open(tmp_path / "peer.json"))["rows"]
    for layout in ("1 process", "2 ranks"):
        for method in ("ckptio", "torch_checkpointing"):
            row = rows[f"{layout}.{method}"]
            assert "error" not in row, row
            assert row["stall_s"] > 0 and row["durable_s"] >= row["stall_s"] and row["bytes"] > 3 * 2**20 * 2
            assert row["load_matches_save"], row  # what each loaded is what it saved
    assert rows["2 ranks.ckptio"]["resume_at_1_rank"] is True
    assert rows["2 ranks.torch_checkpointing"]["resume_at_1_rank"] is False  # its resharding needs CUDA
    assert all(rows[f"growth.{m}"]["rss_after_6_mib"] > 0 for m in ("ckptio", "torch_checkpointing"))
    assert "| 2 ranks.ckptio |" in open(tmp_path / "peer.md").read()
