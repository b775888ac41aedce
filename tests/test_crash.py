"""Crash safety: writers really SIGKILLed mid-save; full disks and failing fsync by fault injection.

`pytest tests/test_crash.py --stress` (or `make stress`) runs thousands of kills.
"""

import errno
import os
import random
import time

import pytest
import torch

import ckptio
from ckptio import formats
from ckptio.storage import TMP_MARK
from ckptio.tools import ORPHAN

pytestmark = pytest.mark.slow


def _kills(config):
    if config.getoption("--kills"):
        return config.getoption("--kills")
    return 2000 if config.getoption("--stress") else 30


def _reported(log_path):
    try:
        with open(log_path) as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("writer,keep_last", [("manager_writer", 3), ("checkpointer_writer", 2)])
def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path, forkserver, request, writer, keep_last):
    import crash_jobs

    rng = random.Random(f"{writer}-{os.getpid()}")
    run, log = str(tmp_path / "run"), str(tmp_path / "saved.log")
    ckdir = tmp_path / "run" / "checkpoints"
    kills = _kills(request.config)
    mid_write = 0
    for _ in range(kills):
        started = forkserver.Event()
        proc = forkserver.Process(target=getattr(crash_jobs, writer), args=(run, log, started, keep_last, 4))
        proc.start()
        assert started.wait(timeout=60), "writer never completed a save"
        # the kill point: a random moment during the following saves (not a synchronisation)
        time.sleep(rng.uniform(0, 0.06))
        proc.kill()
        proc.join(timeout=30)
        assert proc.exitcode == -9

        names = os.listdir(ckdir)
        mid_write += any(TMP_MARK in n for n in names)
        reported = _reported(log)
        present = [i.epoch for i in ckptio.list_checkpoints(run)]
        # retention deletes a confirmed checkpoint only once keep_last newer ones are committed
        for r in reported[-keep_last:]:
            assert r in present or sum(p > r for p in present) >= keep_last, (r, reported[-keep_last:], present)
        # every visible checkpoint is whole: digest verified, and content is the right epoch
        results = [r for r in ckptio.verify(run) if r.detail != ORPHAN]  # a killed save's sidecars: reported apart
        assert all(r.status == "ok" for r in results), results
        latest = ckptio.load_from_uri(run, verify=True, allow=["archs"])
        assert latest.epoch == present[-1] >= reported[-1]
        # every listed checkpoint has all its files, each from the same save
        mgr = ckptio.CheckpointManager(run)
        for info in mgr.list_checkpoints():
            art = ckptio.load_from_uri(info.uri, verify=True, allow=["archs"])
            assert art.training_metrics == {"epoch": info.epoch}, (info.name, art.training_metrics)
            trainer = ckptio.trainer_state.unflatten(*mgr.read_trainer_state(info))
            if writer == "manager_writer":
                assert art.state_dict["step"].item() == info.epoch
                assert trainer["epoch"] == info.epoch and trainer["moments"][0].item() == info.epoch
            else:
                assert trainer["user"]["epoch"] == info.epoch
    # the next writer cleaned what killed writers left behind
    final = forkserver.Event()
    proc = forkserver.Process(target=getattr(crash_jobs, writer), args=(run, log, final, keep_last, 4))
    proc.start()
    assert final.wait(timeout=60)
    proc.kill()
    proc.join(timeout=30)
    leftovers = [n for n in os.listdir(ckdir) if TMP_MARK in n and f"{TMP_MARK}{proc.pid}." not in n]
    assert leftovers == []
    assert kills < 10 or mid_write > 0, "no kill ever landed during a write: the harness is not testing anything"


def _fill(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"), keep_last=1)
    good = mgr.save_agent(policy, 1)
    return mgr, good


def test_full_disk_mid_write_surfaces_and_keeps_previous(tmp_path, policy, monkeypatch):
    mgr, good = _fill(tmp_path, policy)
    real = formats.write_all
    calls = {"n": 0}

    def enospc(f, view):
        calls["n"] += 1
        if calls["n"] == 3:  # after some bytes reached the file
            real(f, view[: len(view) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, view)

    monkeypatch.setattr(formats, "write_all", enospc)
    with pytest.raises(OSError) as e:
        mgr.save_agent(policy, 2)
    assert e.value.errno == errno.ENOSPC
    assert ckptio.latest(str(tmp_path / "run")).uri == good
    assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if TMP_MARK in n]
    assert [(r.uri, r.status) for r in ckptio.verify(good)] == [(good, "ok")]


def test_failing_fsync_surfaces_and_keeps_previous(tmp_path, policy, monkeypatch):
    mgr, _ = _fill(tmp_path, policy)

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OSError) as e:
        mgr.save_agent({k: v + 1 for k, v in policy.state_dict().items()}, 2, {"x": 1})
    monkeypatch.undo()
    assert e.value.errno == errno.EIO
    assert [i.epoch for i in ckptio.list_checkpoints(str(tmp_path / "run"))] == [1]
    assert torch.equal(ckptio.load_from_uri(str(tmp_path / "run")).state_dict["head.weight"], policy.head.weight)
