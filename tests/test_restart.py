"""Multi-node jobs restarted the way schedulers restart them, and replicated (DDP) resumes on several nodes.

Nodes are simulated as torchrun runs them: one agent per node (``--nnodes=N --node_rank=i``), each
with its own run directory and node cache. Only the master writes, so after a run node 0's directory
holds the checkpoints and the others' hold none; the same agents are then started again on the same
directories. The store (moto) sits behind a proxy that counts the bytes it sends.
"""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch
from conftest import run_nodes
from remote_fixtures import running_s3
from safetensors import safe_open
from safetensors.torch import load_file

import ckptio
from ckptio.cache import HELD, PARTIAL
from ckptio.storage import Storage

pytestmark = pytest.mark.slow

CHECKPOINT = re.compile(r"\.e\d{8}\.")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """moto behind a counting proxy: ``(server, options through the proxy, proxy)``."""
    from benchmarks.nodes import CappedProxy

    with running_s3(str(tmp_path_factory.mktemp("s3") / "requests.log")) as server:
        proxy = CappedProxy(server.port, 1e12)  # counts; caps nothing
        options = server.options()
        options["client_kwargs"] = {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        yield server, options, proxy


def agents(tmp_path, tag: str, nodes: int, *args: str, runs: str | None = None, outs: str | None = None):
    """The restart job on ``nodes`` agents; node ``i`` keeps run directory ``{runs}{i}`` and cache ``{runs}-cache{i}``."""
    runs, outs = runs or tag, outs or tag
    caches = [str(tmp_path / f"{runs}-cache{i}") for i in range(nodes)]
    return run_nodes(
        "restart_job", nodes,
        lambda i: [str(tmp_path / f"{runs}{i}" / "rlrun"), str(tmp_path / f"{outs}-out{i}"), *args], caches,
    )  # fmt: skip


def succeeded(results) -> None:
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"node {i} failed ({code}):\n{out}\n{err[-4000:]}"


def checkpoints(run_dir) -> list[str]:
    d = os.path.join(run_dir, "checkpoints")
    return sorted(n for n in os.listdir(d) if CHECKPOINT.search(n)) if os.path.isdir(d) else []


def same_state(saved: str, resumed: str, rng: bool = True) -> None:
    a, b = load_file(saved), load_file(resumed)
    if not rng:  # RNG states are restored only at the world size they were saved at
        assert not torch.equal(a.pop("rng"), b.pop("rng"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), (saved, k)


def resumed_everywhere(tmp_path, tag: str, nodes: int, epoch: int, saved_by: str | None = None, rng: bool = True):
    """Every rank resumed ``epoch`` with the weights, optimizer state and RNG state it (its rank) saved there
    (without ``rng``, at another world size: rank 0's and 1's weights and optimizer state)."""
    for i in range(nodes if rng else 2):  # one rank per node: rank i runs on node i
        resumed = tmp_path / f"{tag}-out{i}" / f"resumed-rank{i}.safetensors"
        with safe_open(resumed, "pt") as f:
            assert f.metadata()["epoch"] == str(epoch)
        same_state(
            str(tmp_path / f"{saved_by or tag}-out{i}" / f"saved-e{epoch}-rank{i}.safetensors"), str(resumed), rng
        )


def checkpoint_bytes(storage: Storage) -> int:
    return sum(storage.info(n).size for n in storage.listdir() if n.endswith(".safetensors"))


@pytest.mark.parametrize(
    ("nodes", "ending", "saving", "remote"),
    [
        (2, "clean", "sync", False),
        (3, "kill", "async", False),
        (2, "kill", "sync", True),
        (3, "clean", "async", True),
    ],
)
def test_a_job_restarted_in_place_resumes_on_every_node(store, tmp_path, nodes, ending, saving, remote):
    server, options, proxy = store
    args = ["--async-save"] if saving == "async" else []
    if remote:
        args += ["--remote-uri", f"s3://{server.make_bucket()}/rlrun", "--storage-options", json.dumps(options)]
    last = 1
    first = agents(
        tmp_path, "a", nodes, "--epochs", "2", *args, *(["--kill-after-epoch", "1"] if ending == "kill" else [])
    )
    if ending == "kill":
        assert all(code != 0 for code, _, _ in first)  # every rank died by SIGKILL after epoch 1's save
    else:
        succeeded(first)
        last = 2
    # only the master wrote: node 0's directory holds the newest checkpoint, the others' none
    assert checkpoints(tmp_path / "a0" / "rlrun")[-1].split(".")[1] == f"e{last:08d}"
    assert all(checkpoints(tmp_path / f"a{i}" / "rlrun") == [] for i in range(1, nodes))
    before = proxy.sent
    succeeded(agents(tmp_path, "a", nodes, "--epochs", str(last + 1), *args, outs="b"))
    resumed_everywhere(tmp_path, "b", nodes, last, saved_by="a")
    node0 = str(tmp_path / "a0" / "rlrun" / "checkpoints" / f"rlrun.e{last:08d}.safetensors")
    for i in range(nodes):  # resumed_from names the checkpoint where it is: on node 0's disk, from its host
        with safe_open(tmp_path / f"b-out{i}" / f"resumed-rank{i}.safetensors", "pt") as f:
            assert f.metadata()["uri"] == (node0 if i == 0 else f"{socket.gethostname()}:{node0}")
    if remote:  # the master's disk served its peers: of the store, listings and the manifest, never the files
        local = Storage(str(tmp_path / "a0" / "rlrun" / "checkpoints"))
        assert proxy.sent - before < 0.05 * checkpoint_bytes(local), proxy.sent - before
    for i in range(1, nodes):  # each other node's cache holds the checkpoint whole, as later loads map it
        cache = tmp_path / f"a-cache{i}"
        assert not [n for n in os.listdir(cache) if n.endswith((PARTIAL, HELD))]
        assert any(n.endswith(f"rlrun.e{last:08d}.safetensors") for n in os.listdir(cache))
    if nodes == 2 and not remote:  # ranks that cannot talk: a typed error on every rank, naming the checkpoint
        results = agents(tmp_path, "a", nodes, "--epochs", "9", "--no-process-group", outs="c")
        for code, out, err in results:
            assert code != 0 and "FAILED CheckpointError" in out and "init_process_group" in out, (out, err[-2000:])
        assert f"rlrun.e{last + 1:08d}.safetensors (on this node's disk only)" in results[0][1]


@pytest.mark.parametrize("nodes", [2, 3])
def test_a_replicated_resume_reads_each_byte_of_the_store_once(store, tmp_path, nodes):
    server, options, proxy = store
    remote = f"s3://{server.make_bucket()}/rlrun"
    args = ["--remote-uri", remote, "--storage-options", json.dumps(options)]
    succeeded(agents(tmp_path, "s", 2, "--epochs", "0", "--hidden", "512", *args))
    size = checkpoint_bytes(Storage(remote + "/checkpoints", options))
    before = proxy.sent
    succeeded(agents(tmp_path, "r", nodes, "--epochs", "1", "--hidden", "512", *args))  # fresh run dirs and caches
    resumed_everywhere(tmp_path, "r", nodes, 0, saved_by="s", rng=nodes == 2)
    assert proxy.sent - before <= 1.15 * size, (proxy.sent - before, size)
    # every node's cache ends with whole files, the store's bytes
    remote_files = Storage(remote + "/checkpoints", options)
    for i in range(nodes):
        cache = tmp_path / f"r-cache{i}"
        whole = [n for n in os.listdir(cache) if not n.startswith(".") and not n.endswith((PARTIAL, HELD))]
        assert not [n for n in os.listdir(cache) if n.endswith((PARTIAL, HELD))]
        assert len(whole) == 2  # the weights and the trainer state
        for name in whole:
            stored = name.split("-", 1)[1]
            assert (cache / name).read_bytes() == remote_files.read_bytes(stored), name


def test_a_node_failing_mid_exchange_fails_every_rank_and_the_next_resume_completes(store, tmp_path):
    server, options, _ = store
    remote = f"s3://{server.make_bucket()}/rlrun"
    args = ["--remote-uri", remote, "--storage-options", json.dumps(options)]
    succeeded(agents(tmp_path, "s", 2, "--epochs", "0", "--hidden", "512", *args))
    failed = agents(tmp_path, "r", 2, "--epochs", "1", "--hidden", "512", "--fail-after", "1", *args)
    for code, out, err in failed:  # node 1's store reads fail; node 0's rank stops too, typed, without waiting
        assert code != 0 and re.search(r"^FAILED (StorageError|CheckpointError)", out, re.M), (code, out, err[-3000:])
    succeeded(agents(tmp_path, "r", 2, "--epochs", "1", "--hidden", "512", *args, outs="again"))
    resumed_everywhere(tmp_path, "again", 2, 0, saved_by="s")


def test_a_pt_checkpoint_only_on_the_masters_disk_is_a_typed_error_on_every_rank(tmp_path):
    """A .pt file has no chunk digests: its pieces cannot be checked on the way to another node."""
    from archs import MLPArch

    run = tmp_path / "p0" / "rlrun"
    manager = ckptio.CheckpointManager(str(run), "pt")
    torch.manual_seed(0)
    manager.save_checkpoint(MLPArch(hidden=256).make_policy({"obs_dim": 8, "num_actions": 4}), 0, {"loss": 1.0},
                            policy_architecture=MLPArch(hidden=256))  # fmt: skip
    results = agents(tmp_path, "p", 2, "--epochs", "1")
    for code, out, err in results:
        assert code != 0 and "FAILED CheckpointNotFoundError" in out and "master's node only" in out, (out, err[-2000:])


def test_a_misspelt_bucket_fails_every_rank_at_the_first_use_and_is_never_created(store, tmp_path):
    server, options, _ = store
    args = ["--remote-uri", "s3://nosuchbucket/rlrun", "--storage-options", json.dumps(options)]
    for code, out, err in agents(tmp_path, "m", 2, "--epochs", "0", *args):
        assert code != 0 and re.search(r"^FAILED StorageError: .*bucket 'nosuchbucket' does not exist", out, re.M), (
            out,
            err[-2000:],
        )
    assert not Storage(f"s3://{server.make_bucket()}", server.options()).fs.exists("nosuchbucket")
