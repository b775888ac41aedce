"""Silent loss and stale data, found by outside testing: each test here failed before its fix.

Retention never deletes what was just written; a checkpoint is one unit (a re-save replaces every
file of it, a reader never mixes two saves); damaged or missing sidecars are reported, and verify
covers every file.
"""

import errno
import io
import json
import os

import pytest
import torch

import ckptio
from ckptio import layout
from ckptio.cli import main
from ckptio.storage import TMP_MARK


@pytest.fixture
def arch():
    from archs import MLPArch

    return MLPArch()


def _files(run):
    """The checkpoint directory's files, less the writer lease's (which a run keeps between jobs)."""
    return sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if not n.startswith(".ckptio-writer."))


def _shifted(policy, by):
    return {k: v + by for k, v in policy.state_dict().items()}


# ---- retention -----------------------------------------------------------------------------


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path, policy):
    run = str(tmp_path / "run")
    mgr = ckptio.CheckpointManager(run, keep_last=2)
    for epoch in range(1, 6):
        mgr.save_agent(policy, epoch)
    # a restart from scratch in the same run directory
    restarted = ckptio.CheckpointManager(run, keep_last=2)
    uri = restarted.save_agent(_shifted(policy, 1), 1, {"r": 1})
    assert os.path.exists(uri)
    art = ckptio.load_from_uri(uri)
    assert art.epoch == 1 and art.training_metrics == {"r": 1}
    assert torch.equal(art.state_dict["head.weight"], policy.head.weight + 1)
    assert [i.epoch for i in restarted.list_checkpoints()] == [1, 4, 5]


def test_runs_sharing_a_directory_keep_and_resume_their_own(tmp_path, policy):
    run = str(tmp_path / "shared")
    a = ckptio.CheckpointManager(run, keep_last=2, run_name="a")
    b = ckptio.CheckpointManager(run, keep_last=2, run_name="b")
    saved = {"a": [], "b": []}
    for epoch in range(1, 5):
        saved["a"].append(a.save_agent(_shifted(policy, epoch), epoch, {"run": "a"}))
        saved["b"].append(b.save_agent(_shifted(policy, -epoch), epoch + 100, {"run": "b"}))
    assert [i.epoch for i in a.list_checkpoints()] == [3, 4]
    assert [i.epoch for i in b.list_checkpoints()] == [103, 104]
    assert a.latest().uri == saved["a"][-1] and b.latest().uri == saved["b"][-1]
    assert a.load_from_uri().training_metrics == {"run": "a"}
    # the directory as a whole: every run's checkpoints, the same epoch of two runs both listed
    a.save_agent(policy, 104, {"run": "a"})
    listed = [(i.run, i.epoch) for i in ckptio.list_checkpoints(run)]
    assert ("a", 104) in listed and ("b", 104) in listed


def test_retention_and_latest_order_by_epoch_past_eight_digits(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"), keep_last=2)
    for epoch in (99_999_999, 100_000_000, 5, 123_456_789_012):
        mgr.save_agent(policy, epoch)
    assert [i.epoch for i in mgr.list_checkpoints()] == [100_000_000, 123_456_789_012]
    assert ckptio.latest(str(tmp_path / "r")).epoch == 123_456_789_012


# ---- a checkpoint is one unit ------------------------------------------------------------


def test_resave_replaces_every_file_of_the_checkpoint(tmp_path, policy, arch, env_meta):
    run = str(tmp_path / "run")
    ck = ckptio.Checkpointer(run, arch)
    ck.load_or_create_policy(env_meta)
    ck.save(policy, 1, {"r": 1}, trainer_state={"step": 111})
    ck.save(_shifted(policy, 1), 1, None, force=True)
    ck.close()
    again = ckptio.Checkpointer(run, arch)
    again.load_or_create_policy(env_meta)
    assert again.trainer_state is None  # not the first save's {"step": 111}
    art = ckptio.load_from_uri(run)
    assert art.training_metrics is None
    assert torch.equal(art.state_dict["head.weight"], policy.head.weight + 1)
    assert [n for n in _files(run) if n != "model_architecture.json"] == ["run.e00000001.safetensors"]


def test_resave_through_the_manager_and_the_file_api(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"))
    mgr.save_agent(policy, 1, {"r": 1}, trainer_state=({"x": torch.ones(2)}, {}))
    mgr.save_agent(policy, 1)
    assert ckptio.load_from_uri(str(tmp_path / "run")).training_metrics is None
    assert mgr.read_trainer_state(mgr.latest()) is None
    assert _files(str(tmp_path / "run")) == ["run.e00000001.safetensors"]
    ckptio.save_policy_artifact(str(tmp_path / "f" / "p"), policy, None, {"r": 1})
    ckptio.save_policy_artifact(str(tmp_path / "f" / "p"), policy, None)
    assert ckptio.load_policy_artifact(str(tmp_path / "f" / "p")).training_metrics is None
    assert os.listdir(tmp_path / "f") == ["p.safetensors"]


def test_a_failed_resave_leaves_the_previous_save_whole(tmp_path, policy, monkeypatch):
    run = str(tmp_path / "run")
    mgr = ckptio.CheckpointManager(run)
    mgr.save_agent(policy, 1, {"r": 1}, trainer_state=({"x": torch.ones(2)}, {}))
    real = ckptio.storage.Storage.write

    def fail_weights(self, name, writer, **kw):
        if name.endswith(".e00000001.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, writer, **kw)

    monkeypatch.setattr(ckptio.storage.Storage, "write", fail_weights)
    with pytest.raises(ckptio.CheckpointError):  # the new sidecars were written, the weights not
        mgr.save_agent(_shifted(policy, 1), 1, {"r": 2}, trainer_state=({"x": torch.zeros(2)}, {}))
    monkeypatch.undo()
    art = ckptio.load_from_uri(run, verify=True)
    assert art.training_metrics == {"r": 1}
    assert torch.equal(art.state_dict["head.weight"], policy.head.weight)
    assert torch.equal(mgr.read_trainer_state(mgr.latest())[0]["x"], torch.ones(2))
    # the orphaned sidecars of the failed save go with the next successful save of that epoch
    mgr.save_agent(policy, 1, {"r": 3})
    assert len(_files(run)) == 2 and ckptio.load_from_uri(run).training_metrics == {"r": 3}


def test_a_reader_never_gets_weights_without_their_metrics(tmp_path, policy, monkeypatch):
    """Retention deleting the checkpoint between reading its weights and its metrics: retry, never mix."""
    run = str(tmp_path / "run")
    mgr = ckptio.CheckpointManager(run, keep_last=1)
    mgr.save_agent(policy, 1, {"epoch": 1})
    real = layout.read_weights
    pruned = []

    def read_then_prune(storage, name, **kw):
        out = real(storage, name, **kw)
        if not pruned:  # the writer saves epoch 2 and prunes epoch 1 right after this read
            pruned.append(name)
            mgr.save_agent(_shifted(policy, 2), 2, {"epoch": 2})
        return out

    monkeypatch.setattr(layout, "read_weights", read_then_prune)
    art = ckptio.load_from_uri(run)
    assert pruned == ["run.e00000001.safetensors"]
    assert (art.epoch, art.training_metrics) == (2, {"epoch": 2})
    with pytest.raises(ckptio.CheckpointNotFoundError, match="deleted or replaced"):
        pruned.clear()
        ckptio.load_from_uri(mgr.latest().uri)  # an explicit file: nothing to retry


# ---- damaged or missing sidecars --------------------------------------------------------


def _sidecar(run, kind):
    return os.path.join(run, "checkpoints", next(n for n in _files(run) if n.endswith(kind)))


def _flip(path, at=-3):
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0xFF
    open(path, "wb").write(data)


def _trained(tmp_path, arch, env_meta, **cfg):
    run = str(tmp_path / "run")
    with ckptio.Checkpointer(run, arch, ckptio.CheckpointConfig(**cfg)) as ck:
        policy = ck.load_or_create_policy(env_meta)
        opt = torch.optim.Adam(policy.parameters())
        policy(torch.randn(2, 6)).sum().backward()
        opt.step()
        ck.save(policy, 1, {"r": 1.0}, {"optimizer": opt.state_dict()})
    return run


def test_missing_or_damaged_trainer_state_stops_resume_unless_allowed(tmp_path, arch, env_meta, caplog):
    run = _trained(tmp_path, arch, env_meta)
    trainer = _sidecar(run, ".trainer.safetensors")
    _flip(trainer)  # inside an optimizer moment: lengths still agree
    with pytest.raises(ckptio.CorruptCheckpointError, match="digest mismatch"):
        ckptio.Checkpointer(run, arch).load_or_create_policy(env_meta)
    os.remove(trainer)
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"trainer\.safetensors: missing"):
        ckptio.Checkpointer(run, arch).load_or_create_policy(env_meta)
    lenient = ckptio.Checkpointer(run, arch, ckptio.CheckpointConfig(resume_without_trainer_state=True))
    lenient.load_or_create_policy(env_meta)
    assert lenient.start_epoch == 2 and lenient.trainer_state is None
    assert "without its trainer state" in caplog.text


def test_damaged_metrics_fail_loading_them_but_not_resume(tmp_path, arch, env_meta):
    run = _trained(tmp_path, arch, env_meta)
    metrics = _sidecar(run, ".metrics.json")
    with open(metrics, "r+b") as f:  # still valid JSON, different content
        f.write(f.read().replace(b"1.0", b"9.0"))
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"metrics\.json: content digest mismatch"):
        ckptio.load_from_uri(run)
    ck = ckptio.Checkpointer(run, arch)
    ck.load_or_create_policy(env_meta)
    assert ck.start_epoch == 2 and "optimizer" in ck.trainer_state
    # ranking by a metric skips the damaged checkpoint in retention, and says so when asked directly
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.select_checkpoints(run, metric="r")
    os.remove(metrics)
    with pytest.raises(ckptio.CorruptCheckpointError, match="missing"):
        ckptio.load_from_uri(run)


def test_verify_covers_every_file_of_a_checkpoint(tmp_path, arch, env_meta, capsys):
    run = _trained(tmp_path, arch, env_meta)
    weights = ckptio.latest(run).uri
    assert main(["verify", run]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and all(line.startswith("OK ") for line in out)  # weights, metrics, trainer state
    trainer = _sidecar(run, ".trainer.safetensors")
    _flip(trainer)
    assert main(["verify", run]) == 1
    out = capsys.readouterr().out
    assert f"BAD        {trainer}: content digest mismatch" in out and f"OK         {weights}" in out
    assert out.count(trainer) == 1
    with pytest.raises(ckptio.CorruptCheckpointError, match="digest mismatch"):
        ckptio.load_from_uri(run, verify=True)
    assert not any(r.ok is False and r.uri == weights for r in ckptio.verify(run))


def test_verify_of_a_stock_safetensors_file_is_unverified_not_bad(tmp_path, capsys):
    from safetensors.torch import save_file

    path = str(tmp_path / "stock.safetensors")
    save_file({"w": torch.ones(3)}, path)
    assert main(["verify", path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"UNVERIFIED {path}: header and offsets valid; no digest to check contents"]


# ---- loaded tensors ---------------------------------------------------------------------


def test_a_loaded_tensor_pickles_only_its_own_bytes(tmp_path):
    big = {"big": torch.randn(256, 1024), "bias": torch.randn(1024)}
    uri = ckptio.save_policy_artifact(str(tmp_path / "m"), big, None)
    sd = ckptio.load_from_uri(uri).state_dict
    buf = io.BytesIO()
    torch.save({"b": sd["bias"]}, buf)
    assert len(buf.getvalue()) < 4096 + 1024 * 4  # not the 1 MiB file
    assert sd["bias"].untyped_storage().nbytes() == 1024 * 4


def test_mixed_dtype_checkpoints_convert_and_pickle(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).to(torch.bfloat16)
    uri = ckptio.save_policy_artifact(str(tmp_path / "bn"), model, None)
    sd = ckptio.load_from_uri(uri).state_dict
    buf = io.BytesIO()
    torch.save(dict(sd), buf)  # int64 num_batches_tracked beside bfloat16 weights
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    assert main(["convert", uri, str(tmp_path / "bn.pt")]) == 0
    pt = ckptio.load_from_uri(str(tmp_path / "bn.pt")).state_dict
    assert all(torch.equal(pt[k], v) for k, v in model.state_dict().items())


def test_loaded_tensors_are_still_views_of_the_mapped_file(tmp_path):
    uri = ckptio.save_policy_artifact(str(tmp_path / "m"), {"w": torch.arange(4096.0)}, None)
    t = ckptio.load_from_uri(uri).state_dict["w"]
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if uri in line]
    ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    assert any(lo <= t.data_ptr() < hi for lo, hi in ranges)  # zero copy: the tensor lives in the mapping


# ---- saving odd tensors -------------------------------------------------------------------


def test_strided_conjugate_and_negative_views_save_as_their_values(tmp_path):
    from safetensors import safe_open

    z = torch.randn(3, dtype=torch.complex64)
    tensors = {
        "one_of_a_column": torch.arange(16.0).reshape(4, 4)[:1, 0],
        "every_other": torch.arange(2.0)[::2],
        "transposed": torch.arange(6.0).reshape(2, 3).t(),
        "z": z,
        "z_conj": z.conj(),  # same memory as z, different values: not an alias
        "neg": z.conj().imag,
    }
    uri = ckptio.save_policy_artifact(str(tmp_path / "v"), tensors, None)
    with safe_open(uri, "pt") as f:
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k), t.resolve_conj().resolve_neg()), k
    assert ckptio.verify(uri)[0].status == "ok"


def test_metadata_cannot_move_the_digest_or_set_writer_keys(tmp_path):
    from safetensors import safe_open

    from ckptio.formats import write_safetensors

    path = str(tmp_path / "m.safetensors")
    sneaky = {'x"ckptio.crc32":"': 'v"ckptio.crc32":"'}
    with open(path, "wb") as f:
        write_safetensors(f, {"w": torch.ones(8)}, sneaky)
    with safe_open(path, "pt") as f:
        assert f.metadata()['x"ckptio.crc32":"'] == 'v"ckptio.crc32":"'
    assert ckptio.verify(path)[0].status == "ok"
    for key in ("ckptio.crc32", "ckptio.data_bytes"):
        with pytest.raises(ckptio.CheckpointFormatError, match="written by ckptio"):
            write_safetensors(io.BytesIO(), {"w": torch.ones(1)}, {key: "0"})


# ---- typed errors -------------------------------------------------------------------------


@pytest.mark.parametrize("blob", [b"hello world\n", os.urandom(4096), b"", b"PK\x03\x04" + bytes(64)])
def test_garbage_pt_is_corrupt(tmp_path, blob):
    (tmp_path / "g.pt").write_bytes(blob)
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"g\.pt"):
        ckptio.load_from_uri(str(tmp_path / "g.pt"))


def test_a_pickled_module_is_a_security_error_without_escape_codes(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    with pytest.raises(ckptio.CheckpointSecurityError) as e:
        ckptio.load_from_uri(str(tmp_path / "m.pt"))
    assert "torch.nn.modules.linear.Linear" in str(e.value) and "\x1b" not in str(e.value)


@pytest.mark.parametrize("epoch", [2.0, "5", True, -1, None])
def test_epochs_must_be_non_negative_ints(tmp_path, policy, arch, epoch):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        mgr.save_agent(policy, epoch)
    with pytest.raises(ckptio.CheckpointError):
        ckptio.Checkpointer(str(tmp_path / "c"), arch).save(policy, epoch)
    assert not os.path.exists(tmp_path / "r" / "checkpoints") or _files(str(tmp_path / "r")) == []


def test_selection_arguments_are_checked(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    mgr.save_agent(policy, 1, {"score": 1.0})
    for count in (-1, 0, 1.5):
        with pytest.raises(ValueError, match="count"):
            ckptio.select_checkpoints(str(tmp_path / "r"), metric="score", count=count)
    with pytest.raises(ValueError, match="'reward'"):
        ckptio.select_checkpoints(str(tmp_path / "r"), metric="reward")
    with pytest.raises(ValueError, match="keep_last"):
        ckptio.CheckpointManager(str(tmp_path / "r"), keep_last=0)


def test_a_run_directory_that_is_a_file(tmp_path, policy):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ckptio.CheckpointFormatError, match="is a file"):
        ckptio.CheckpointManager(str(tmp_path / "run"))


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"s3"'])
def test_cli_bad_storage_options_is_one_line_and_non_zero(tmp_path, raw, capsys):
    assert main(["--storage-options", raw, "ls", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ckptio: error: --storage-options") and "Traceback" not in err


def test_a_failed_save_is_one_error_type_naming_the_checkpoint(tmp_path, policy, arch, monkeypatch):
    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(ckptio.CheckpointSaveError) as sync_error:
        mgr.save_agent(policy, 3)
    ck = ckptio.Checkpointer(str(tmp_path / "a"), arch, ckptio.CheckpointConfig(async_save=True))
    ck._claimed = []  # the lease and manifest writes would fail first; this test is about the weights
    ck.save(policy, 3)
    with pytest.raises(ckptio.CheckpointSaveError) as async_error:
        ck.wait()
    monkeypatch.undo()
    for e in (sync_error.value, async_error.value):
        assert isinstance(e, OSError) and e.errno == errno.EIO  # existing OSError handlers still match
        assert ".e00000003.safetensors" in str(e) and "Input/output error" in str(e)
        assert isinstance(e.__cause__, OSError)
    assert not [n for n in os.listdir(tmp_path / "r" / "checkpoints") if TMP_MARK in n]
    ck.close()


def test_manifest_of_shared_json_metrics_key(tmp_path, policy):
    """Metrics sidecars stay plain JSON objects that other tools read."""
    mgr = ckptio.CheckpointManager(str(tmp_path / "r"))
    mgr.save_agent(policy, 1, {"score": 2.5, "nested": {"a": [1, 2]}})
    with open(_sidecar(str(tmp_path / "r"), ".metrics.json")) as f:
        assert json.load(f) == {"score": 2.5, "nested": {"a": [1, 2]}}


def test_saving_beside_other_files_deletes_only_checkpoint_files(tmp_path, policy):
    keep = ["model.config.json", "model.safetensors.bak", "model.v2.safetensors", "model.abc.metrics.json", "model.e1"]
    for name in keep:
        (tmp_path / name).write_text("a user's file")
    ckptio.save_policy_artifact(str(tmp_path / "model"), policy, None, {"r": 1})
    ckptio.save_policy_artifact(str(tmp_path / "model"), policy, None)  # replaces its own metrics sidecar only
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "model.safetensors"])
    assert main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "model.pt")]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "model.pt", "model.safetensors"])
    # in a run directory, a re-save in the other format replaces the old one (it would shadow the new)
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"), checkpoint_format="pt")
    ckptio.CheckpointManager(str(tmp_path / "run")).save_agent(policy, 1, {"r": 1})
    mgr.save_agent(_shifted(policy, 1), 1, {"r": 2})
    left = _files(str(tmp_path / "run"))
    assert len(left) == 2 and left[1] == "run.e00000001.pt" and left[0].endswith(".metrics.json")
    assert ckptio.load_from_uri(str(tmp_path / "run")).training_metrics == {"r": 2}


def test_a_resave_while_the_previous_save_uploads_supersedes_it(tmp_path, monkeypatch):
    import uuid

    from archs import MLPArch
    from remote_fixtures import gate_uploads

    remote = f"memory://resave-{uuid.uuid4().hex[:8]}/run"
    uploaded = []
    cfg = ckptio.CheckpointConfig(remote_uri=remote, upload_workers=1, upload_retries=1, upload_backoff_s=0.0,
                                  on_uploaded=uploaded.append)  # fmt: skip
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    gate, started = gate_uploads(monkeypatch)
    w = {"w": torch.ones(4)}
    ck.save(w, 1, {"save": 1}, {"step": 1})
    assert started.wait(timeout=60)  # the first save's upload is under way
    ck.save({"w": torch.full((4,), 2.0)}, 1, {"save": 2}, {"step": 2}, force=True)
    gate.set()
    ck.close()  # the first upload is superseded by the second, not a failure
    art = ckptio.load_from_uri(remote, verify=True)
    assert art.training_metrics == {"save": 2} and torch.equal(art.state_dict["w"], torch.full((4,), 2.0))
    assert uploaded == [ck.latest_uri(remote=True)]  # announced once: the superseded upload never is


def test_a_trainer_state_file_from_another_save_is_refused(tmp_path, policy):
    """Each weights header names its own save: a trainer-state file of another save in its place is damage."""
    run = str(tmp_path / "run")
    mgr = ckptio.CheckpointManager(run)
    mgr.save_agent(policy, 1, trainer_state=({"step": torch.tensor([1])}, {}))
    mine = _sidecar(run, "trainer.safetensors")
    other = ckptio.CheckpointManager(str(tmp_path / "other"))
    other.save_agent(policy, 1, trainer_state=({"step": torch.tensor([2])}, {}))
    with open(_sidecar(str(tmp_path / "other"), "trainer.safetensors"), "rb") as src, open(mine, "wb") as dst:
        dst.write(src.read())  # a whole, valid trainer-state file: only its save id tells it apart
    with pytest.raises(ckptio.CorruptCheckpointError, match="not from the save of"):
        mgr.read_trainer_state(mgr.latest())


def test_a_resave_in_the_other_format_deletes_the_old_weights_first(tmp_path, policy, monkeypatch):
    """A run re-saving an epoch as .pt removes the old .safetensors (which would shadow it) before its sidecars."""
    run = str(tmp_path / "run")
    ckptio.CheckpointManager(run).save_agent(policy, 1, {"r": 1}, trainer_state=({"x": torch.ones(2)}, {}))
    deleted = []
    real = ckptio.storage.Storage.delete

    def record(self, name, missing_ok=True):
        deleted.append(name)
        return real(self, name, missing_ok)

    monkeypatch.setattr(ckptio.storage.Storage, "delete", record)
    ckptio.CheckpointManager(run, checkpoint_format="pt").save_agent(policy, 1, {"r": 2})
    assert deleted[0] == "run.e00000001.safetensors" and len(deleted) == 3, deleted
    assert [f for f in _files(run) if not f.endswith(".metrics.json")] == ["run.e00000001.pt"]
    assert ckptio.load_from_uri(run).training_metrics == {"r": 2}


def test_a_checkpoint_kept_in_the_other_format_keeps_its_sidecars(tmp_path, policy):
    """Outside a run directory both formats of one base may live side by side (convert beside the source):
    writing one never removes a file the other names."""
    base = str(tmp_path / "f" / "p")
    ckptio.save_policy_artifact(base, policy, None, {"r": 1}, checkpoint_format="pt")
    ckptio.save_policy_artifact(base, policy, None, {"r": 2})
    assert ckptio.load_from_uri(base + ".pt").training_metrics == {"r": 1}
    assert ckptio.load_from_uri(base + ".safetensors").training_metrics == {"r": 2}
    ckptio.save_policy_artifact(base, policy, None, {"r": 3})  # a re-save replaces only its own format's files
    assert ckptio.load_from_uri(base + ".pt").training_metrics == {"r": 1}
    assert ckptio.load_from_uri(base + ".safetensors").training_metrics == {"r": 3}
    assert len(os.listdir(tmp_path / "f")) == 4


@pytest.mark.parametrize("named", ["../p.x.metrics.json", "sub/p.x.metrics.json", "a\\p.metrics.json",
                                   ".p.metrics.json", "p.e1.weights.json"])  # fmt: skip
def test_a_header_cannot_name_a_sidecar_outside_its_directory(tmp_path, named):
    """The weights header names its sidecars: only plain names of sidecar files beside it are followed."""
    (tmp_path / "sub").mkdir()
    for where in ("p.x.metrics.json", "sub/p.x.metrics.json", ".p.metrics.json", "p.e1.weights.json"):
        (tmp_path / where).write_text("{}")
    meta = {layout.SAVE_ID_KEY: "0123456789ab", layout.METRICS_FILE_KEY: named}
    with open(tmp_path / "p.safetensors", "wb") as f:
        ckptio.formats.write_safetensors(f, {"w": torch.ones(2)}, meta)
    with pytest.raises(ckptio.CorruptCheckpointError, match="not a file beside it"):
        ckptio.load_from_uri(str(tmp_path / "p.safetensors"))


# ---- what a failed save leaves ------------------------------------------------------------------


def test_failed_saves_leave_none_of_their_files(tmp_path, policy, arch, monkeypatch):
    """Four saves on a full disk: each wrote its sidecars, then its weights failed; none of it stays."""
    run = str(tmp_path / "run")
    ck = ckptio.Checkpointer(run, arch)
    ck.save(policy, 1, {"r": 1}, trainer_state={"step": 1})
    real = ckptio.storage.Storage.write

    def full(self, name, writer, **kw):
        if name in {f"run.e{e:08d}.safetensors" for e in (2, 3, 4, 5)}:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, writer, **kw)

    monkeypatch.setattr(ckptio.storage.Storage, "write", full)
    for epoch in (2, 3, 4, 5):
        with pytest.raises(ckptio.CheckpointSaveError, match="No space left"):
            ck.save(policy, epoch, {"r": epoch}, trainer_state={"step": epoch})
    monkeypatch.undo()
    assert [n for n in _files(run) if ".e0000000" in n and "e00000001" not in n] == []
    assert all(r.status == "ok" for r in ckptio.verify(run)), ckptio.verify(run)
    ck.close()


KILLED_SAVE = """
import os, signal, sys, torch, ckptio
from ckptio.storage import Storage
real = Storage.write
def write(self, name, writer, **kw):
    if name == "run.e00000002.safetensors":  # its sidecars are written: die before the weights are
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, writer, **kw)
Storage.write = write
mgr = ckptio.CheckpointManager(sys.argv[1])
mgr.save_agent({"w": torch.ones(3)}, 2, {"r": 2}, trainer_state={"step": torch.tensor([2])})
"""


def test_retention_removes_what_a_writer_killed_mid_save_left(tmp_path, policy):
    import signal
    import subprocess
    import sys

    from conftest import subprocess_env

    run = str(tmp_path / "run")
    mgr = ckptio.CheckpointManager(run, keep_last=5)
    mgr.save_agent({"w": torch.zeros(3)}, 1, {"r": 1})
    mgr.save_agent({"w": torch.zeros(3)}, 2, {"r": 1})
    for _ in range(2):  # a re-save of epoch 2 killed, then one of epoch 2 after it... twice over
        killed = subprocess.run([sys.executable, "-c", KILLED_SAVE, run], env=subprocess_env(), capture_output=True)
        assert killed.returncode == -signal.SIGKILL
    # its own metrics and each killed save's (their trainer state may be left as a temporary, or committed)
    assert len([n for n in _files(run) if ".e00000002." in n and n.endswith(".metrics.json")]) == 3
    # a save of an epoch whose weights never appeared at all
    layout.write_checkpoint(mgr.storage, "run.e00000009.safetensors", {"w": torch.ones(1)}, training_metrics={"r": 9})
    os.unlink(os.path.join(run, "checkpoints", "run.e00000009.safetensors"))
    orphans = [r for r in ckptio.verify(run) if r.status == "unverified"]
    assert len(orphans) == 1 and "never committed" in orphans[0].detail
    assert ckptio.load_from_uri(run).training_metrics == {"r": 1}  # the kills changed nothing
    # the next job's first save: its temporaries go as always, and its retention removes the sidecars
    ckptio.CheckpointManager(run, keep_last=5).save_agent({"w": torch.zeros(3)}, 3, {"r": 3})
    assert all(r.status == "ok" for r in ckptio.verify(run)), ckptio.verify(run)
    assert len(_files(run)) == 6, _files(run)  # three checkpoints, each its weights and metrics; no temporaries


def test_retention_during_a_save_leaves_that_saves_sidecars(tmp_path, policy):
    """Retention runs on upload threads while the save thread writes: a save under way is not litter."""
    run = str(tmp_path / "run")
    mgr = ckptio.CheckpointManager(run, keep_last=2)
    mgr.save_agent(policy, 1, {"r": 1})
    real = ckptio.storage.Storage.write

    def prune_first(self, name, writer, **kw):
        if name == "run.e00000002.safetensors":  # its sidecars are written, its weights not yet
            mgr.prune()
        return real(self, name, writer, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckptio.storage.Storage, "write", prune_first)
        mgr.save_agent(policy, 2, {"r": 2}, trainer_state={"step": torch.tensor([2])})
    art = ckptio.load_from_uri(run, verify=True)
    assert art.training_metrics == {"r": 2} and mgr.read_trainer_state(mgr.latest()) is not None
