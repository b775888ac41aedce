"""Sharded models (FSDP2, tensor parallel, both on a 2-D mesh) under real torchrun, gloo, CPU.

The reference for every comparison is torch's own full state dict
(``get_model_state_dict``/``get_optimizer_state_dict`` with ``full_state_dict=True``), dumped by
the job itself; files are read back with stock ``safetensors``.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
import torch
from conftest import REPO_ROOT, subprocess_env, torchrun_cmd
from safetensors.torch import load_file

import ckptio
from ckptio.storage import TMP_MARK
from ckptio.trainer_state import unflatten
from launch.tasks import BanditTask

pytestmark = pytest.mark.slow


def job(nproc: int, run: str, out: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd("sharded_job", run, out, *args, nproc=nproc)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    if check and proc.returncode != 0:
        raise AssertionError(f"sharded_job {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def saved_optimizer(run: str, epoch: int) -> dict[str, torch.Tensor]:
    """The FQN-keyed optimizer state in a checkpoint's trainer file, flattened as the job flattens torch's."""
    mgr = ckptio.CheckpointManager(run)
    info = next(i for i in mgr.list_checkpoints() if i.epoch == epoch)
    osd = unflatten(*mgr.read_trainer_state(info))["optimizer"]
    return {f"{fqn}.{k}": v for fqn, st in osd["state"].items() for k, v in st.items()}


def check_checkpoint(run: str, out: str, epoch: int) -> None:
    """The checkpoint is one standard file equal to torch's full state dict; the optimizer equals torch's too."""
    weights = next(i.uri for i in ckptio.list_checkpoints(run) if i.epoch == epoch)
    assert_same(load_file(weights), load_file(os.path.join(out, f"ref.e{epoch}.safetensors")), "weights")
    assert_same(
        saved_optimizer(run, epoch), load_file(os.path.join(out, f"ref.e{epoch}_optim.safetensors")), "optimizer"
    )
    assert all(r.ok for r in ckptio.verify(weights))
    # full shapes, not shards, in what anyone's tools see
    described = ckptio.inspect_checkpoint(weights)
    reference = load_file(os.path.join(out, f"ref.e{epoch}.safetensors"))
    assert described["tensor_count"] == len(reference) == 7
    assert described["total_bytes"] == sum(t.numel() * t.element_size() for t in reference.values())


def check_resumed(out: str, ref: str) -> None:
    assert_same(load_file(os.path.join(out, "resumed.safetensors")), load_file(ref + ".safetensors"), "resumed weights")
    assert_same(
        load_file(os.path.join(out, "resumed_optim.safetensors")),
        load_file(ref + "_optim.safetensors"),
        "resumed optim",
    )


def sends(out: str) -> list[int]:
    with open(os.path.join(out, "sends_rank1.json")) as f:
        return json.load(f)


def test_fsdp2_saves_one_standard_file_and_resumes_at_other_world_sizes(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    # each tensor in a message of its own, then (the default) the small ones together: the same file either way
    job(2, run, out, "--mode", "fsdp", "--epochs", "2", "--batch-bytes", "0")  # non-master ranks may not write
    check_checkpoint(run, out, 1)
    # build on meta, shard, load into: 2 -> 4, then 4 -> 1 (each resume trains and saves one more epoch)
    job(4, run, str(tmp_path / "w4"), "--mode", "fsdp", "--epochs", "1")
    check_resumed(str(tmp_path / "w4"), os.path.join(out, "ref.e1"))
    check_checkpoint(run, str(tmp_path / "w4"), 2)
    # rank 1's block of every parameter and of each of its two Adam moments, one message each; batched, one
    # message per file (weights, trainer state)
    params = {k.rsplit(".", 1)[0] for k in load_file(os.path.join(out, "ref.e1_optim.safetensors"))}
    assert sends(out) == [3 * len(params)] * 2
    assert sends(str(tmp_path / "w4")) == [2]
    job(1, run, str(tmp_path / "w1"), "--mode", "fsdp", "--epochs", "1")
    check_resumed(str(tmp_path / "w1"), os.path.join(tmp_path, "w4", "ref.e2"))
    check_checkpoint(run, str(tmp_path / "w1"), 3)


def test_tensor_parallel_saves_full_tensors_and_loads_as_a_full_policy_then_shards(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    job(2, run, out, "--mode", "tp", "--epochs", "1", "--batch-bytes", "0")  # each block straight into place
    check_checkpoint(run, out, 0)
    # load the full module (memory-mapped), then shard it: 2 -> 1 and 1 -> 2
    job(1, run, str(tmp_path / "w1"), "--mode", "tp", "--epochs", "1", "--load", "policy")
    check_resumed(str(tmp_path / "w1"), os.path.join(out, "ref.e0"))
    job(2, run, str(tmp_path / "w2"), "--mode", "tp", "--epochs", "1", "--load", "policy")
    check_resumed(str(tmp_path / "w2"), os.path.join(tmp_path, "w1", "ref.e1"))


@pytest.mark.parametrize("mode,nproc", [("fsdp", 2), ("tp", 2), ("2d", 4)])
def test_training_on_after_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, mode, nproc):
    straight, out = str(tmp_path / "straight"), str(tmp_path / "s")
    job(nproc, straight, out, "--mode", mode, "--epochs", "4", "--async")  # saved in background
    check_checkpoint(straight, out, 1)
    # the run as if it had stopped after epoch 1 (a save never changes training: pinned on its own)
    broken = str(tmp_path / "broken" / "straight")  # the same run name: a run's name is its directory's
    shutil.copytree(straight, broken)
    stopped = ckptio.CheckpointManager(broken)
    for info in stopped.list_checkpoints()[2:]:
        stopped.delete(info)
    job(nproc, broken, str(tmp_path / "b2"), "--mode", mode, "--epochs", "2")
    check_resumed(str(tmp_path / "b2"), os.path.join(out, "ref.e1"))
    for name in ("ref.e3.safetensors", "ref.e3_optim.safetensors"):
        assert_same(load_file(os.path.join(out, name)), load_file(os.path.join(tmp_path, "b2", name)), name)
    if mode == "2d":  # FSDP x TP on a 2-D mesh, saved in background, resumes as plain FSDP at 2 ranks
        check_checkpoint(straight, out, 0)
        job(2, straight, str(tmp_path / "w2"), "--mode", "fsdp", "--epochs", "1")
        check_resumed(str(tmp_path / "w2"), os.path.join(out, "ref.e3"))


@pytest.mark.parametrize("mode", ["fsdp"])  # the gather is the same for every placement; tp adds nothing here
def test_a_rank_killed_mid_gather_leaves_the_previous_checkpoint_latest(tmp_path, mode):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    job(2, run, out, "--mode", mode, "--epochs", "1")
    # SIGKILLed in its first send of epoch 1's save: torchrun stops the job; nothing of epoch 1 is visible
    dead = job(2, run, str(tmp_path / "dead"), "--mode", mode, "--epochs", "1", "--in-gather", "die", check=False)
    assert dead.returncode != 0
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [0]
    assert all(r.ok for r in ckptio.verify(run))
    left = [n for n in os.listdir(os.path.join(run, "checkpoints")) if TMP_MARK in n]
    if left:  # torchrun stopped the master before it saw the peer die: its temporary stays, invisible, until
        job(2, run, str(tmp_path / "next"), "--mode", mode, "--epochs", "1")  # the next writer removes it
        assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n in left]


def test_a_rank_stuck_mid_gather_fails_the_save_within_the_timeout(tmp_path):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    job(2, run, out, "--mode", "fsdp", "--epochs", "1")
    # stuck: the master gives up after shard_timeout_s with a typed error instead of waiting forever
    start = time.monotonic()
    hung = job(
        2, run, str(tmp_path / "hung"), "--mode", "fsdp", "--epochs", "1", "--in-gather", "hang", "--shard-timeout", "5",
        check=False,
    )  # fmt: skip
    assert hung.returncode != 0 and time.monotonic() - start < 100
    assert "CheckpointSaveError" in hung.stderr, hung.stderr[-3000:]
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [0]
    assert all(r.ok for r in ckptio.verify(run))
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if TMP_MARK in n]  # no temporaries left


def test_main_job_runs_sharded_and_resumes_at_another_world_size(tmp_path):
    run = str(tmp_path / "run")
    small = ["--steps-per-epoch", "4", "--batch-size", "16", "--hidden", "16", "--fsdp"]
    first = subprocess.run(
        torchrun_cmd("launch.train", "--run-dir", run, "--epochs", "2", *small), cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(
        torchrun_cmd("launch.train", "--run-dir", run, "--epochs", "3", *small, nproc=1), cwd=REPO_ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing at epoch 3" in second.stdout
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [1, 2, 3]
    # the sharded run's file holds the full policy: it builds an unsharded module anywhere
    policy = ckptio.load_from_uri(run, allow=["launch"]).instantiate(BanditTask().metadata)
    assert policy(torch.zeros(2, 16)).shape == (2, 4)


def _attempts(out: str, nproc: int) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for rank in range(nproc):
        with open(os.path.join(out, f"rank{rank}.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                by_kind.setdefault(record["kind"], []).append(record)
    return by_kind


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_that_disagree_fail_together_within_seconds_and_write_nothing(tmp_path, nproc):
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    start = time.monotonic()
    proc = subprocess.run(
        torchrun_cmd("agreement_job", runs, out, "--shard-timeout", "120", nproc=nproc), cwd=REPO_ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.monotonic() - start < 100  # no rank waited for the 120 s shard timeout
    by_kind = _attempts(out, nproc)
    last = nproc - 1
    # what each kind must name: the differing tensor, and the rank that differs
    named = {
        "names": ["x.b (weights): on rank 0, not on rank", "x.c (weights): on rank"],
        "swapped": ["x.a (weights): rank 0 float32[", "x.b (weights): rank 0 float32["],
        "dtype": [f"x.a (weights): rank 0 float32[{2 * nproc}, 12] S(0) on mesh [{nproc}], rank {last} int32["],
        "extra": [f"x.d (weights): on rank {last}, not on rank 0"],
        "extra-master": ["x.d (weights): on rank 0, not on rank"],
        "shape": [f"x.a (weights): rank 0 float32[{2 * nproc}, 12]", f"rank {last} float32[{3 * nproc}, 12]"],
        "placement": ["S(0) on mesh", f"rank {last} float32[{2 * nproc}, 12] S(1)"],
        "plain-weight": [f"bias (weights): rank 0 float32[3] (not sharded), rank {last} float32[5]"],
        "partial": [f"rank {last} float32[1, 4] P(sum)"],
        "optimizer": [f"max_exp_avg_sq (trainer state): on rank {last}, not on rank 0"],
    }
    for kind, needles in named.items():
        records = by_kind[kind]
        assert len(records) == nproc, kind
        for r in records:
            assert r["error"] == "StateDictMismatchError", (kind, r)
            assert "nothing was written" in r["message"] and "run.e0000" in r["message"], (kind, r)
            for needle in needles:
                assert needle in r["message"], (kind, needle, r["message"])
            assert r["elapsed_s"] < 30, (kind, r)
        assert len({r["message"] for r in records}) == 1, kind  # every rank says the same
    # one rank's own failure while planning (a padded shard on the last rank) raises on every rank
    for r in by_kind["padded"]:
        assert (
            r["error"] == "CheckpointSaveError"
            and f"x.a (weights): the local shard on rank {last} is [2, 4]" in r["message"]
        ), r
    # the master's manifest check fails (another architecture): every rank raises its typed error (#23)
    for r in by_kind["manifest"]:
        assert r["error"] == "ArchitectureError" and "refusing to resume" in r["message"], r
        assert r["elapsed_s"] < 30, r
    # the master's disk fails while gathered tensors stream out: a failed save on every rank, not a success
    for r in by_kind["master-write"]:
        assert "CheckpointSaveError" in r["mro"] and "run.e00000021.safetensors" in r["message"], r
        assert r["elapsed_s"] < 30, r
    # nothing of any failed attempt was committed or left behind; the save after them worked
    run = os.path.join(runs, "run")
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [0, 22]
    assert all(r.ok for r in ckptio.verify(run))
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if TMP_MARK in n]
    assert ckptio.list_checkpoints(os.path.join(runs, "other")) == []


def test_a_save_never_changes_training_whatever_the_optimizer_state(tmp_path):
    """Training after a save (model and optimizer) is bit-identical to training without it, FSDP2 and plain."""
    out = str(tmp_path / "out")
    proc = subprocess.run(
        torchrun_cmd("observe_job", str(tmp_path / "runs"), out), cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            report = json.load(f)
        assert set(report) == {"fsdp", "plain"}
        for mode, cases in report.items():
            # never stepped, partly frozen (never stepped and stepped), stepped, stepped with a background save;
            # a never-stepped optimizer's checkpoint resumed equals a fresh optimizer, before and after training
            assert len(cases) == 8, (mode, cases)
            assert all(diffs == [] for diffs in cases.values()), (mode, cases)


def test_save_from_any_wrapping_load_into_any_other_at_another_world_size(tmp_path):
    """None, torch.compile, activation checkpointing, both; FSDP2 or DDP: model and optimizer, against torch's own."""
    runs, out = str(tmp_path / "runs"), str(tmp_path / "out")
    for phase, nproc in (("save", 2), ("load", 1)):
        proc = subprocess.run(
            torchrun_cmd("wrap_job", runs, out, "--phase", phase, nproc=nproc), cwd=REPO_ROOT, env=subprocess_env(),
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "load.json")) as f:
        results = json.load(f)
    assert len(results) == 9 * 9, sorted(results)
    assert {k: v for k, v in results.items() if v} == {}


def test_a_partial_checkpoint_of_an_adapter_resumes_into_the_full_model_at_any_world_size(tmp_path):
    """LoRA-style: only the trainable adapter and its Adam state are saved (FSDP2, 2 ranks), and resume into the
    full model at 2 and 1 ranks: what torch's own full state dicts show equals what was trained."""
    run = str(tmp_path / "run")
    cmd = torchrun_cmd("partial_job", run, str(tmp_path / "first"), "--epochs", "2", nproc=2)
    first = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-4000:]
    trained = load_file(str(tmp_path / "first" / "trained.safetensors"))
    latest = ckptio.latest(run)
    assert sorted(load_file(latest.uri)) == ["down.weight", "up.weight"]  # stock safetensors: the adapter alone
    for k, v in load_file(latest.uri).items():
        assert torch.equal(v, trained[f"model.{k}"])
    from partial_job import AdaptedArch

    with pytest.raises(ckptio.CheckpointFormatError, match="partial checkpoint"):  # no model to create from it
        with ckptio.Checkpointer(run, AdaptedArch()) as ck:
            ck.load_or_create_policy({})
    for nproc in (2, 1):
        out = tmp_path / f"resumed{nproc}"
        cmd = torchrun_cmd("partial_job", run, str(out), "--epochs", "2", nproc=nproc)
        again = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stderr[-4000:]
        assert_same(load_file(str(out / "loaded.safetensors")), trained, f"resumed at {nproc} ranks")
