"""A sharded resume on several nodes: the store sends each byte once; each node caches the ranges its ranks read.

Nodes are simulated as torchrun runs them: one agent per node (``--nnodes=N --node_rank=i``, a
shared rendezvous on 127.0.0.1), each with its own run directory and node cache, all resuming
from the moto S3 server, whose log records every ranged GET.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from remote_fixtures import running_s3
from safetensors.torch import load_file

from ckptio.cache import HELD, PARTIAL
from ckptio.layout import HEADER_GUESS
from ckptio.storage import Storage, merge_ranges


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One S3 server for the module: every test resumes the one checkpoint saved to it."""
    with running_s3(str(tmp_path_factory.mktemp("s3") / "requests.log")) as server:
        yield server


def run_nodes(tmp_path, tag: str, nodes: int, args: list[str], caches: list[str], nproc: int = 1, check: bool = True):
    """N torchrun agents side by side, as N nodes, each with its own run and output directory."""
    from conftest import run_nodes as run_agents

    results = run_agents(
        "nodes_job", nodes, lambda i: [str(tmp_path / f"{tag}-run{i}"), str(tmp_path / f"{tag}-out{i}"), *args],
        caches, nproc=nproc,
    )  # fmt: skip
    if check:
        for i, (code, out, err) in enumerate(results):
            assert code == 0, f"node {i} failed ({code}):\n{out}\n{err[-4000:]}"
    return results


@pytest.fixture(scope="module")
def saved(s3, tmp_path_factory):
    """A 2-rank FSDP2 checkpoint (weights and Adam state) uploaded to S3, and torch's full view of it."""
    from conftest import run_torchrun

    tmp_path = tmp_path_factory.mktemp("saved")
    remote = f"s3://{s3.make_bucket()}/run"
    args = ["--remote-uri", remote, "--storage-options", json.dumps(s3.options())]
    run_torchrun("nodes_job", str(tmp_path / "save-run"), str(tmp_path / "save-out"), *args, timeout=240,
                 CKPTIO_CACHE_DIR=str(tmp_path / "save-cache"))  # fmt: skip
    storage = Storage(remote + "/checkpoints", s3.options())
    files = {n: storage.info(n).size for n in storage.listdir() if n.endswith(".safetensors")}
    assert len(files) == 2  # the weights and the trainer state
    return {"remote": remote, "args": args, "storage": storage, "files": files, "ref": tmp_path / "save-out"}


def _ranged_gets(s3, since: int) -> dict[str, int]:
    """Bytes asked of the store per file since request ``since`` (a GET without a range counts its whole file)."""
    asked: dict[str, int] = {}
    for line in s3.requests()[since:]:
        m = re.match(r"GET /[^/]+/run/checkpoints/(\S+?)\?\S*(?: range=bytes=(\d+)-(\d+))?$", line)
        if m and m.group(2) is not None:
            asked[m.group(1)] = asked.get(m.group(1), 0) + int(m.group(3)) + 1 - int(m.group(2))
        elif m:
            asked[m.group(1)] = asked.get(m.group(1), -(10**18))  # a whole download: fails any bound below
    return asked


def _held(cache_dir: str) -> dict[str, list[tuple[int, int]]]:
    out = {}
    for name in os.listdir(cache_dir):
        assert name.endswith((PARTIAL, PARTIAL + HELD)) or name.startswith("."), f"a whole file was cached: {name}"
        if name.endswith(HELD):
            out[name.split("-", 1)[1].removesuffix(PARTIAL + HELD)] = [
                tuple(r) for r in json.load(open(os.path.join(cache_dir, name)))["held"]
            ]
    return out


def _same(ref, got) -> None:
    a, b = load_file(ref), load_file(got)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].isfinite().all(), k  # equality of NaNs would prove nothing
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].equal(b[k]), k


def _check_resumed(saved, out) -> None:
    _same(saved["ref"] / "ref.safetensors", out / "resumed.safetensors")
    _same(saved["ref"] / "ref_optim.safetensors", out / "resumed_optim.safetensors")


def test_the_store_sends_each_byte_once_and_each_node_caches_only_its_ranks_ranges(s3, tmp_path, saved):
    nodes = 2  # of 2 ranks each: a world size other than the save's (3 nodes of one rank: the next test)
    before = len(s3.requests())
    caches = [str(tmp_path / f"cache{i}") for i in range(nodes)]
    run_nodes(tmp_path, "r", nodes, saved["args"], caches, nproc=2)
    _check_resumed(saved, tmp_path / "r-out0")
    asked = _ranged_gets(s3, before)
    for name, size in saved["files"].items():
        # each byte of the checkpoint once, plus the master's first read of the header, which it sends the others
        assert 0 < asked[name] <= size + HEADER_GUESS, (name, asked[name], size)
        # a stat is a request: the master's, shared with every rank, is the only one of the job
        heads = [r for r in s3.requests()[before:] if r.startswith("HEAD /") and r.split("?")[0].endswith("/" + name)]
        assert len(heads) <= 1, (name, heads)
    held = [_held(c) for c in caches]
    for name, size in saved["files"].items():
        per_node = [sum(e - b for b, e in h[name]) for h in held]
        assert all(n <= size / nodes + 0.12 * size for n in per_node), (name, per_node, size)
        union = sorted(r for h in held for r in h[name])
        end = 0
        for b, e in union:  # together the nodes hold every byte
            assert b <= end
            end = max(end, e)
        assert end == size


def test_a_node_cache_holding_other_ranges_fetches_only_what_it_lacks(s3, tmp_path, saved):
    caches = [str(tmp_path / f"cache{i}") for i in range(3)]
    run_nodes(tmp_path, "two", 2, saved["args"], caches[:2])  # caches 0 and 1 hold the halves
    before_held = [_held(c) for c in caches[:2]]
    before = len(s3.requests())
    run_nodes(tmp_path, "three", 3, saved["args"], caches)  # now thirds: node 1 needs parts of both halves
    _check_resumed(saved, tmp_path / "three-out0")
    asked = _ranged_gets(s3, before)
    after_held = [_held(c) for c in caches]
    for name, size in saved["files"].items():
        grown = sum(
            sum(e - b for b, e in after_held[i][name]) - sum(e - b for b, e in before_held[i].get(name, []))
            for i in range(2)
        ) + sum(e - b for b, e in after_held[2][name])
        held_before = merge_ranges(r for h in before_held for r in h.get(name, []))
        never_held = size - sum(e - b for b, e in held_before)
        # what some node's cache held comes from that node: the store sends only what none held (plus the
        # third node's header read)
        assert asked.get(name, 0) <= never_held + HEADER_GUESS, (name, asked.get(name), never_held)
        assert asked.get(name, 0) <= grown + HEADER_GUESS
        assert sum(e - b for b, e in after_held[2][name]) <= size / 3 + 0.12 * size  # the cold node: its third


def test_a_store_failing_mid_fetch_fails_every_rank_and_caches_only_whole_checked_ranges(s3, tmp_path, saved):
    caches = [str(tmp_path / f"cache{i}") for i in range(2)]
    results = run_nodes(tmp_path, "f", 2, [*saved["args"], "--fail-after", "1"], caches, check=False)
    for code, out, err in results:  # node 1's store fails; node 0's ranks stop too, with a typed error
        assert code != 0 and re.search(r"^FAILED (StorageError|CheckpointError)", out, re.M), (code, out, err[-3000:])
    assert "connection reset by peer" in results[1][1]
    for cache in caches:
        for name, ranges in _held(cache).items():
            data = saved["storage"].read_bytes(name)
            local = open(
                os.path.join(cache, next(n for n in os.listdir(cache) if n.endswith(name + PARTIAL))), "rb"
            ).read()
            for b, e in ranges:  # every byte the record claims is the store's
                assert local[b:e] == data[b:e], (name, b, e)
    assert not os.path.exists(tmp_path / "f-out0" / "resumed.safetensors")


def test_one_node_downloads_each_file_whole_once(s3, tmp_path, saved):
    """On one node every byte is needed anyway: one whole download per file, as before ranged resumes."""
    from conftest import run_torchrun

    cache = tmp_path / "cache"
    before = len(s3.requests())
    run_torchrun("nodes_job", str(tmp_path / "run"), str(tmp_path / "out"), *saved["args"], timeout=240,
                 CKPTIO_CACHE_DIR=str(cache))  # fmt: skip
    _check_resumed(saved, tmp_path / "out")
    for name in saved["files"]:
        gets = [r for r in s3.requests()[before:] if r.startswith("GET /") and r.split("?")[0].endswith("/" + name)]
        assert len(gets) == 1 and "range=" not in gets[0], gets
    assert sorted(n.split("-", 1)[1] for n in os.listdir(cache) if not n.startswith(".")) == sorted(saved["files"])
