"""CheckpointManager: naming, discovery, retention, selection, URIs, atomicity and errors."""

import json
import logging
import os
import struct

import pytest
import torch

import ckptio
from ckptio.discovery import resolve
from ckptio.layout import MANIFEST_NAME
from ckptio.storage import Storage


@pytest.fixture
def arch():
    from archs import MLPArch

    return MLPArch()


def test_names_sort_naturally_and_carry_run_and_epoch(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "my run:1"))
    for epoch in (9, 10, 100, 2):
        mgr.save_agent(policy, epoch)
    names = [i.name for i in mgr.list_checkpoints()]
    assert names == sorted(names)
    assert [i.epoch for i in mgr.list_checkpoints()] == [2, 9, 10, 100]
    assert all(":" not in n and n.startswith("my_run_1.e") for n in names)


def test_latest_across_formats_by_epoch_not_mtime(tmp_path, policy):
    pt = ckptio.CheckpointManager(str(tmp_path / "run"), checkpoint_format="pt")
    st = ckptio.CheckpointManager(str(tmp_path / "run"))
    st.save_agent(policy, 5)
    pt.save_agent(policy, 3)  # newer file, older epoch
    pt.save_agent(policy, 7)
    info = ckptio.latest(str(tmp_path / "run"))
    assert (info.epoch, info.format) == (7, "pt")
    assert ckptio.load_from_uri(str(tmp_path / "run")).epoch == 7
    assert [i.epoch for i in ckptio.list_checkpoints(str(tmp_path / "run" / "checkpoints"))] == [3, 5, 7]
    # both formats of one epoch (written outside a run's own saves): safetensors is the one listed and loaded
    ckptio.save_policy_artifact(str(tmp_path / "run" / "checkpoints" / "run.e00000007"), {"w": torch.ones(1)}, None)
    info = ckptio.latest(str(tmp_path / "run"))
    assert (info.epoch, info.format) == (7, "safetensors")
    assert [(i.epoch, i.format) for i in ckptio.list_checkpoints(str(tmp_path / "run"))][-1] == (7, "safetensors")
    assert list(ckptio.load_from_uri(str(tmp_path / "run")).state_dict) == ["w"]


def test_file_uri_and_base_path_and_memory(tmp_path, policy, arch, env_meta):
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"))
    uri = mgr.save_agent(policy, 1, policy_architecture=arch)
    for form in (uri, "file://" + uri, uri.removesuffix(".safetensors")):
        assert ckptio.load_from_uri(form).epoch == 1
    mem = ckptio.CheckpointManager("memory://bucket/run", keep_last=1)
    mem.save_agent(policy, 1, {"r": 1}, policy_architecture=arch)
    mem.save_agent(policy, 2, {"r": 2}, policy_architecture=arch)
    art = ckptio.load_from_uri("memory://bucket/run")
    assert art.epoch == 2 and art.training_metrics == {"r": 2}
    assert torch.equal(art.instantiate(env_meta).head.weight, policy.head.weight)
    assert [i.epoch for i in mem.list_checkpoints()] == [2]


def test_keep_last_and_keep_best(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"), keep_last=2, keep_best=("score", "max", 1))
    scores = [5.0, 9.0, 1.0, 2.0, 3.0]
    for epoch, s in enumerate(scores):
        mgr.save_agent(policy, epoch, {"score": s})
    assert [i.epoch for i in mgr.list_checkpoints()] == [1, 3, 4]
    left = sorted(os.listdir(tmp_path / "r" / "checkpoints"))
    assert not any(".e00000000." in n or ".e00000002." in n for n in left)  # sidecars went too


def test_newest_is_never_pruned_and_protect_holds(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"), keep_best=("loss", "min", 1))
    mgr.save_agent(policy, 0, {"loss": 0.1})
    mgr.save_agent(policy, 1, {"loss": 0.5})
    assert [i.epoch for i in mgr.list_checkpoints()] == [0, 1]
    keep1 = ckptio.CheckpointManager(str(tmp_path / "r"), keep_last=1)
    keep1.save_agent(policy, 2, protect=["r.e00000000.safetensors"])
    assert [i.epoch for i in keep1.list_checkpoints()] == [0, 2]


def test_select_checkpoints_reads_only_metrics(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    for epoch, s in enumerate([3.0, float("nan"), 7.0, 5.0]):
        mgr.save_agent(policy, epoch, {"score": s})
    mgr.save_agent(policy, 4)  # no metrics at all
    best = ckptio.select_checkpoints(str(tmp_path / "r"), metric="score", mode="max", count=2)
    assert [i.epoch for i in best] == [2, 3]
    assert [i.epoch for i in ckptio.select_checkpoints(str(tmp_path / "r"), metric="score", mode="min")] == [0]
    assert [i.epoch for i in ckptio.select_checkpoints(str(tmp_path / "r"), count=2)] == [4, 3]


def test_architecture_precedence(tmp_path, policy, env_meta):
    from archs import MLPArch

    storage = Storage(str(tmp_path))
    ckptio.save_policy_artifact(str(tmp_path / "a"), policy, None)
    assert ckptio.load_policy_artifact(str(tmp_path / "a")).policy_architecture is None
    storage.write_bytes("a.policyarchitecture", json.dumps(architecture(MLPArch(hidden=1))).encode())
    assert ckptio.load_policy_artifact(str(tmp_path / "a")).policy_architecture == MLPArch(hidden=1)
    storage.write_bytes(MANIFEST_NAME, json.dumps(architecture(MLPArch(hidden=2))).encode())
    assert ckptio.load_policy_artifact(str(tmp_path / "a")).policy_architecture == MLPArch(hidden=2)
    ckptio.save_policy_artifact(str(tmp_path / "a"), policy, MLPArch(hidden=16))
    assert ckptio.load_policy_artifact(str(tmp_path / "a")).policy_architecture == MLPArch(hidden=16)
    explicit = ckptio.load_policy_artifact(str(tmp_path / "a"), MLPArch(hidden=3))
    assert explicit.policy_architecture == MLPArch(hidden=3)


def architecture(a):
    return ckptio.architecture_to_json(a)


def test_stale_temporaries_ignored_then_cleaned(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    mgr.save_agent(policy, 1)
    ckdir = tmp_path / "r" / "checkpoints"
    dead = ckdir / ".r.e00000002.safetensors.ckptio-tmp.999999999.abc"
    dead.write_bytes(b"half a checkpoint")
    live = ckdir / f".r.e00000002.safetensors.ckptio-tmp.{os.getpid()}.abc"
    live.write_bytes(b"being written")
    assert ckptio.latest(str(tmp_path / "r")).epoch == 1
    ckptio.CheckpointManager(str(tmp_path / "r")).save_agent(policy, 2)
    assert not dead.exists() and live.exists()


def test_write_once_is_exclusive(tmp_path):
    s = Storage(str(tmp_path))
    s.write_bytes("m.json", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        s.write_bytes("m.json", b"second", exclusive=True)
    assert (tmp_path / "m.json").read_bytes() == b"first"
    assert [n for n in os.listdir(tmp_path) if n != "m.json"] == []


def test_writes_cannot_escape_the_directory(tmp_path):
    s = Storage(str(tmp_path / "run"))
    for bad in ("../x", "a/../../x", "/etc/x", ""):
        with pytest.raises(ckptio.CheckpointSecurityError):
            s.write_bytes(bad, b"x")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "run" / "link")
    with pytest.raises(ckptio.CheckpointSecurityError, match="outside"):
        s.write_bytes("link/x", b"x")
    assert not (tmp_path / "outside" / "x").exists()


# ---- errors -------------------------------------------------------------------------------


def test_missing_and_empty_are_not_found(tmp_path):
    for uri in (str(tmp_path / "nope.safetensors"), str(tmp_path / "nodir"), str(tmp_path)):
        with pytest.raises(ckptio.CheckpointNotFoundError):
            ckptio.load_from_uri(uri)
    with pytest.raises(FileNotFoundError):  # existing handlers keep working
        ckptio.latest(str(tmp_path))


def test_truncated_and_lying_files_raise_corrupt(tmp_path, policy):
    uri = ckptio.save_policy_artifact(str(tmp_path / "ok"), policy, None)
    data = open(uri, "rb").read()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"trunc\.safetensors.*truncated"):
        ckptio.load_from_uri(str(tmp_path / "trunc.safetensors"))
    (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(ckptio.CorruptCheckpointError, match="header length"):
        ckptio.load_from_uri(str(tmp_path / "big.safetensors"))


def test_unknown_dtype_and_bad_uri(tmp_path):
    h = json.dumps({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    h += b" " * (-len(h) % 8)
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"\0")
    with pytest.raises(ckptio.CorruptCheckpointError, match="unknown dtype 'Q7'"):
        ckptio.load_from_uri(str(tmp_path / "d.safetensors"))
    with pytest.raises(ckptio.CheckpointError):
        ckptio.load_from_uri("nosuchproto://bucket/x.safetensors")
    (tmp_path / "x.bin").write_bytes(b"123")
    with pytest.raises(ckptio.CheckpointNotFoundError):
        resolve(str(tmp_path / "x"))


def test_keep_best_skips_checkpoints_without_the_metric_or_with_damaged_metrics(tmp_path, policy, caplog):
    """Retention by a metric never fails a save: saves without it are kept by the other rules, damaged ones warned about."""
    run = tmp_path / "r"
    mgr = ckptio.CheckpointManager(str(run), keep_best=("score", "max", 1))
    with pytest.warns(ckptio.CheckpointWarning, match="'score', which no checkpoint"):
        mgr.save_agent(policy, 0)  # no metrics yet: nothing to rank, nothing to fail on
        mgr.save_agent(policy, 1, {"loss": 1.0})
    assert [i.epoch for i in mgr.list_checkpoints()] == [0, 1]  # nothing ranks yet: nothing is deleted
    mgr.save_agent(policy, 2, {"score": 9.0})
    mgr.save_agent(policy, 3, {"score": 1.0})
    metrics = next(n for n in os.listdir(run / "checkpoints") if ".e00000003." in n and n.endswith(".json"))
    (run / "checkpoints" / metrics).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ckptio"):
        mgr.save_agent(policy, 4, {"score": 2.0})
    assert "e00000003" in caplog.text and "ignoring" in caplog.text
    assert [i.epoch for i in mgr.list_checkpoints()] == [2, 4]


def test_best_ignores_non_numeric_metrics_and_breaks_ties_by_newest(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    for epoch, s in enumerate([True, 0.5, 0.7, 0.7, "0.9"]):
        mgr.save_agent(policy, epoch, {"score": s})
    best = ckptio.select_checkpoints(str(tmp_path / "r"), metric="score", mode="max", count=3)
    assert [i.epoch for i in best] == [3, 2, 1]
    assert [i.epoch for i in mgr.select_checkpoints(metric="score", mode="min", count=2)] == [1, 3]


def test_latest_pruned_between_listing_and_opening_is_listed_again(tmp_path, policy, monkeypatch):
    """Another process's retention can delete the newest checkpoint after a reader listed it: list again."""
    run = str(tmp_path / "r")
    mgr = ckptio.CheckpointManager(run)
    real = Storage.listdir
    for load in (lambda: ckptio.load_from_uri(run), lambda: mgr.load_from_uri()):
        for epoch in (1, 2):
            mgr.save_agent(policy, epoch, {"epoch": epoch})
        pruned = []

        def listdir_then_prune(self, pruned=pruned):
            listing = real(self)
            newest = [n for n in listing if n.startswith("r.e") and n.endswith(".safetensors")][-1:]
            if newest and not pruned and self.root.endswith("checkpoints"):
                pruned.append(newest[0])
                ckptio.CheckpointManager(run).delete(ckptio.layout.checkpoint_at(mgr.storage, newest[0]))
            return listing

        monkeypatch.setattr(Storage, "listdir", listdir_then_prune)
        art = load()
        monkeypatch.undo()
        assert pruned == ["r.e00000002.safetensors"]
        assert art.epoch == 1 and art.training_metrics == {"epoch": 1}


def test_the_manager_takes_a_trainer_state_as_a_plain_nested_dict(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"))
    state = {"step": 7, "scheduler": {"last_epoch": 3, "lrs": [0.1, 0.05]}, "buffer": torch.arange(4)}
    mgr.save_checkpoint(policy, 1, trainer_state=state)
    back = mgr.load_trainer_state()
    assert back["step"] == 7 and back["scheduler"] == {"last_epoch": 3, "lrs": [0.1, 0.05]}
    assert torch.equal(back["buffer"], torch.arange(4))
    with pytest.raises(ckptio.CheckpointFormatError, match="give a dict"):
        mgr.save_checkpoint(policy, 2, trainer_state=[1, 2])
