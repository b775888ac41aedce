"""Every I/O call of an operation fails once, in turn (SQLite's anomaly testing).

For each operation, a clean run counts its I/O calls (``tests/faults.py``); then, for every
position k, a fresh run fails the k-th call. After each: the operation succeeded or raised a
CheckpointError; every listed checkpoint loads with ``verify=True`` and its weights, metrics and
trainer state come from one save; nothing temporary or half-cached is left; the next operation,
with faults off, succeeds.

By default every position with EIO, and every other kind at every third position (seconds);
``pytest tests/test_faults.py --stress`` runs every position with every kind.
"""

from __future__ import annotations

import os
import uuid

import pytest
import torch
from faults import LOCAL_KINDS, REMOTE_KINDS, Faults

import ckptio
from ckptio.cache import NodeCache
from ckptio.storage import TMP_MARK
from ckptio.trainer_state import flatten, unflatten

# -- what a save holds: one tag in weights, metrics and trainer state ---------------------------


def _weights(tag: int) -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((512,), float(tag)),
        "b": torch.full((16,), float(tag), dtype=torch.bfloat16),
        "tag": torch.tensor(tag),
    }


def _metrics(tag: int) -> dict:
    return {"tag": tag}


def _trainer(tag: int) -> dict:
    return {"tag": tag, "moment": torch.full((64,), float(tag))}


def _tag_of_trainer(tree) -> int:
    tree = tree.get("user", tree)  # the Checkpointer nests the user's tree
    assert torch.equal(tree["moment"], torch.full((64,), float(tree["tag"])))
    return tree["tag"]


def assert_consistent(run_uri: str, storage_options=None, cache_dir=None, run_name: str | None = None) -> list[int]:
    """Every listed checkpoint loads verified, all its files from one save; returns the epochs."""
    mgr = ckptio.CheckpointManager(run_uri, storage_options=storage_options, run_name=run_name)
    cache = NodeCache(cache_dir) if cache_dir else None
    epochs = []
    for info in mgr.list_checkpoints():
        art = ckptio.load_from_uri(info.uri, verify=True, storage_options=storage_options, cache=cache)
        tag = int(art.state_dict["tag"])
        assert tag // 100 == info.epoch, (info.name, tag)
        for k, v in _weights(tag).items():
            assert torch.equal(art.state_dict[k], v), (info.name, k)
        assert art.training_metrics == _metrics(tag), (info.name, art.training_metrics, tag)
        raw = mgr.read_trainer_state(info, cache=cache)
        assert raw is not None and _tag_of_trainer(unflatten(*raw)) == tag, info.name
        epochs.append(info.epoch)
    return epochs


def assert_no_temporaries(*directories: str) -> None:
    for d in directories:
        if os.path.isdir(d):
            left = [n for n in os.listdir(d) if TMP_MARK in n]
            assert left == [], (d, left)


# -- operations: setup (faults off), the operation (faults on), the next operation (faults off) --


class Op:
    name = ""
    kinds = LOCAL_KINDS

    def __init__(self, root: str):
        self.root = root
        self.run = os.path.join(root, "run")
        self.ckdir = os.path.join(self.run, "checkpoints")

    def setup(self) -> None:
        pass

    def run_op(self) -> None:
        raise NotImplementedError

    def check(self) -> None:
        epochs = assert_consistent(self.run)
        assert epochs, "no checkpoint left"
        assert_no_temporaries(self.ckdir)

    def check_commit(self, faults: Faults) -> None:
        pass

    def next_op(self) -> None:
        ckptio.CheckpointManager(self.run, keep_last=1).save_agent(
            _weights(900), 9, _metrics(900), trainer_state=flatten(_trainer(900))
        )
        assert assert_consistent(self.run)[-1] == 9


class SaveAgent(Op):
    """CheckpointManager.save_agent with metrics, trainer state and retention (keep_last=1)."""

    name = "save_agent"

    def setup(self) -> None:
        self._save(100, 1)

    def _save(self, tag: int, epoch: int) -> None:
        ckptio.CheckpointManager(self.run, keep_last=1).save_agent(
            _weights(tag), epoch, _metrics(tag), trainer_state=flatten(_trainer(tag))
        )

    def run_op(self) -> None:
        self._save(200, 2)

    def check_commit(self, faults: Faults) -> None:
        """The weights rename is the commit point: epoch 2 is listed exactly when it completed."""
        committed = any(op == "replace" and d.endswith("/run.e00000002.safetensors") for op, d in faults.before_fault())
        epochs = [i.epoch for i in ckptio.CheckpointManager(self.run).list_checkpoints()]
        assert (2 in epochs) == committed, (faults.fired, epochs)
        assert epochs in ([1], [2], [1, 2]), epochs


class Resave(SaveAgent):
    """A re-save of the same epoch: every file of the checkpoint is replaced."""

    name = "resave"

    def run_op(self) -> None:
        self._save(101, 1)

    def check_commit(self, faults: Faults) -> None:
        """Before the weights rename the old save is whole; after it, the new one."""
        committed = any(op == "replace" and d.endswith("/run.e00000001.safetensors") for op, d in faults.before_fault())
        art = ckptio.load_from_uri(self.run, verify=True)
        assert int(art.state_dict["tag"]) == (101 if committed else 100), faults.fired


class CheckpointerSave(Op):
    """Checkpointer.save with the manifest (first save), trainer state and retention, sync or async."""

    name = "checkpointer_sync"
    async_save = False

    def _checkpointer(self) -> ckptio.Checkpointer:
        from archs import MLPArch

        cfg = ckptio.CheckpointConfig(keep_last=1, async_save=self.async_save)
        return ckptio.Checkpointer(self.run, MLPArch(), cfg)

    def run_op(self) -> None:
        ck = self._checkpointer()
        try:
            ck.save(_weights(100), 1, _metrics(100), _trainer(100))
            ck.save(_weights(200), 2, _metrics(200), _trainer(200))
        finally:
            ck.close()

    def check(self) -> None:
        assert_consistent(self.run)  # may be empty: the first save can fail
        assert_no_temporaries(self.ckdir)

    def next_op(self) -> None:
        ck = self._checkpointer()
        ck.save(_weights(300), 3, _metrics(300), _trainer(300))
        ck.close()
        assert assert_consistent(self.run)[-1] == 3


class CheckpointerAsync(CheckpointerSave):
    name = "checkpointer_async"
    async_save = True


class CachedLoad(Op):
    """load_from_uri of a remote checkpoint through the node cache: download, rename, eviction."""

    name = "cached_load"
    kinds = LOCAL_KINDS + REMOTE_KINDS

    def __init__(self, root: str):
        super().__init__(root)
        self.remote = f"memory://faults-{uuid.uuid4().hex[:10]}/run"
        self.cache_dir = os.path.join(root, "cache")

    def setup(self) -> None:
        mgr = ckptio.CheckpointManager(self.remote)
        for epoch in (1, 2):
            mgr.save_agent(
                _weights(epoch * 100), epoch, _metrics(epoch * 100), trainer_state=flatten(_trainer(epoch * 100))
            )
        self.cache = NodeCache(self.cache_dir, max_bytes=8000)  # room for about one weights file: evicts
        ckptio.load_from_uri(mgr.list_checkpoints()[0].uri, cache=self.cache)

    def run_op(self) -> None:
        art = ckptio.load_from_uri(self.remote, cache=self.cache, verify=True)
        assert int(art.state_dict["tag"]) == 200 and art.training_metrics == _metrics(200)

    def check(self) -> None:
        assert_no_temporaries(self.cache_dir)
        for name in os.listdir(self.cache_dir):  # every cached file is whole
            if name.endswith(".safetensors"):
                with open(os.path.join(self.cache_dir, name), "rb") as f:
                    ckptio.formats.verify_safetensors(f, name)

    def next_op(self) -> None:
        self.run_op()
        assert assert_consistent(self.remote, cache_dir=self.cache_dir) == [1, 2]


class Upload(Op):
    """A Checkpointer mirroring to an object store: each put_file, each retry, retention on both sides."""

    name = "upload"
    kinds = LOCAL_KINDS + REMOTE_KINDS

    def __init__(self, root: str):
        super().__init__(root)
        self.remote = f"memory://faults-{uuid.uuid4().hex[:10]}/run"

    def _checkpointer(self, retries: int) -> ckptio.Checkpointer:
        from archs import MLPArch

        cfg = ckptio.CheckpointConfig(
            keep_last=1, remote_uri=self.remote, upload_retries=retries, upload_backoff_s=0.0, upload_workers=1,
            cache_dir=os.path.join(self.root, "cache"),
        )  # fmt: skip
        return ckptio.Checkpointer(self.run, MLPArch(), cfg)

    def run_op(self) -> None:
        ck = self._checkpointer(retries=1)
        try:
            ck.save(_weights(100), 1, _metrics(100), _trainer(100))
            ck.save(_weights(200), 2, _metrics(200), _trainer(200))
        finally:
            ck.close()

    def check(self) -> None:
        assert_consistent(self.run, run_name="run")
        assert_consistent(self.remote, cache_dir=os.path.join(self.root, "cache"))
        assert_no_temporaries(self.ckdir, os.path.join(self.root, "cache"))

    def next_op(self) -> None:
        ck = self._checkpointer(retries=0)
        ck.save(_weights(300), 3, _metrics(300), _trainer(300))
        ck.close()
        assert assert_consistent(self.remote, cache_dir=os.path.join(self.root, "cache"))[-1] == 3


class Convert(Op):
    """ckptio convert of a .pt checkpoint (with metrics) to .safetensors, over an older destination."""

    name = "convert"

    def setup(self) -> None:
        os.makedirs(self.run)
        ckptio.save_policy_artifact(os.path.join(self.run, "src"), _weights(100), None, _metrics(100), epoch=1,
                                    checkpoint_format="pt")  # fmt: skip
        ckptio.save_policy_artifact(os.path.join(self.run, "dst"), _weights(0), None, _metrics(0), epoch=0)

    def run_op(self) -> None:
        ckptio.convert(os.path.join(self.run, "src.pt"), os.path.join(self.run, "dst.safetensors"))

    def check(self) -> None:
        art = ckptio.load_from_uri(os.path.join(self.run, "dst.safetensors"), verify=True)
        tag = int(art.state_dict["tag"])
        assert tag in (0, 100) and art.training_metrics == _metrics(tag)  # the old file or the new, whole
        assert_no_temporaries(self.run)

    def next_op(self) -> None:
        self.run_op()
        art = ckptio.load_from_uri(os.path.join(self.run, "dst.safetensors"), verify=True)
        assert int(art.state_dict["tag"]) == 100 and art.training_metrics == _metrics(100)


OPS = [SaveAgent, Resave, CheckpointerSave, CheckpointerAsync, CachedLoad, Upload, Convert]


def _positions(kind: str, count: int, stress: bool) -> list[int]:
    if stress or kind in ("EIO", "timeout"):
        return list(range(1, count + 1))
    return list(range(1, count + 1, 3))


@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.name)
def test_every_io_call_failing_once_leaves_a_consistent_store(op_cls, tmp_path, monkeypatch, request):
    stress = request.config.getoption("--stress")
    clean = op_cls(str(tmp_path / "clean"))
    clean.setup()
    with monkeypatch.context() as m:
        counter = Faults().install(m)
        clean.run_op()
    clean.check()
    assert len(counter.calls) >= 10, counter.calls  # the harness sees the operation's I/O
    report = {}
    for kind in op_cls.kinds:
        count = Faults(kind=kind, calls=counter.calls).eligible()
        positions = _positions(kind, count, stress)
        raised = 0
        for k in positions:
            op = op_cls(str(tmp_path / f"{kind}-{k}"))
            op.setup()
            faults = Faults(fail_at=k, kind=kind)
            with monkeypatch.context() as m:
                faults.install(m)
                try:
                    op.run_op()
                except ckptio.CheckpointError:
                    raised += 1
                except Exception as e:  # anything else is a finding
                    raise AssertionError(f"{op_cls.name}: {kind} at call {k} {faults.fired}: untyped {e!r}") from e
            try:
                op.check()
                op.check_commit(faults)
                op.next_op()
            except Exception as e:
                raise AssertionError(f"{op_cls.name}: after {kind} at call {k} {faults.fired}: {e!r}") from e
        report[kind] = (len(positions), count, raised)
        if kind != "short":  # a failed call must not pass silently: some positions must surface
            assert raised > 0 or count == 0, (kind, report)
    print(f"\n{op_cls.name}: " + ", ".join(f"{k} {n}/{c} positions ({r} raised)" for k, (n, c, r) in report.items()))


# -- the order of operations, pinned ------------------------------------------------------------


def _index(calls, op, suffix, start=0):
    """Position of the first ``op`` call at or after ``start`` whose detail ends with ``suffix``."""
    return next(i for i in range(start, len(calls)) if calls[i][0] == op and calls[i][1].endswith(suffix))


def _commits(calls):
    """(final name, index of its rename) for every file written through a temporary, in order."""
    out = []
    for i, (op, detail) in enumerate(calls):
        if op in ("replace", "link") and " -> " in detail and TMP_MARK in detail.split(" -> ")[0]:
            out.append((os.path.basename(detail.split(" -> ")[1]), i))
    return out


def test_local_save_order_file_protocol_commit_point_and_retention(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    ckdir = os.path.join(run, "checkpoints")
    ckptio.CheckpointManager(run, keep_last=1).save_agent(
        _weights(100), 1, _metrics(100), trainer_state=flatten(_trainer(100))
    )
    with monkeypatch.context() as m:
        rec = Faults().install(m)
        ckptio.CheckpointManager(run, keep_last=1).save_agent(
            _weights(200), 2, _metrics(200), trainer_state=flatten(_trainer(200))
        )
    calls = rec.calls
    commits = _commits(calls)
    names = [n for n, _ in commits]
    # sidecars first, the weights file last: its rename is the commit point
    assert names[-1] == "run.e00000002.safetensors"
    assert names[0].endswith(".metrics.json") and names[1].endswith(".trainer.safetensors") and len(names) == 3
    for name, renamed in commits:
        tmp = calls[renamed][1].split(" -> ")[0]
        written = _index(calls, "open", tmp)  # os.open of the temporary
        synced = _index(calls, "fsync", tmp)  # fsync of the file, by descriptor
        dir_synced = _index(calls, "fsync", ckdir, renamed)  # the directory, after the rename
        assert written < synced < renamed < dir_synced, (name, written, synced, renamed, dir_synced)
        assert dir_synced < (commits[names.index(name) + 1][1] if name != names[-1] else len(calls))
    # retention runs after the commit, and deletes the old weights before its sidecars
    committed = commits[-1][1]
    unlinks = [(i, os.path.basename(d)) for i, (op, d) in enumerate(calls) if op == "unlink" and TMP_MARK not in d]
    old = [(i, n) for i, n in unlinks if n.startswith("run.e00000001.")]
    assert old and all(i > committed for i, _ in old)
    assert old[0][1] == "run.e00000001.safetensors" and len(old) == 3, old


def test_the_weights_stream_while_the_trainer_state_commits_and_appear_only_after_it(tmp_path, monkeypatch):
    """The trainer-state file's fsync and rename overlap the weights' write (one disk flush hidden behind the
    next file), yet the weights, the commit point, are renamed only once the trainer state is committed."""
    import threading

    real_fsync, real_replace = os.fsync, os.replace
    weights_synced, events = threading.Event(), []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if TMP_MARK in name and ".trainer." in name:
            # held until the weights' own data is written and being flushed: only an overlapped save gets there
            assert weights_synced.wait(20), "the weights were not written while the trainer state committed"
        elif TMP_MARK in name and name.startswith(".run.e00000001.safetensors"):
            weights_synced.set()
        events.append(("fsync", name))
        real_fsync(fd)

    weights_renamed = threading.Event()

    def replace(src, dst, *args, **kwargs):
        name = os.path.basename(dst)
        if name.endswith(".trainer.safetensors"):
            # a while for the weights to appear too soon, were they not waiting for this rename
            weights_renamed.wait(0.5)
        elif name == "run.e00000001.safetensors":
            weights_renamed.set()
        events.append(("replace", name))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckptio.CheckpointManager(str(tmp_path / "run")).save_agent(
        _weights(100), 1, _metrics(100), trainer_state=flatten(_trainer(100))
    )
    renamed = [n for op, n in events if op == "replace"]
    assert renamed[-2].endswith(".trainer.safetensors") and renamed[-1] == "run.e00000001.safetensors", renamed
    assert _tag_of_trainer(ckptio.CheckpointManager(str(tmp_path / "run")).load_trainer_state()) == 100


def test_the_disk_starts_on_a_large_file_as_it_is_written(tmp_path, monkeypatch):
    """A large save's pages are handed to the disk range after range as they are written (below the kernel's
    dirty thresholds none would be written until the fsync, which would then wait for them all); the fsync
    still follows, before the rename, and the file is what stock safetensors reads."""
    import sys

    from safetensors.torch import load_file

    from ckptio import storage

    if sys.platform == "linux":  # where it exists it is used: a libc lookup gone wrong would silently drop it
        assert storage._sync_file_range is not None
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def started(fd, offset, length, flags):
        events.append(("start", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length, flags))
        return 0

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    monkeypatch.setattr(storage, "_sync_file_range", started)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: events.append(("replace", os.path.basename(s))) or
                        real_replace(s, d, *a, **k))  # fmt: skip
    weights = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(10)}  # 40 MiB
    uri = ckptio.CheckpointManager(str(tmp_path / "run")).save_agent(weights, 1, {"tag": 1})
    tmp = next(e[1] for e in events if e[0] == "replace" and ".run.e00000001.safetensors" in e[1])
    mine = [(i, e) for i, e in enumerate(events) if e[1] == tmp]
    starts = [e for _, e in mine if e[0] == "start"]
    size = os.path.getsize(uri)
    assert len(starts) >= (size - storage.WRITEBACK_BYTES) // storage.WRITEBACK_BYTES >= 3, starts
    ends = 0
    for _, _, offset, length, flags in starts:  # consecutive, each at least the step, nothing asked twice
        assert offset == ends and length >= storage.WRITEBACK_BYTES and flags == storage._SYNC_FILE_RANGE_WRITE
        ends = offset + length
    assert ends > size - storage.WRITEBACK_BYTES
    kinds = [e[0] for _, e in mine]
    assert kinds.index("fsync") > max(i for i, k in enumerate(kinds) if k == "start") and kinds[-1] == "replace"
    back = load_file(uri)
    assert all(torch.equal(back[k], v) for k, v in weights.items()) and back.keys() == weights.keys()
    # without sync_file_range (not Linux) the same save is written as before
    monkeypatch.setattr(storage, "_sync_file_range", None)
    uri = ckptio.CheckpointManager(str(tmp_path / "other")).save_agent(weights, 1, {"tag": 1})
    assert all(torch.equal(load_file(uri)[k], v) for k, v in weights.items())


def test_manifest_is_linked_once_after_its_fsync(tmp_path, monkeypatch):
    from archs import MLPArch

    with monkeypatch.context() as m:
        rec = Faults().install(m)
        ckptio.Checkpointer(str(tmp_path / "run"), MLPArch()).save(_weights(100), 1)
    calls = rec.calls
    link = _index(calls, "link", "model_architecture.json")
    tmp = calls[link][1].split(" -> ")[0]
    assert _index(calls, "fsync", tmp) < link < _index(calls, "fsync", str(tmp_path / "run" / "checkpoints"), link)
    assert not any(op == "replace" and d.endswith("model_architecture.json") for op, d in calls)  # never overwritten


def test_upload_order_weights_last_and_remote_retention_weights_first(tmp_path, monkeypatch):
    from archs import MLPArch

    remote = f"memory://order-{uuid.uuid4().hex[:10]}/run"
    cfg = ckptio.CheckpointConfig(keep_last=1, remote_uri=remote, upload_workers=1)
    with monkeypatch.context() as m:
        rec = Faults().install(m)
        with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg) as ck:
            ck.save(_weights(100), 1, _metrics(100), _trainer(100))
            ck.wait()
            ck.uploader.wait()
            ck.save(_weights(200), 2, _metrics(200), _trainer(200))
    uploads = [os.path.basename(d) for op, d in rec.calls if op == "remote:upload"]
    for epoch in (1, 2):
        mine = [n for n in uploads if f".e0000000{epoch}." in n]
        assert len(mine) == 3 and mine[-1] == f"run.e0000000{epoch}.safetensors", mine  # weights last
        assert mine[0].endswith(".metrics.json") and mine[1].endswith(".trainer.safetensors")
    deletes = [os.path.basename(d) for op, d in rec.calls if op == "remote:delete"]
    old = [n for n in deletes if n.startswith("run.e00000001.")]
    assert old[0] == "run.e00000001.safetensors" and len(old) == 3, deletes
    assert rec.calls.index(next(c for c in rec.calls if c[0] == "remote:delete")) > max(
        i for i, (op, d) in enumerate(rec.calls) if op == "remote:upload" and d.endswith("run.e00000002.safetensors")
    )  # remote retention only after the newer checkpoint's commit
