"""Multi-rank behaviour under real torchrun (gloo, 2 processes on CPU)."""

import json
import os
import queue
import subprocess
import threading
import time

import pytest
import torch
from conftest import REPO_ROOT, kill_tree, run_torchrun, subprocess_env, torchrun_cmd

import ckptio
from ckptio.formats import read_safetensors
from ckptio.trainer_state import unflatten

pytestmark = pytest.mark.slow

SMALL = ["--steps-per-epoch", "8", "--batch-size", "32", "--hidden", "16", "--keep-last", "10"]


def _dump(d, rank):
    with open(os.path.join(d, f"rank{rank}.safetensors"), "rb") as f:
        return read_safetensors(f, "dump", mmap_file=False)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _wait_for_line(proc, needle, timeout):
    """Read the job's stdout until a line containing needle, bounded by a deadline (no sleeps)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    seen = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"{needle!r} not printed in {timeout}s; got:\n{''.join(seen)}")


def test_only_master_writes_and_job_still_trains_saves_resumes(tmp_path):
    run = str(tmp_path / "guarded")
    first = run_torchrun("guarded_train", "--run-dir", run, "--epochs", "2", *SMALL)
    assert "checkpoint" in first.stdout
    second = run_torchrun("guarded_train", "--run-dir", run, "--epochs", "3", *SMALL)
    assert "continuing at epoch 3" in second.stdout
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [1, 2, 3]
    # the guard is live: a rank-1 write attempt does fail the job
    bad = run_torchrun(
        "guarded_train", "--run-dir", run, "--epochs", "3", "--dump-state", run + "/dump", *SMALL, check=False
    )
    assert bad.returncode != 0 and "rank 1 attempted" in bad.stdout + bad.stderr


def test_sigkill_resume_restores_weights_optimizer_epoch_and_rng(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    run_torchrun(
        "launch.train", "--run-dir", straight, "--epochs", "4", "--dump-state", str(tmp_path / "d_straight"), *SMALL
    )

    proc = subprocess.Popen(
        torchrun_cmd("launch.train", "--run-dir", killed, "--epochs", "4", "--pause-after-epoch", "2", *SMALL),
        cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_line(proc, "PAUSED", timeout=120)
    finally:
        kill_tree(proc.pid)  # the agent and its workers, which torchrun starts in sessions of their own
        proc.wait(timeout=30)
    assert [i.epoch for i in ckptio.list_checkpoints(killed)] == [1, 2]

    # resume without training: what each rank holds right after loading
    out = run_torchrun(
        "launch.train", "--run-dir", killed, "--epochs", "2", "--dump-state", str(tmp_path / "d0"), *SMALL
    )
    assert "resumed from" in out.stdout and "e00000002" in out.stdout
    (r0, m0), (r1, _) = _dump(tmp_path / "d0", 0), _dump(tmp_path / "d0", 1)
    _assert_same(r0, r1)
    assert m0["start_epoch"] == "3"
    saved = ckptio.load_from_uri(killed, allow=["launch"])
    for k, v in saved.state_dict.items():
        assert torch.equal(r0[f"model.{k}"], v)
    mgr = ckptio.CheckpointManager(killed)
    trainer = unflatten(*mgr.read_trainer_state(mgr.latest()))
    assert trainer["epoch"] == 2 and int(m0["global_step"]) == trainer["user"]["global_step"] == 16
    for pid, state in trainer["user"]["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(r0[f"optim.{pid}.{k}"], v)

    # and training on continues exactly as if never killed (weights, optimizer, per-rank RNG)
    run_torchrun(
        "launch.train", "--run-dir", killed, "--epochs", "4", "--dump-state", str(tmp_path / "d_resumed"), *SMALL
    )
    for rank in (0, 1):
        _assert_same(_dump(tmp_path / "d_resumed", rank)[0], _dump(tmp_path / "d_straight", rank)[0])


def test_manifest_written_once_and_other_architecture_refused(tmp_path):
    run = str(tmp_path / "run")
    run_torchrun("launch.train", "--run-dir", run, "--epochs", "1", *SMALL)
    manifest = tmp_path / "run" / "checkpoints" / "model_architecture.json"
    before = manifest.read_bytes()
    assert b'"class_path": "launch.tasks.PolicyConfig"' in before and b"ckptio_version" in before
    bad = run_torchrun("launch.train", "--run-dir", run, "--epochs", "2", *SMALL[:-4], "--hidden", "32", check=False)
    assert bad.returncode != 0
    assert "refusing to resume into a different model" in bad.stderr
    assert manifest.read_bytes() == before
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [1]


def test_teacher_from_a_file_uri(tmp_path):
    """The main job kickstarts from a teacher checkpoint named by URI (mock:// is tested in test_artifact)."""
    from launch.tasks import BanditTask, PolicyConfig

    arch = PolicyConfig(hidden=16)
    uri = "file://" + ckptio.save_policy_artifact(
        str(tmp_path / "teacher"), arch.make_policy(BanditTask().metadata), arch
    )
    out = run_torchrun("launch.train", "--run-dir", str(tmp_path / "s"), "--epochs", "1", "--teacher-uri", uri, *SMALL)
    assert f"kickstarting from teacher {uri} (Sequential)" in out.stdout
    assert ckptio.latest(str(tmp_path / "s")).epoch == 1


@pytest.mark.parametrize("attempt", range(2))
def test_ranks_leave_together_at_close_without_a_barrier_of_their_own(tmp_path, attempt, request):
    """close() is collective: no rank destroys the group while the master still writes (2 runs, 8 with --stress)."""
    for i in range(4 if request.config.getoption("--stress") else 1):
        out = run_torchrun("leave_job", str(tmp_path / f"run{i}"), timeout=180)
        assert out.stdout.count(f"latest after close {3}") == 2, out.stdout


@pytest.mark.parametrize(
    "broken,where", [("broken-manifest", "model_architecture.json"), ("broken-listing", "checkpoints")]
)
def test_a_failure_on_the_master_during_resume_reaches_every_rank(tmp_path, broken, where):
    """The master cannot read the manifest or list the checkpoints: both ranks raise a typed error, none waits."""
    out = run_torchrun("leave_job", str(tmp_path / "run"), broken, timeout=120, check=False)
    assert out.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: StorageError" in out.stdout and where in out.stdout, out.stdout


@pytest.mark.parametrize("mode", ["download", "load", "close"])
def test_one_rank_failing_inside_a_collective_operation_stops_every_rank(tmp_path, mode, request):
    """The node cache fill, one rank's load, the master's background save surfacing at close (#23's class)."""
    args = [str(tmp_path / "run"), mode]
    if mode == "download":
        s3 = request.getfixturevalue("s3")
        from archs import MLPArch

        remote = f"s3://{s3.make_bucket()}/run"
        torch.manual_seed(0)
        policy = MLPArch().make_policy({"obs_dim": 6, "num_actions": 3})
        ckptio.CheckpointManager(remote, storage_options=s3.options()).save_agent(policy, 1)
        args += ["--remote", remote, "--options", json.dumps(s3.options())]
    start = time.monotonic()
    out = run_torchrun("fail_together_job", *args, timeout=120, check=False)
    assert time.monotonic() - start < 60, "a rank waited for a collective timeout"
    assert out.returncode != 0
    written = [tmp_path / f"rank{r}.txt" for r in (0, 1)]
    assert all(f.exists() for f in written), out.stdout + out.stderr[-3000:]
    lines = {f"rank {r}": f.read_text() for r, f in enumerate(written)}
    failing = "rank 1" if mode == "load" else "rank 0"
    other = "rank 0" if mode == "load" else "rank 1"
    assert "Input/output error" in lines[failing], lines
    expected = {"download": "StorageError", "load": "CheckpointError", "close": "CheckpointSaveOSError"}[mode]
    assert f"{other}: {expected}:" in lines[other] and "Input/output error" in lines[other], lines


def test_the_main_job_leaves_cleanly_every_time(tmp_path, request):
    """DDP job, collectives of ckptio's last: no rank hangs or aborts at exit (gloo releasing ckptio's tensors).

    Before ranks.Handoff about 1 run in 8 hung at exit here; 2 runs by default, 40 with --stress (make stress).
    """
    runs = 40 if request.config.getoption("--stress") else 2
    for i in range(runs):
        out = run_torchrun(
            "launch.train", "--run-dir", str(tmp_path / f"r{i}"), "--epochs", "2", *SMALL, timeout=90, check=False
        )
        assert out.returncode == 0 and "terminate called" not in out.stderr, f"run {i}:\n{out.stderr[-3000:]}"
