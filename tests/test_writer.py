"""One writer per run: a second job is refused naming the first, a killed one frees the run, nothing replaces an
epoch another job saved, an unwritable run directory or a model folder fails before training starts."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import REPO_ROOT, kill_tree, run_torchrun, subprocess_env, torchrun_cmd

import ckptio
from ckptio.lease import Holder, WriterLease, lease_names

pytestmark = pytest.mark.slow
SMALL = ["--steps-per-epoch", "2", "--batch-size", "16", "--hidden", "16"]


@pytest.fixture
def arch():
    from archs import MLPArch

    return MLPArch()


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if needle in line:
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"{needle!r} never printed")


@contextlib.contextmanager
def paused_job(run: str, *args: str):
    """A real 2-rank training job on ``run``, paused after its first epoch's checkpoint; killed (SIGKILL) after."""
    proc = subprocess.Popen(
        torchrun_cmd("launch.train", "--run-dir", run, "--epochs", "3", "--pause-after-epoch", "1", *SMALL, *args),
        cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_line(proc, "PAUSED", timeout=120)
        yield proc
    finally:
        kill_tree(proc.pid)  # SIGKILL: the agent and its workers
        proc.wait(timeout=30)


def _rank0_pid(agent: int) -> int:
    for child in psutil.Process(agent).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("RANK") == "0":
                return child.pid
    raise AssertionError("no rank 0 under the agent")


def test_a_second_job_on_a_run_is_refused_naming_the_first_and_a_killed_one_frees_it(tmp_path):
    run = str(tmp_path / "run")
    with paused_job(run) as first:
        holder = _rank0_pid(first.pid)
        second = run_torchrun("launch.train", "--run-dir", run, "--epochs", "3", *SMALL, check=False, timeout=120)
        assert second.returncode != 0
        assert "WriterConflictError" in second.stderr, second.stderr[-2000:]
        assert f"host {socket.gethostname()}, pid {holder}" in second.stderr
        assert "epoch 1:" not in second.stdout  # refused before it trained
        saved = ckptio.load_from_uri(run, allow=["launch"])
    # the first job was SIGKILLed holding the lease: the next start takes the run over, no clean-up by hand
    third = run_torchrun("launch.train", "--run-dir", run, "--epochs", "3", *SMALL, timeout=120)
    assert "resumed from" in third.stdout and "e00000001" in third.stdout
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [1, 2, 3]
    mgr = ckptio.CheckpointManager(run)
    first_epoch = mgr.load_from_uri(mgr.storage.url("run.e00000001.safetensors"), allow=["launch"])
    for k, v in saved.state_dict.items():  # the first job's epoch 1 is the first job's, untouched
        assert torch.equal(first_epoch.state_dict[k], v)


def test_runs_sharing_a_directory_each_have_a_writer(tmp_path, policy, arch):
    a = ckptio.Checkpointer(str(tmp_path / "run"), arch, ckptio.CheckpointConfig(run_name="a"))
    b = ckptio.Checkpointer(str(tmp_path / "run"), arch, ckptio.CheckpointConfig(run_name="b"))
    a.save(policy, 1)
    b.save(policy, 1)
    a.close()
    b.close()
    assert sorted(i.run for i in ckptio.list_checkpoints(str(tmp_path / "run"))) == ["a", "b"]


HOLD = """
import sys, ckptio
sys.path.insert(0, {tests!r})
from archs import MLPArch
cfg = ckptio.CheckpointConfig(writer_lease_s={ttl}, storage_options={opts!r})
ck = ckptio.Checkpointer({run!r}, MLPArch(), cfg)
ck.register()
print("HOLDING", flush=True)
sys.stdin.read()
ck.close()
"""


def test_a_lease_on_a_store_is_refused_while_renewed_and_taken_once_its_holder_is_killed(s3, arch, caplog):
    """A live holder (another process) keeps renewing: a newcomer is refused. Killed, its lease is free at once on
    its own host; another host's lease is taken once it went unrenewed for its ttl."""
    opts = s3.options()
    run = f"s3://{s3.make_bucket()}/run"
    code = HOLD.format(tests=os.path.join(REPO_ROOT, "tests"), ttl=6.0, opts=opts, run=run)
    holder = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for_line(holder, "HOLDING", timeout=60)
        cfg = ckptio.CheckpointConfig(writer_lease_s=6.0, storage_options=opts)
        with pytest.raises(ckptio.WriterConflictError, match=f"pid {holder.pid}") as refused:
            ckptio.Checkpointer(run, arch, cfg).register()
        assert "renewed its lease" in str(refused.value)  # seen renewing, not waited out
    finally:
        holder.kill()  # SIGKILL: no release, the record stays on the store
        holder.wait(timeout=30)
    storage = ckptio.CheckpointManager(run, storage_options=opts).storage
    name = lease_names("run")[0]
    record = Holder.parse(storage.read_bytes(name))
    assert record is not None and record.pid == holder.pid
    # the same host and a dead pid: free at once
    caplog.set_level("WARNING", logger="ckptio")
    ck = ckptio.Checkpointer(run, arch, cfg)
    ck.register()
    assert Holder.parse(storage.read_bytes(name)).pid == os.getpid()
    assert "its process on this host is gone" in caplog.text
    ck.close()
    assert not storage.exists(name)  # given up at close
    # another host's record, not renewed: taken once its ttl passed without a renewal
    other = Holder("t" * 32, "node-7", 4242, time.time(), time.time(), 1.0, None, None)
    storage.write_bytes(name, other.payload())
    ck = ckptio.Checkpointer(run, arch, cfg)
    ck.register()
    assert "taking over the writer lease of host node-7, pid 4242" in caplog.text and "not renewed for" in caplog.text
    ck.close()


def test_an_earlier_start_of_the_same_torchrun_job_takes_its_lease_at_once(tmp_path, arch, caplog):
    """torchrun's agent ends its workers before it starts them again: their lease, on another host or not, is free."""
    run = f"memory://lease-{os.getpid()}-{time.monotonic_ns()}/run"
    storage = ckptio.CheckpointManager(run).storage
    name = lease_names("run")[0]
    job = Holder("t" * 32, "node-7", 4242, time.time(), time.time(), 60.0, "job-1", "0")
    storage.write_bytes(name, job.payload())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHELASTIC_RUN_ID", "job-1")
        mp.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        ck = ckptio.Checkpointer(str(tmp_path / "local"), arch, ckptio.CheckpointConfig(remote_uri=run))
        caplog.set_level("WARNING", logger="ckptio")
        ck.register()
    assert "an earlier start of this torchrun job" in caplog.text  # taken, not waited out
    assert Holder.parse(storage.read_bytes(name)).pid == os.getpid()
    ck.close()


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def test_a_job_whose_lease_was_taken_over_stops_saving_and_a_vanished_lease_is_taken_again(tmp_path, policy, arch):
    run = f"memory://lease-{os.getpid()}-{time.monotonic_ns()}/run"
    ck = ckptio.Checkpointer(run, arch, ckptio.CheckpointConfig(writer_lease_s=0.3))
    ck.save(policy, 1)
    storage, name = ck.manager.storage, lease_names("run")[0]
    storage.delete(name)  # the store lost its objects: the heartbeat writes the lease again
    _until(lambda: storage.exists(name))
    other = Holder("t" * 32, "node-7", 4242, time.time(), time.time(), 0.3, None, None)
    lease = next(iter(ck._leases))

    def taken_over() -> bool:  # written again until seen: a renewal under way when it lands would overwrite it
        storage.write_bytes(name, other.payload())
        return lease.lost is not None

    _until(taken_over)
    with pytest.raises(
        ckptio.WriterConflictError, match=r"node-7, pid 4242, writing since .*, took this run's writer lease over"
    ):
        ck.save(policy, 2)
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [1]
    ck.close()
    assert Holder.parse(storage.read_bytes(name)).host == "node-7"  # not ours to give up


def test_an_epoch_saved_before_this_job_is_never_replaced(tmp_path, policy, arch, env_meta):
    run = str(tmp_path / "run")
    first = ckptio.Checkpointer(run, arch)
    first.save(policy, 1, {"job": 1})
    first.save(policy, 2, {"job": 1})
    first.close()
    before = {
        n: os.path.getmtime(os.path.join(run, "checkpoints", n)) for n in os.listdir(os.path.join(run, "checkpoints"))
    }
    second = ckptio.Checkpointer(run, arch)  # did not resume: starts again at epoch 1
    shifted = {k: v + 1 for k, v in policy.state_dict().items()}
    for sync in (True, False):
        with pytest.raises(ckptio.WriterConflictError, match="epoch 1 of run 'run' was saved before this job"):
            second.save(shifted, 1, {"job": 2}, async_=not sync)
    assert ckptio.load_from_uri(run).training_metrics == {"job": 1}
    resumed = ckptio.Checkpointer(run, arch)
    resumed.load_or_create_policy(env_meta)
    with pytest.raises(ckptio.WriterConflictError):
        resumed.save(shifted, 2, force=True)  # nor the epoch it resumed from
    resumed.save(shifted, 3)
    resumed.save(shifted, 3, {"again": 1}, force=True)  # its own: a re-save replaces it
    second.close()
    resumed.close()
    for n, t in before.items():
        if not n.startswith(".ckptio-writer"):
            assert os.path.getmtime(os.path.join(run, "checkpoints", n)) == t, n
    assert ckptio.load_from_uri(run).training_metrics == {"again": 1}


def test_an_epoch_only_the_store_holds_is_never_replaced_either(tmp_path, policy, arch):
    remote = f"memory://resave-{os.getpid()}-{time.monotonic_ns()}/run"
    first = ckptio.Checkpointer(str(tmp_path / "a"), arch, ckptio.CheckpointConfig(remote_uri=remote))
    first.save(policy, 1, {"job": 1})
    first.close()
    second = ckptio.Checkpointer(str(tmp_path / "b"), arch, ckptio.CheckpointConfig(remote_uri=remote))
    with pytest.raises(ckptio.WriterConflictError, match="epoch 1"):
        second.save(policy, 1, {"job": 2})
    second.close()
    assert ckptio.load_from_uri(remote).training_metrics == {"job": 1}


@contextlib.contextmanager
def read_only(path: str):
    """``path`` unwritable: no entry can be created, renamed or removed in it (root ignores mode bits: chattr +i)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not permitted here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
    else:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)


def test_a_read_only_run_directory_fails_on_every_rank_before_the_first_epoch(tmp_path):
    run = str(tmp_path / "run")
    run_torchrun("launch.train", "--run-dir", run, "--epochs", "1", *SMALL)
    with read_only(os.path.join(run, "checkpoints")):
        out = run_torchrun("launch.train", "--run-dir", run, "--epochs", "3", *SMALL, check=False)
    assert out.returncode != 0
    assert "epoch 2:" not in out.stdout  # nothing trained
    assert out.stderr.count("StorageError") >= 2 and "cannot write this run directory" in out.stderr


def test_a_read_only_directory_is_refused_at_the_start_in_process(tmp_path, policy, arch, env_meta):
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "checkpoints"))
    with read_only(os.path.join(run, "checkpoints")):
        ck = ckptio.Checkpointer(run, arch)
        with pytest.raises(ckptio.StorageError, match="cannot write this run directory"):
            ck.load_or_create_policy(env_meta)
        ck.close()


def test_a_model_folder_is_not_a_run_and_nothing_is_written_into_it(tmp_path, policy, arch, env_meta):
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = sorted(os.listdir(folder))
    ck = ckptio.Checkpointer(str(folder), arch)
    with pytest.raises(ckptio.CheckpointFormatError, match=r"model\.safetensors but no checkpoints/ folder"):
        ck.load_into(policy)
    with pytest.raises(ckptio.CheckpointFormatError, match="not a ckptio run directory"):
        ck.save(policy, 1)
    ck.close()
    assert sorted(os.listdir(folder)) == before


def test_the_lease_is_one_per_process_and_released_by_its_last_user(tmp_path):
    from ckptio.storage import Storage

    storage = Storage(str(tmp_path / "c"))
    a = WriterLease.take(storage, "run", 60.0)
    b = WriterLease.take(storage, "run", 60.0)
    assert a is b
    a.release()
    code = (
        "import sys; from ckptio.lease import WriterLease; from ckptio.storage import Storage\n"
        f"WriterLease.take(Storage({str(tmp_path / 'c')!r}), 'run', 60.0)"
    )
    held = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert held.returncode != 0 and "WriterConflictError" in held.stderr
    b.release()
    free = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert free.returncode == 0, free.stderr


def test_taking_one_lease_never_holds_up_another(tmp_path):
    """A lease being watched on a store (up to its ttl) does not stop this process taking another run's lease."""
    import logging
    import threading

    from remote_fixtures import EventOnLog

    from ckptio.storage import Storage

    store = Storage(f"memory://lease-{os.getpid()}-{time.monotonic_ns()}/run/checkpoints")
    store.write_bytes(lease_names("run")[0], Holder("t" * 32, "node-7", 4242, time.time(), time.time(), 5.0, None,
                                                    None).payload())  # fmt: skip
    waiting = EventOnLog("waiting up to")
    logging.getLogger("ckptio").addHandler(waiting)
    taken: list[WriterLease] = []
    watcher = threading.Thread(target=lambda: taken.append(WriterLease.take(store, "run", 5.0)))
    try:
        watcher.start()
        assert waiting.event.wait(timeout=30)  # it watches node-7's lease
        local = WriterLease.take(Storage(str(tmp_path / "checkpoints")), "run", 60.0)
        assert watcher.is_alive()  # taken while the other still watches
        local.release()
    finally:
        watcher.join(timeout=60)
        logging.getLogger("ckptio").removeHandler(waiting)
    assert taken and Holder.parse(store.read_bytes(lease_names("run")[0])).pid == os.getpid()
    taken[0].release()
