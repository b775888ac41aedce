"""Operator mistakes and deployments as users make them: a misspelt metric, a renamed or moved run, a misspelt
bucket, an outage across the end of a job, SIGTERM. Each test here failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

import ckptio


@pytest.fixture
def arch():
    from archs import MLPArch

    return MLPArch()


def _epochs(run, **kw) -> list[int]:
    return [i.epoch for i in ckptio.CheckpointManager(str(run), **kw).list_checkpoints()]


# ---- retention ---------------------------------------------------------------------------------


def test_keep_best_by_a_metric_no_checkpoint_carries_deletes_nothing_and_says_so_once(tmp_path, policy):
    run = tmp_path / "run"
    typo = ckptio.CheckpointManager(str(run), keep_last=1, keep_best=("rewrd", "max", 2))
    with pytest.warns(ckptio.CheckpointWarning, match=r"'rewrd'.*'reward'") as said:
        for epoch, reward in enumerate([0.9, 0.95, 0.1, 0.2]):
            typo.save_checkpoint(policy, epoch, {"reward": reward})
    assert len([w for w in said if "rewrd" in str(w.message)]) == 1
    assert _epochs(run) == [0, 1, 2, 3]
    # spelt right, the same rule keeps the two best and the newest
    right = ckptio.CheckpointManager(str(run), keep_last=1, keep_best=("reward", "max", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right.save_checkpoint(policy, 4, {"reward": 0.3})
    assert _epochs(run) == [0, 1, 4]


# ---- a run's identity: copies, renames, moves ---------------------------------------------------


def _trainer_file(run) -> str:
    d = os.path.join(run, "checkpoints")
    return os.path.join(d, next(n for n in os.listdir(d) if n.endswith(".trainer.safetensors")))


def test_a_run_directory_copied_under_another_name_continues_that_run(tmp_path, arch, env_meta):
    run = tmp_path / "runA"
    with ckptio.Checkpointer(str(run), arch) as ckpt:
        policy = ckpt.load_or_create_policy(env_meta)
        for epoch in (1, 2):
            ckpt.save(policy, epoch, {"loss": 1.0}, force=True)
    shutil.copytree(run, tmp_path / "runA_ws1")
    with ckptio.Checkpointer(str(tmp_path / "runA_ws1"), arch) as copy:
        copy.load_or_create_policy(env_meta)
        assert copy.resumed_from is not None and copy.resumed_from.epoch == 2 and copy.start_epoch == 3
        assert copy.save(policy, 3, force=True).endswith("runA.e00000003.safetensors")  # the run goes on
    # a directory holding several runs, none of this job's name: which one is meant is not guessed
    mixed = tmp_path / "mixed"
    shutil.copytree(run, mixed)
    ckptio.CheckpointManager(str(mixed), run_name="runB").save_checkpoint(policy, 1)
    with pytest.raises(ckptio.CheckpointError, match=r"mixed/checkpoints: .*'runA', 'runB'.*run_name"):
        ckptio.Checkpointer(str(mixed), arch).load_or_create_policy(env_meta)
    assert _epochs(mixed, run_name="runA") == [1, 2] and _epochs(mixed, run_name="runB") == [1]


def test_a_moved_run_without_its_trainer_state_is_not_resumed_fresh(tmp_path, arch, env_meta):
    run = tmp_path / "run"
    with ckptio.Checkpointer(str(run), arch) as ckpt:
        policy = ckpt.load_or_create_policy(env_meta)
        opt = torch.optim.Adam(policy.parameters())
        policy(torch.randn(2, env_meta["obs_dim"])).sum().backward()
        opt.step()
        ckpt.save(policy, 1, optimizer=opt, force=True)
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(run, moved)
    os.unlink(_trainer_file(moved))
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"trainer.*resume_without_trainer_state=True"):
        ckptio.Checkpointer(str(moved), arch).load_or_create_policy(env_meta)
    allowed = ckptio.Checkpointer(str(moved), arch, ckptio.CheckpointConfig(resume_without_trainer_state=True))
    allowed.load_or_create_policy(env_meta)
    assert allowed.resumed_from.epoch == 1 and allowed.trainer_state is None
    allowed.close()
    assert ckptio.load_from_uri(str(moved)).state_dict.keys() == policy.state_dict().keys()  # a weights-only load may


# ---- buckets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_a_misspelt_bucket_is_a_typed_error_and_never_created(request, tmp_path, arch, env_meta, policy, store):
    server = request.getfixturevalue(store)
    scheme = "s3" if store == "s3" else "gs"
    config = ckptio.CheckpointConfig(remote_uri=f"{scheme}://nosuchbucket/run", remote_storage_options=server.options())
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), arch, config)
    with pytest.raises(ckptio.StorageError, match=r"nosuchbucket/run.*bucket 'nosuchbucket' does not exist"):
        ckpt.load_or_create_policy(env_meta)
    with pytest.raises(ckptio.CheckpointError, match=r"run.e00000001.*bucket 'nosuchbucket' does not exist"):
        ckptio.CheckpointManager(f"{scheme}://nosuchbucket/run", storage_options=server.options()).save_checkpoint(
            policy, 1
        )
    fs = ckptio.storage.Storage(f"{scheme}://{server.make_bucket()}", server.options()).fs
    assert not fs.exists("nosuchbucket")


# ---- uploads: what close() says after an outage -------------------------------------------------


def _memory_remote() -> str:
    import uuid

    return f"memory://deploy-{uuid.uuid4().hex[:8]}/run"


def _failing_for(monkeypatch, marker: str) -> None:
    """Every upload of a file whose name contains ``marker`` fails (a store down for that checkpoint's upload)."""
    from ckptio.storage import Storage

    real = Storage.put_file

    def flaky(self, local_path, name, **kw):
        if marker in name:
            raise ConnectionResetError("connection reset by peer (injected outage)")
        return real(self, local_path, name, **kw)

    monkeypatch.setattr(Storage, "put_file", flaky)


def test_close_does_not_fail_for_an_upload_a_newer_one_superseded(tmp_path, arch, policy, monkeypatch, caplog):
    remote = _memory_remote()
    _failing_for(monkeypatch, ".e00000001.")
    cfg = ckptio.CheckpointConfig(remote_uri=remote, upload_retries=0)
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), arch, cfg)
    ckpt.save(policy, 1, force=True)
    ckpt.uploader.wait()  # epoch 1's upload failed for good; epoch 2's, saved after it, reaches the store
    ckpt.save(policy, 2, force=True)
    with caplog.at_level("WARNING", logger="ckptio"):
        ckpt.close()
    assert "upload of run.e00000001 failed" in caplog.text and "the newest on the store is run.e00000002" in caplog.text
    assert _epochs(remote) == [2]


def test_close_fails_for_the_newest_upload_and_says_what_the_store_holds(tmp_path, arch, policy, monkeypatch):
    remote = _memory_remote()
    _failing_for(monkeypatch, ".e00000002.")
    cfg = ckptio.CheckpointConfig(remote_uri=remote, upload_retries=0)
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), arch, cfg)
    ckpt.save(policy, 1, force=True)
    ckpt.uploader.wait()
    ckpt.save(policy, 2, force=True)
    with pytest.raises(
        ckptio.UploadError, match=r"run\.e00000002.*reset by peer.*the newest on the store is run\.e00000001"
    ):
        ckpt.close()


def test_close_says_what_it_waits_for_while_the_store_is_down(tmp_path, arch, policy, monkeypatch):
    import logging
    import threading

    from remote_fixtures import EventOnLog, gate_uploads

    monkeypatch.setattr(ckptio.upload, "WAIT_REPORT_S", 0.05)
    gate, started = gate_uploads(monkeypatch)
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), arch, ckptio.CheckpointConfig(remote_uri=_memory_remote()))
    ckpt.save(policy, 1, force=True)
    assert started.wait(timeout=60)
    said = EventOnLog("waiting for the uploads of run.e00000001; no checkpoint of this job is on the store yet")
    logging.getLogger("ckptio").addHandler(said)
    try:
        closing = threading.Thread(target=ckpt.close)
        closing.start()
        assert said.event.wait(timeout=60)
    finally:
        gate.set()
        logging.getLogger("ckptio").removeHandler(said)
    closing.join(timeout=60)
    assert not closing.is_alive()


def test_a_local_file_gone_before_its_upload_fails_close(tmp_path, arch, policy, monkeypatch):
    """Not a re-save (which supersedes an upload): the checkpoint never reached the store, and close() says so."""
    from remote_fixtures import gate_uploads

    gate, started = gate_uploads(monkeypatch)
    cfg = ckptio.CheckpointConfig(remote_uri=_memory_remote(), upload_retries=0)
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), arch, cfg)
    uri = ckpt.save(policy, 1, {"loss": 1.0}, force=True)
    assert started.wait(timeout=60)  # its metrics are under upload; the weights come last
    os.unlink(uri)
    gate.set()
    with pytest.raises(ckptio.UploadError, match=r"run\.e00000001"):
        ckpt.close()


def test_a_resume_takes_the_newest_copy_when_uploads_lag_behind(tmp_path, arch, policy, env_meta, monkeypatch):
    remote = _memory_remote()
    _failing_for(monkeypatch, ".e00000002.")  # the store holds epoch 1; the local disk 1 and 2
    cfg = ckptio.CheckpointConfig(remote_uri=remote, upload_retries=0)
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), arch, cfg)
    ckpt.save(policy, 1, force=True)
    ckpt.uploader.wait()
    ckpt.save({k: v + 1 for k, v in policy.state_dict().items()}, 2, force=True)
    with pytest.raises(ckptio.UploadError):
        ckpt.close()
    monkeypatch.undo()
    assert _epochs(remote) == [1]
    again = ckptio.Checkpointer(str(tmp_path / "run"), arch, cfg)
    resumed = again.load_or_create_policy(env_meta)
    assert again.resumed_from.epoch == 2 and again.resumed_from.uri.startswith(str(tmp_path))  # never back in time
    assert torch.equal(resumed.state_dict()["head.bias"], policy.state_dict()["head.bias"] + 1)
    again.close()
    elsewhere = ckptio.Checkpointer(str(tmp_path / "other-node"), arch, cfg)  # a disk without it: the store's copy
    elsewhere.load_or_create_policy(env_meta)
    assert elsewhere.resumed_from.epoch == 1 and elsewhere.resumed_from.uri.startswith("memory://")
    elsewhere.close()


def test_an_export_carries_the_architecture_its_run_manifest_names(tmp_path, arch, policy, env_meta):
    manager = ckptio.CheckpointManager(str(tmp_path / "run"))
    manager.ensure_manifest(arch)
    weights = manager.save_checkpoint(policy, 1).uri  # the architecture is in the manifest, not the header
    copy = ckptio.export(weights, str(tmp_path / "shared" / "policy.safetensors"))
    shutil.rmtree(tmp_path / "run")  # the copy stands alone
    module = ckptio.load_from_uri(copy, allow=["archs"]).instantiate(env_meta)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in policy.state_dict().items())


# ---- preemption: SIGTERM ------------------------------------------------------------------------


@pytest.mark.parametrize("handled", [True, False])
def test_sigterm_right_after_an_async_save_finishes_it_and_its_upload_then_ends_the_process(s3, tmp_path, handled):
    import json
    import signal
    import subprocess
    import threading

    from conftest import PYTHON, REPO_ROOT, subprocess_env

    remote = f"s3://{s3.make_bucket()}/run"
    go = tmp_path / "go"
    cmd = [PYTHON, "-m", "sigterm_job", str(tmp_path / "run"), remote, json.dumps(s3.options()), str(go)]
    proc = subprocess.Popen(
        [*cmd, *([] if handled else ["--leave-sigterm-alone"])], cwd=REPO_ROOT, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:  # until the save returned and its upload is held
            seen.append(line)
            if "UPLOADING" in line and any("SAVED" in s for s in seen):
                break
        assert any("SAVED" in s for s in seen), seen
        proc.send_signal(signal.SIGTERM)
        if handled:  # the handler is finishing: let the network through
            finishing = threading.Event()

            def watch():
                for line in proc.stderr:
                    if "SIGTERM: finishing" in line:
                        finishing.set()

            threading.Thread(target=watch, daemon=True).start()
            assert finishing.wait(timeout=60)
        else:
            proc.wait(timeout=60)
        go.touch()
        assert proc.wait(timeout=60) == -signal.SIGTERM  # ended as the signal would have
    finally:
        proc.kill()
        proc.wait()
    assert _epochs(tmp_path / "run") == [1]
    assert all(r.ok for r in ckptio.verify(str(tmp_path / "run")))
    assert _epochs(remote, storage_options=s3.options()) == ([1] if handled else [])
    if handled:
        assert all(r.ok for r in ckptio.verify(remote, storage_options=s3.options()))


# ---- what a load builds: dtypes, ties -----------------------------------------------------------


def test_instantiate_gives_the_architectures_dtype_on_both_paths(tmp_path, env_meta):
    from archs import MLPArch, NonPersistentArch

    for arch in (MLPArch(), NonPersistentArch()):  # built on meta and assigned; built for real and copied into
        torch.manual_seed(0)
        saved = arch.make_policy(env_meta).to(torch.bfloat16)
        run = tmp_path / type(arch).__name__
        uri = ckptio.CheckpointManager(str(run)).save_checkpoint(saved, 1, policy_architecture=arch).uri
        built = ckptio.load_from_uri(uri, allow=["archs"]).instantiate(env_meta)
        reference = arch.make_policy(env_meta)
        reference.load_state_dict(saved.state_dict())  # what torch's own load gives: the module's dtype
        assert {k: v.dtype for k, v in built.state_dict().items()} == {
            k: v.dtype for k, v in reference.state_dict().items()
        }, type(arch).__name__
        assert all(torch.equal(built.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_a_file_written_by_stock_save_model_instantiates_with_its_tie_restored(tmp_path, env_meta):
    from archs import MLPArch
    from safetensors.torch import load_model, save_model

    torch.manual_seed(0)
    tied = MLPArch(tied=True).make_policy(env_meta)
    path = str(tmp_path / "tied.safetensors")
    save_model(tied, path)  # the tie stored once, under a name of its choosing, without ckptio's metadata
    module = ckptio.load_from_uri(path).instantiate(env_meta, policy_architecture=MLPArch(tied=True))
    reference = MLPArch(tied=True).make_policy(env_meta)
    load_model(reference, path)
    assert module.tied_out.weight is module.body.weight
    assert all(torch.equal(module.state_dict()[k], v) for k, v in reference.state_dict().items())


@pytest.mark.slow
def test_a_tied_model_saves_one_file_sharded_or_not(tmp_path, env_meta):
    from archs import MLPArch
    from conftest import run_torchrun
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    run_torchrun("sharded_job", str(tmp_path / "run"), str(tmp_path / "out"), "--mode", "fsdp", "--epochs", "1",
                 "--tied", timeout=180)  # fmt: skip
    sharded = str(tmp_path / "run" / "checkpoints" / "run.e00000000.safetensors")
    reference = load_file(str(tmp_path / "out" / "ref.e0.safetensors"))  # torch's full state dict
    arch = MLPArch(hidden=16, tied=True)
    model = arch.make_policy({"obs_dim": 8, "num_actions": 4})
    model.load_state_dict(reference, strict=False)
    plain = ckptio.CheckpointManager(str(tmp_path / "plain")).save_checkpoint(model, 0).uri
    with safe_open(sharded, "pt") as a, safe_open(plain, "pt") as b:  # the tie stored once, alike
        assert sorted(a.keys()) == sorted(b.keys()) and "tied_out.weight" not in a.keys()
        assert json.loads(a.metadata()["ckptio.aliases"]) == json.loads(b.metadata()["ckptio.aliases"])
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    for path in (sharded, plain):  # the stock load path for tied models, and ckptio's, on both
        stock = arch.make_policy({"obs_dim": 8, "num_actions": 4})
        load_model(stock, path)
        built = ckptio.load_from_uri(path).instantiate({"obs_dim": 8, "num_actions": 4}, policy_architecture=arch)
        assert built.tied_out.weight is built.body.weight
        for k, v in stock.state_dict().items():
            assert torch.equal(built.state_dict()[k], v) and torch.equal(v, model.state_dict()[k]), (path, k)


# ---- formats and versions -----------------------------------------------------------------------

FORMAT1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "format1", "run")  # written by 0.1.0


def test_checkpoints_of_format_1_kept_in_the_tests_keep_loading_and_resuming(tmp_path, env_meta):
    from archs import MLPArch

    run = shutil.copytree(FORMAT1, tmp_path / "run")
    assert all(r.ok for r in ckptio.verify(str(run)))
    with ckptio.Checkpointer(str(run), MLPArch(hidden=4)) as ckpt:
        policy = ckpt.load_or_create_policy(env_meta)
        opt = torch.optim.Adam(policy.parameters())
        ckpt.load_optimizer(policy, opt)
        assert ckpt.resumed_from.epoch == 3 and ckpt.trainer_state == {"step": 7}
        assert all(int(s["step"]) == 1 for s in opt.state.values()) and len(opt.state) == 6
    loaded = ckptio.load_from_uri(str(run), allow=["archs"])
    assert loaded.training_metrics == {"reward": 0.5}
    assert all(torch.equal(loaded.instantiate(env_meta).state_dict()[k], v) for k, v in policy.state_dict().items())


def test_a_newer_format_is_refused_naming_the_version_and_the_upgrade(tmp_path, policy, env_meta):
    from archs import MLPArch
    from safetensors.torch import save_file

    newer = str(tmp_path / "newer.safetensors")
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, newer, {"ckptio.format": "2"})
    refused = r"format 2 by a newer ckptio; this ckptio \(0\.1\.0\) reads format 1 and older: upgrade ckptio"
    with pytest.raises(ckptio.CheckpointFormatError, match=refused):
        ckptio.load_from_uri(newer)
    assert not all(r.ok for r in ckptio.verify(newer))
    run = shutil.copytree(FORMAT1, tmp_path / "run")
    manifest = run / "checkpoints" / "model_architecture.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "ckptio_version": "9.0.0"}))  # a newer ckptio, the same format: read
    with ckptio.Checkpointer(str(run), MLPArch(hidden=4)) as ckpt:
        ckpt.load_or_create_policy(env_meta)
        assert ckpt.resumed_from.epoch == 3
    manifest.write_text(json.dumps({**doc, "ckptio_version": "9.0.0", "ckptio_format": "2"}))
    with pytest.raises(ckptio.CheckpointFormatError, match="model_architecture.json: .*" + refused):
        ckptio.Checkpointer(str(run), MLPArch(hidden=4)).load_or_create_policy(env_meta)


def test_a_pt_training_checkpoint_with_an_optimizer_keyed_by_name_resumes_it(tmp_path, arch, env_meta):
    """Such as torch's dcp_to_torch_save gives (DCP keys the optimizer by parameter name): restored like ckptio's own."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(0)
    model = arch.make_policy(env_meta)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, env_meta["obs_dim"])).sum().backward()
    opt.step()
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    named = get_optimizer_state_dict(model, opt)
    torch.save({"model": model.state_dict(), "optimizer": named, "epoch": 3}, checkpoints / "run:v3.pt")
    fresh = arch.make_policy(env_meta)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    assert ckptio.Checkpointer(str(tmp_path / "run"), arch).load_into(fresh, fresh_opt)
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert want["state"].keys() == got["state"].keys() and len(want["state"]) == 6
    for i, state in want["state"].items():
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(got["state"][i][k])) for k, v in state.items())
    # keyed by index, as optimizer.state_dict() gives it: the error says what to call, and for which model
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 4}, checkpoints / "run:v4.pt")
    with pytest.raises(ckptio.CheckpointError, match=r"keyed by parameter index.*load_state_dict.*unsharded"):
        ckptio.Checkpointer(str(tmp_path / "run"), arch).load_into(fresh, fresh_opt)
