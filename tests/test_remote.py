"""Object storage for real: moto's S3 server and the GCS emulator on 127.0.0.1, through s3fs/gcsfs."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import pytest
import torch
from remote_fixtures import EventOnLog, gate_uploads

import ckptio
from ckptio.cache import NodeCache
from ckptio.storage import Storage

pytestmark = pytest.mark.slow


@pytest.fixture(params=["s3", "gcs", "memory"])
def remote(request):
    """(run URI, storage options) on each backend."""
    if request.param == "memory":
        return f"memory://m{uuid.uuid4().hex[:8]}/run", {}
    server = request.getfixturevalue(request.param)
    return f"{request.param}://{server.make_bucket()}/run", server.options()


def test_save_list_latest_load_retention(remote, tmp_path, policy, env_meta):
    from archs import MLPArch

    uri, opts = remote
    mgr = ckptio.CheckpointManager(uri, keep_last=2, storage_options=opts)
    for epoch in (1, 2, 3):
        mgr.save_agent(policy, epoch, {"score": float(epoch)}, policy_architecture=MLPArch())
    assert [i.epoch for i in ckptio.list_checkpoints(uri, opts)] == [2, 3]
    assert ckptio.latest(uri, opts).epoch == 3
    cache = NodeCache(str(tmp_path / "cache"))
    art = ckptio.load_from_uri(uri, storage_options=opts, cache=cache, verify=True)
    assert art.epoch == 3 and art.training_metrics == {"score": 3.0}
    assert torch.equal(art.instantiate(env_meta).head.weight, policy.head.weight)
    assert cache.fills == 1
    ckptio.load_from_uri(uri, storage_options=opts, cache=cache)
    assert cache.fills == 1  # served from the node cache
    leftover = Storage(uri + "/checkpoints", opts).listdir()
    assert not any(".e00000001." in n for n in leftover)  # sidecars pruned with their weights


def test_manifest_is_write_once(remote, env_meta):
    from archs import MLPArch

    uri, opts = remote
    cfg = ckptio.CheckpointConfig(storage_options=opts)
    ckptio.Checkpointer(uri, MLPArch(), cfg).register()
    storage = Storage(uri + "/checkpoints", opts)
    before = storage.read_bytes("model_architecture.json")
    with pytest.raises(ckptio.ArchitectureError, match="different model"):
        ckptio.Checkpointer(uri, MLPArch(hidden=3), cfg).load_or_create_policy(env_meta)
    assert storage.read_bytes("model_architecture.json") == before


def test_s3_conditional_create_is_enforced_by_the_server(s3):
    storage = Storage(f"s3://{s3.make_bucket()}/x", s3.options())
    storage.write_bytes("once.json", b"first", exclusive=True)
    storage.fs.exists = lambda path: False  # skip ckptio's pre-check: the conditional PUT alone must refuse
    with pytest.raises(FileExistsError):
        storage.write_bytes("once.json", b"second", exclusive=True)
    assert storage.read_bytes("once.json") == b"first"
    assert any("PUT" in r and "once.json" in r for r in s3.requests())


def test_gcs_manifest_create_sends_if_generation_match_zero(gcs, monkeypatch):
    import gcsfs

    sent = []
    real_call = gcsfs.GCSFileSystem._call

    async def recording_call(self, method, path, *args, **kwargs):
        sent.append((method, path, kwargs))
        return await real_call(self, method, path, *args, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_call", recording_call)
    storage = Storage(f"gs://{gcs.make_bucket()}/x", gcs.options())
    storage.write_bytes("model_architecture.json", b"{}", exclusive=True)
    uploads = [k for m, _, k in sent if m == "POST" and k.get("uploadType") in ("media", "multipart", "resumable")]
    assert uploads and all(k.get("ifGenerationMatch") == "0" for k in uploads), sent


def test_latest_reads_every_page_of_a_long_listing(s3):
    import s3fs

    bucket = s3.make_bucket()
    fs = s3fs.S3FileSystem(**s3.options())
    n = 1010  # moto pages at 1000 keys
    fs.pipe({f"{bucket}/run/checkpoints/run.e{i:08d}.safetensors": b"x" for i in range(n)})
    assert ckptio.latest(f"s3://{bucket}/run", s3.options()).epoch == n - 1
    assert len(ckptio.list_checkpoints(f"s3://{bucket}/run", s3.options())) == n
    assert any("continuation-token" in r for r in s3.requests())


def test_partial_uploads_are_never_latest(s3, policy):
    import s3fs

    bucket = s3.make_bucket()
    uri = f"s3://{bucket}/run"
    ckptio.CheckpointManager(uri, storage_options=s3.options()).save_agent(policy, 1)
    fs = s3fs.S3FileSystem(**s3.options())
    base = f"{bucket}/run/checkpoints/run.e00000002"
    fs.pipe(base + ".metrics.json", b"{}")  # sidecar uploaded, weights never were
    f = fs.open(base + ".safetensors", "wb", block_size=5 << 20)
    f.write(os.urandom(6 << 20))  # one part of a multipart upload goes up, then the writer dies
    f.flush()
    assert any("uploads" in r for r in s3.requests())
    f.close = lambda: None  # the writer dies: the multipart upload is never completed
    del f
    assert ckptio.latest(uri, s3.options()).epoch == 1


# ---- background uploads ---------------------------------------------------------------------


def _ckpt(tmp_path, remote_uri, opts, **cfg):
    from archs import MLPArch

    config = ckptio.CheckpointConfig(
        remote_uri=remote_uri, remote_storage_options=opts, cache_dir=str(tmp_path / "cache"), **cfg
    )
    return ckptio.Checkpointer(str(tmp_path / f"local{uuid.uuid4().hex[:6]}"), MLPArch(), config)


def test_uploads_in_background_with_retention_both_sides(s3, tmp_path, policy, env_meta):
    remote = f"s3://{s3.make_bucket()}/run"
    with _ckpt(tmp_path, remote, s3.options(), keep_last=2) as ck:
        ck.load_or_create_policy(env_meta)
        for epoch in range(1, 5):
            ck.save(policy, epoch, {"epoch": epoch})
    assert [i.epoch for i in ckptio.list_checkpoints(remote, s3.options())] == [3, 4]
    assert [i.epoch for i in ck.manager.list_checkpoints()] == [3, 4]
    # a job on a "new node": empty local dir, resumes from the bucket
    fresh = _ckpt(tmp_path, remote, s3.options())
    model = fresh.load_or_create_policy(env_meta)
    assert fresh.resumed_from.epoch == 4 and fresh.resumed_from.uri.startswith("s3://")
    assert torch.equal(model.head.weight, policy.head.weight)
    fresh.close()


def _same_save(weights_path):
    """A checkpoint's files as bytes, less what differs between two saves of the same content (save id, names)."""
    from ckptio.formats import read_header
    from ckptio.layout import Sidecars

    def content(path):
        with open(path, "rb") as f:
            hdr = read_header(f, os.path.getsize(path), path)
            f.seek(hdr.data_start)
            meta = {k: v for k, v in hdr.metadata.items() if k not in PER_SAVE_KEYS}
            return meta, {k: e[1:] for k, e in hdr.entries.items()}, f.read()

    directory = os.path.dirname(weights_path)
    meta = ckptio.formats.read_header(open(weights_path, "rb"), os.path.getsize(weights_path), "").metadata
    sidecars = Sidecars.of(os.path.basename(weights_path), meta, weights_path)
    with open(os.path.join(directory, sidecars.metrics), "rb") as f:
        metrics = f.read()
    return content(weights_path), content(os.path.join(directory, sidecars.trainer)), metrics


# what differs between two saves of the same content: the save, its sidecars' names, the directory it is in
PER_SAVE_KEYS = {"ckptio.save_id", "ckptio.metrics_file", "ckptio.trainer_file", "ckptio.saved_in"}


def test_async_save_equals_sync_and_ignores_later_mutation(tmp_path, policy, env_meta):
    from archs import MLPArch

    sync = ckptio.Checkpointer(str(tmp_path / "a" / "run"), MLPArch())
    asyn = ckptio.Checkpointer(str(tmp_path / "b" / "run"), MLPArch(), ckptio.CheckpointConfig(async_save=True))
    opt = torch.optim.Adam(policy.parameters())
    policy(torch.randn(2, 6)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict()}
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    torch.manual_seed(1)
    a = sync.save(policy, 1, {"m": 1}, state)
    torch.manual_seed(1)
    b = asyn.save(policy, 1, {"m": 1}, state)
    with torch.no_grad():  # the training thread moves on at once
        for p in policy.parameters():
            p.add_(1.0)
        for s in opt.state.values():
            s["exp_avg"].add_(1.0)
    asyn.close()
    sync.close()
    assert _same_save(a) == _same_save(b)
    for k, v in ckptio.load_from_uri(b).state_dict.items():
        assert torch.equal(v, before[k])


def test_frozen_server_times_out_retries_and_close_stays_bounded(s3, tmp_path, policy, env_meta):
    remote = f"s3://{s3.make_bucket()}/run"
    ck = _ckpt(tmp_path, remote, s3.options(), upload_file_timeout_s=1.0, upload_retries=2, upload_backoff_s=0.1,
               close_timeout_s=8.0)  # fmt: skip
    ck.load_or_create_policy(env_meta)
    retried = EventOnLog("retry")
    logging.getLogger("ckptio").addHandler(retried)
    s3.freeze()
    try:
        local = ck.save(policy, 1)
        assert retried.event.wait(timeout=30)  # the first attempt timed out instead of hanging
        start = time.monotonic()
        with pytest.raises(ckptio.UploadError):
            ck.close()
        assert time.monotonic() - start < 30  # bounded by the configuration, not by the server
    finally:
        s3.thaw()
        logging.getLogger("ckptio").removeHandler(retried)
    assert ckptio.load_from_uri(local, verify=True).epoch == 1  # the local checkpoint is intact


def test_upload_completes_after_a_freeze_ends(s3, tmp_path, policy, env_meta):
    remote = f"s3://{s3.make_bucket()}/run"
    ck = _ckpt(tmp_path, remote, s3.options(), upload_file_timeout_s=1.0, upload_retries=20, upload_backoff_s=0.1)
    ck.load_or_create_policy(env_meta)
    retried = EventOnLog("retry")
    logging.getLogger("ckptio").addHandler(retried)
    s3.freeze()
    try:
        ck.save(policy, 1)
        assert retried.event.wait(timeout=30)
    finally:
        s3.thaw()
        logging.getLogger("ckptio").removeHandler(retried)
    ck.close()
    assert ckptio.latest(remote, s3.options()).epoch == 1


def test_server_stopped_during_upload_then_back(s3, tmp_path, policy, env_meta):
    bucket = s3.make_bucket()
    remote = f"s3://{bucket}/run"
    ck = _ckpt(tmp_path, remote, s3.options(), upload_file_timeout_s=2.0, upload_retries=20, upload_backoff_s=0.1)
    ck.load_or_create_policy(env_meta)
    retried = EventOnLog("retry")
    logging.getLogger("ckptio").addHandler(retried)
    try:
        s3.stop()
        ck.save(policy, 1)
        assert retried.event.wait(timeout=30)
        s3.start()  # same port; moto's state is gone, so the bucket is made again
        import s3fs

        s3fs.S3FileSystem(**s3.options()).mkdir(bucket)
        ck.close()
    finally:
        logging.getLogger("ckptio").removeHandler(retried)
    assert ckptio.latest(remote, s3.options()).epoch == 1


def test_server_that_never_returns_fails_close_and_keeps_local(s3, tmp_path, policy, env_meta):
    remote = f"s3://{s3.make_bucket()}/run"
    ck = _ckpt(tmp_path, remote, s3.options(), upload_file_timeout_s=1.0, upload_retries=2, upload_backoff_s=0.05)
    ck.load_or_create_policy(env_meta)
    s3.stop()
    local = ck.save(policy, 1)
    with pytest.raises(ckptio.UploadError, match="upload failed after 3 attempts"):
        ck.close()
    assert ckptio.load_from_uri(local, verify=True).epoch == 1


def test_coalescing_keeps_the_newest_when_uploads_fall_behind(s3, tmp_path, policy, env_meta):
    remote = f"s3://{s3.make_bucket()}/run"
    ck = _ckpt(tmp_path, remote, s3.options(), upload_workers=1, upload_max_pending=1, upload_file_timeout_s=1.0,
               upload_retries=30, upload_backoff_s=0.1)  # fmt: skip
    ck.load_or_create_policy(env_meta)
    s3.freeze()  # nothing can finish: saves pile up behind the first
    try:
        for epoch in range(1, 6):
            ck.save(policy, epoch)
        assert len(ck.uploader.in_flight()) <= 2 * 3  # one active + one pending checkpoint (3 files each at most)
    finally:
        s3.thaw()
    ck.close()
    uploaded = [i.epoch for i in ckptio.list_checkpoints(remote, s3.options())]
    assert uploaded[-1] == 5 and 2 not in uploaded and 3 not in uploaded


def test_two_rank_resume_from_s3_downloads_once_per_node(s3, tmp_path):
    from conftest import run_torchrun

    remote = f"s3://{s3.make_bucket()}/run"
    opts = json.dumps(s3.options())
    small = ["--steps-per-epoch", "4", "--batch-size", "16", "--hidden", "16"]
    run_torchrun("launch.train", "--run-dir", str(tmp_path / "node1"), "--epochs", "2", "--remote-uri", remote,
                 "--storage-options", opts, *small)  # fmt: skip
    before = len(s3.requests())
    out = run_torchrun("launch.train", "--run-dir", str(tmp_path / "node2"), "--epochs", "3", "--remote-uri", remote,
                       "--storage-options", opts, "--cache-dir", str(tmp_path / "cache2"), *small)  # fmt: skip
    assert "resumed from s3://" in out.stdout and "e00000002" in out.stdout
    gets = [
        r for r in s3.requests()[before:] if r.startswith("GET ") and r.split("?")[0].endswith(".e00000002.safetensors")
    ]
    assert len(gets) == 1, gets
    trainer_gets = [
        r for r in s3.requests()[before:] if r.startswith("GET ") and ".e00000002." in r and ".trainer.safetensors" in r
    ]
    assert len(trainer_gets) == 1, trainer_gets


def test_node_cache_is_keyed_by_version_and_bounded(s3, tmp_path, policy):
    bucket = s3.make_bucket()
    storage = Storage(f"s3://{bucket}/c", s3.options())
    cache = NodeCache(str(tmp_path / "cache"), max_bytes=1500)
    storage.write_bytes("a.bin", b"1" * 1000)
    first = cache.fetch(storage, "a.bin")
    assert cache.fetch(storage, "a.bin") == first and cache.fills == 1
    storage.write_bytes("a.bin", b"2" * 1000)  # same name, new content: never served stale
    second = cache.fetch(storage, "a.bin")
    assert second != first and open(second, "rb").read() == b"2" * 1000 and cache.fills == 2
    assert not os.path.exists(first)  # evicted: both would exceed the 1500-byte limit
    storage.write_bytes("b.bin", b"3" * 1000)
    cache.fetch(storage, "b.bin")
    assert not os.path.exists(second)
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(cache.path_for(storage, "b.bin"))]


def test_network_filesystems_are_read_eagerly(tmp_path, policy, monkeypatch):
    from ckptio import layout
    from ckptio.storage import is_network_filesystem

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nsrv:/x /mnt/nfs nfs4 rw 0 0\nfoo /mnt/f fuse.s3fs rw 0 0\n")
    assert not is_network_filesystem("/work", str(mounts))
    assert is_network_filesystem("/mnt/nfs/run/x", str(mounts)) and is_network_filesystem("/mnt/f/y", str(mounts))
    uri = ckptio.save_policy_artifact(str(tmp_path / "p"), policy, None)

    def mapped(art):
        return any(uri in line for line in open("/proc/self/maps"))

    monkeypatch.setattr(layout, "is_network_filesystem", lambda path: True)
    art = ckptio.load_from_uri(uri)
    assert not mapped(art) and torch.equal(art.state_dict["head.weight"], policy.head.weight)
    forced = ckptio.load_from_uri(uri, mmap=True)  # the explicit override wins
    assert mapped(forced)


def test_resumed_checkpoint_survives_until_a_newer_one_is_uploaded(s3, tmp_path, policy, env_meta):
    from archs import MLPArch

    remote = f"s3://{s3.make_bucket()}/run"
    local = str(tmp_path / "local")
    cfg = ckptio.CheckpointConfig(keep_last=1, remote_uri=remote, remote_storage_options=s3.options(),
                                  cache_dir=str(tmp_path / "cache"), upload_file_timeout_s=1.0,
                                  upload_retries=30, upload_backoff_s=0.1)  # fmt: skip
    with ckptio.Checkpointer(local, MLPArch(), cfg) as first:
        first.load_or_create_policy(env_meta)
        first.save(policy, 1)
    ck = ckptio.Checkpointer(local, MLPArch(), cfg)
    ck.load_or_create_policy(env_meta)
    assert ck.resumed_from.epoch == 1
    s3.freeze()  # the next upload cannot finish
    try:
        ck.save(policy, 2)
        # keep_last=1, yet the resumed-from checkpoint stays until epoch 2 is durable remotely
        assert [i.epoch for i in ck.manager.list_checkpoints()] == [1, 2]
    finally:
        s3.thaw()
    ck.close()
    assert [i.epoch for i in ck.manager.list_checkpoints()] == [2]
    assert [i.epoch for i in ckptio.list_checkpoints(remote, s3.options())] == [2]


# ---- object-store failures are typed and bounded ------------------------------------------


def _closed_port() -> int:
    from remote_fixtures import free_port

    return free_port()  # bound and released: nothing listens there


def test_unreachable_s3_endpoint_is_a_storage_error_not_not_found(s3, policy):
    opts = dict(s3.options(), client_kwargs={"endpoint_url": f"http://127.0.0.1:{_closed_port()}"})
    for call in (
        lambda: ckptio.load_from_uri("s3://bucket/run", storage_options=opts),
        lambda: ckptio.list_checkpoints("s3://bucket/run", storage_options=opts),
        lambda: ckptio.CheckpointManager("s3://bucket/run", storage_options=opts).save_agent(policy, 1),
    ):
        with pytest.raises(ckptio.CheckpointError) as e:
            call()
        assert not isinstance(e.value, FileNotFoundError), e.value  # refused is not "no such file"
        assert "s3://bucket/run" in str(e.value) and "EndpointConnectionError" in str(e.value)
    assert isinstance(e.value, ckptio.CheckpointSaveError)


def test_s3_without_credentials_is_a_storage_error(s3, monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance-metadata address
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    bucket = s3.make_bucket()
    opts = {k: v for k, v in s3.options().items() if k not in ("key", "secret")}
    with pytest.raises(ckptio.StorageError, match=rf"s3://{bucket}/run.*NoCredentialsError"):
        ckptio.load_from_uri(f"s3://{bucket}/run", storage_options=opts)


def test_gcs_without_a_server_fails_within_the_time_bound(gcs, monkeypatch):
    monkeypatch.setattr(ckptio.storage, "DEFAULT_TIMEOUT_S", 2.0)
    opts = dict(gcs.options(), endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ckptio.StorageError, match=r"gs://bucket/run.*(no answer within 2.0s|Connect)"):
        ckptio.load_from_uri("gs://bucket/run", storage_options=opts)


def _memory_remote():
    return f"memory://m{uuid.uuid4().hex[:8]}/run"


def _epochs(uri, opts=None):
    return [i.epoch for i in ckptio.list_checkpoints(uri, opts)]


def test_a_remote_listing_sees_what_another_writer_committed_since(s3):
    """fsspec caches listings per filesystem instance: ckptio must list what another process wrote after."""
    bucket = s3.make_bucket()
    reader, writer = Storage(f"s3://{bucket}/c", s3.options()), Storage(f"s3://{bucket}/c", s3.options())
    writer.write_bytes("a", b"1")
    assert reader.listdir() == ["a"]
    writer.write_bytes("b", b"2")
    assert reader.listdir() == ["a", "b"]


def test_a_checkpoint_larger_than_the_cache_limit_still_loads(tmp_path, policy):
    """The entry just fetched is never the one evicted, even when it alone exceeds the limit."""
    remote = _memory_remote()
    uri = ckptio.save_policy_artifact(remote + "/p", policy, None)
    cache = NodeCache(str(tmp_path / "cache"), max_bytes=1)
    art = ckptio.load_from_uri(uri, cache=cache)
    assert cache.fills == 1 and torch.equal(art.state_dict["head.weight"], policy.head.weight)
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_the_node_cache_evicts_the_least_recently_used_entry(tmp_path):
    storage = Storage(_memory_remote())
    for name in "abc":
        storage.write_bytes(name, name.encode() * 1000)
    cache = NodeCache(str(tmp_path / "cache"), max_bytes=2500)
    a, b = cache.fetch(storage, "a"), cache.fetch(storage, "b")
    now = time.time()
    os.utime(a, (now - 100, now - 100))  # a fetched long ago, b since
    os.utime(b, (now - 50, now - 50))
    assert cache.fetch(storage, "a") == a and cache.fills == 2  # a hit makes a the most recent
    cache.fetch(storage, "c")
    assert os.path.exists(a) and not os.path.exists(b)


def test_remote_retention_keeps_this_jobs_last_save(tmp_path, policy):
    """A job restarted from an earlier epoch in an old run: its own save is its newest, on both sides."""
    from archs import MLPArch

    remote = _memory_remote()
    for run, epochs in (("first", (5, 6)), ("restarted", (1,))):
        cfg = ckptio.CheckpointConfig(keep_last=1, remote_uri=remote, run_name="run")
        with ckptio.Checkpointer(str(tmp_path / run), MLPArch(), cfg) as ck:
            for epoch in epochs:
                ck.save(policy, epoch, force=True)
    assert _epochs(remote) == [1, 6]
    assert _epochs(str(tmp_path / "restarted")) == [1]


def test_a_remote_resave_leaves_only_the_new_files(tmp_path, policy):
    """A re-save with sidecars, then one with other sidecars, then one with none: the store keeps the last's only."""
    from archs import MLPArch

    remote = _memory_remote()
    cfg = ckptio.CheckpointConfig(remote_uri=remote)
    storage = Storage(remote + "/checkpoints")
    with ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg) as ck:
        for save, metrics, trainer in ((1, {"save": 1}, {"step": 1}), (2, {"save": 2}, {"step": 2}), (3, None, None)):
            ck.save(policy, 1, metrics, trainer, force=True)
            assert ck.uploader.wait(timeout=60)  # each save is on the store before the next replaces it
            names = [n for n in storage.listdir() if n.startswith("run.")]
            assert len(names) == (3 if metrics else 1), (save, names)
    assert ckptio.load_from_uri(remote, verify=True).training_metrics is None


def test_local_retention_never_deletes_what_is_still_uploading(tmp_path, policy, monkeypatch):
    """keep_last=1 with uploads behind: the local files of every checkpoint in flight stay until uploaded."""
    from archs import MLPArch

    remote = _memory_remote()
    gate, started = gate_uploads(monkeypatch)
    cfg = ckptio.CheckpointConfig(keep_last=1, remote_uri=remote, upload_workers=1, upload_max_pending=4,
                                  upload_coalesce=False)  # fmt: skip
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    ck.save(policy, 1, {"e": 1}, force=True)
    assert started.wait(timeout=60)  # epoch 1 is under upload, 2 and 3 wait
    ck.save(policy, 2, {"e": 2}, force=True)
    ck.save(policy, 3, {"e": 3}, force=True)
    assert _epochs(str(tmp_path / "run")) == [1, 2, 3]
    assert all(ckptio.load_from_uri(i.uri, verify=True) for i in ck.manager.list_checkpoints())
    gate.set()
    ck.close()
    assert _epochs(remote) == [3] and _epochs(str(tmp_path / "run")) == [3]


def test_an_upload_that_fails_every_attempt_fails_close(tmp_path, policy, monkeypatch):
    """Each file is tried upload_retries + 1 times; then the checkpoint's upload fails, loudly, at close."""
    from archs import MLPArch

    remote = _memory_remote()
    attempts = []

    def refuse(self, local_path, name, **kw):
        attempts.append(name)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Storage, "put_file", refuse)
    cfg = ckptio.CheckpointConfig(remote_uri=remote, upload_retries=1, upload_backoff_s=0.0)
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    ck.save(policy, 1, {"e": 1}, force=True)
    with pytest.raises(ckptio.UploadError, match="after 2 attempts"):
        ck.close()
    assert attempts == [attempts[0]] * 2  # the weights (last) are never tried after their sidecar failed
    assert _epochs(remote) == [] and _epochs(str(tmp_path / "run")) == [1]


def test_coalescing_skips_the_oldest_waiting_checkpoint(tmp_path, policy, monkeypatch):
    """Uploads behind, queue full: the oldest waiting checkpoint is skipped, never the newest."""
    from archs import MLPArch

    remote = _memory_remote()
    gate, started = gate_uploads(monkeypatch)
    uploaded = []
    cfg = ckptio.CheckpointConfig(remote_uri=remote, upload_workers=1, upload_max_pending=2,
                                  on_uploaded=uploaded.append)  # fmt: skip
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    ck.save(policy, 1, force=True)
    assert started.wait(timeout=60)  # 1 uploads; 2 and 3 wait; 4 and 5 each push out the oldest waiting
    for epoch in range(2, 6):
        ck.save(policy, epoch, force=True)
    gate.set()
    ck.close()
    assert _epochs(remote) == [1, 4, 5]
    assert [u.rsplit(".e", 1)[1][:8] for u in uploaded] == ["00000001", "00000004", "00000005"]


def test_a_store_that_lost_its_objects_gets_the_manifest_again_and_says_why_uploads_fail(s3, tmp_path, policy, caplog):
    """The bucket deleted under a running job: the retries say the bucket is gone (not "no such file"); recreated
    empty, the next upload puts the run's manifest back, says so, and the store serves the run again."""
    import s3fs

    bucket = s3.make_bucket()
    remote = f"s3://{bucket}/run"
    fs = s3fs.S3FileSystem(**s3.options())
    ck = _ckpt(tmp_path, remote, s3.options(), upload_retries=50, upload_backoff_s=0.05, close_timeout_s=30)
    ck.save(policy, 1, {"e": 1})
    assert ck.uploader.wait(timeout=60)
    manifest = fs.cat_file(f"{bucket}/run/checkpoints/model_architecture.json")
    fs.rm(bucket, recursive=True)  # emptied and deleted
    gone = EventOnLog(f"bucket '{bucket}' does not exist")
    logging.getLogger("ckptio").addHandler(gone)
    caplog.set_level("WARNING", logger="ckptio")
    try:
        ck.save(policy, 2, {"e": 2})
        assert gone.event.wait(timeout=30)  # a retry that names the cause
    finally:
        logging.getLogger("ckptio").removeHandler(gone)
    fs.mkdir(bucket)  # recreated, empty
    ck.close()
    again = json.loads(fs.cat_file(f"{bucket}/run/checkpoints/model_architecture.json"))
    assert {k: again[k] for k in ("class_path", "config")} == {
        k: json.loads(manifest)[k] for k in ("class_path", "config")
    }
    assert "the run's manifest was gone from the store" in caplog.text
    art = ckptio.load_from_uri(remote, storage_options=s3.options(), verify=True)
    assert art.epoch == 2 and art.training_metrics == {"e": 2}
    assert [i.epoch for i in ckptio.list_checkpoints(remote, s3.options())] == [2]


def test_listing_a_bucket_that_does_not_exist_says_so(s3):
    from ckptio.cli import main

    missing = f"s3://nosuch{uuid.uuid4().hex[:8]}/run"
    with pytest.raises(ckptio.StorageError, match="does not exist"):
        ckptio.list_checkpoints(missing, s3.options())
    assert main(["--storage-options", json.dumps(s3.options()), "ls", missing]) != 0
