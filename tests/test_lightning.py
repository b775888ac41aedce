"""CkptioCheckpointIO under a real Lightning Trainer: DDP at 2 CPU processes (torchrun, gloo), fit, SIGKILL,
fit(ckpt_path="last"), bit-identical to the run never stopped; the files are ckptio's, never pickle."""

import json
import os

import pytest
import torch

pytest.importorskip("lightning")

from conftest import run_torchrun
from safetensors.torch import load_file

import ckptio
from ckptio.integrations.lightning import CkptioCheckpointIO


def _fit(directory, *, mode="fresh", kill_after=-1, io="sync", check=True):
    return run_torchrun("lightning_job", str(directory), "4", mode, str(kill_after), io, timeout=240, check=check)


def _final(directory):
    with open(os.path.join(directory, "final.json")) as f:
        return load_file(os.path.join(directory, "final.safetensors")), json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lightning-reference")
    _fit(directory)
    return directory


@pytest.mark.parametrize("io", ["sync", "async"])
def test_killed_ddp_fit_resumes_from_last_bit_identically(uninterrupted, tmp_path, io):
    killed = _fit(tmp_path, kill_after=2, io=io, check=False)
    assert killed.returncode != 0 and not os.path.exists(tmp_path / "final.json")
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"]
    _fit(tmp_path, mode="last", io=io)
    tensors, counters = _final(tmp_path)
    ref_tensors, ref_counters = _final(uninterrupted)
    assert counters == ref_counters and counters["global_step"] == 32  # loops and scheduler
    assert tensors.keys() == ref_tensors.keys() and any(k.startswith("opt.") for k in tensors)
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)  # weights and AdamW state, bit for bit


def test_each_lightning_checkpoint_is_a_ckptio_checkpoint_without_pickle(uninterrupted):
    last = str(uninterrupted / "last.ckpt")
    assert all(r.ok and r.status == "ok" for r in ckptio.verify(last))
    (info,) = ckptio.list_checkpoints(last)
    assert info.epoch == 32 and info.uri.endswith(".safetensors")
    weights = load_file(info.uri)  # stock safetensors reads the weights
    final, _ = _final(uninterrupted)
    assert all(torch.equal(weights[k], final[f"model.{k}"]) for k in weights)
    checkpoint = CkptioCheckpointIO().load_checkpoint(last)
    assert checkpoint["global_step"] == 32 and checkpoint["epoch"] == 3
    assert checkpoint["hyper_parameters"] == {"width": 16, "lr": 0.01}
    assert {"loops", "callbacks", "optimizer_states", "lr_schedulers", "state_dict"} <= checkpoint.keys()
    assert isinstance(checkpoint["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)


def test_a_resave_replaces_and_remove_deletes_only_its_own(tmp_path):
    io = CkptioCheckpointIO()
    path = tmp_path / "last.ckpt"
    for step in (5, 9):
        io.save_checkpoint({"state_dict": {"w": torch.full((3,), float(step))}, "global_step": step, "epoch": 0}, path)
    assert [i.epoch for i in ckptio.list_checkpoints(str(path))] == [9]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((3,), 9.0))
    other = tmp_path / "data"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ckptio.InvalidArgumentError, match="left alone"):
        io.remove_checkpoint(other)
    assert (other / "keep.txt").exists()
    io.remove_checkpoint(path)
    assert not path.exists()
    with pytest.raises(ckptio.InvalidArgumentError, match="state_dict"):
        io.save_checkpoint({"global_step": 1}, path)


def test_a_torch_written_ckpt_loads_without_full_trust(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert CkptioCheckpointIO().load_checkpoint(path)["global_step"] == 3

    class Hostile:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": {}, "hook": Hostile()}, path)
    with pytest.raises(ckptio.CheckpointSecurityError, match=r"old\.ckpt: holds objects a weights-only load refuses"):
        CkptioCheckpointIO().load_checkpoint(path)


def test_lightning_checkpoints_on_s3(s3):
    io = CkptioCheckpointIO(storage_options=s3.options())
    path = f"s3://{s3.make_bucket()}/ckpts/epoch=0-step=4.ckpt"
    state = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 4, "epoch": 0, "loops": {"fit": {"n": 1}}}
    io.save_checkpoint(state, path)
    assert [i.epoch for i in ckptio.list_checkpoints(path, s3.options())] == [4]
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0)) and loaded["loops"] == {"fit": {"n": 1}}
    io.remove_checkpoint(path)
    with pytest.raises(ckptio.CheckpointNotFoundError):
        ckptio.list_checkpoints(path, s3.options())
