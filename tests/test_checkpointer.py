"""Checkpointer in one process, and trainer state without pickle."""

import json
import random

import numpy as np
import pytest
import torch

import ckptio
from ckptio.trainer_state import capture_rng_state, flatten, restore_rng_state, unflatten


def _adam_state(policy):
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3, betas=(0.8, 0.99))
    policy(torch.randn(4, 6)).sum().backward()
    opt.step()
    return opt


def test_trainer_state_round_trip_through_safetensors(tmp_path, policy):
    opt = _adam_state(policy)
    tree = {"optimizer": opt.state_dict(), "step": 7, "ratio": 0.5, "name": "x", "none": None,
            "arr": np.arange(5, dtype=np.uint32), "rng": capture_rng_state(), "weird/key": [1, (2, 3)]}  # fmt: skip
    tensors, meta = flatten(tree)
    with open(tmp_path / "t.safetensors", "wb") as f:
        ckptio.formats.write_safetensors(f, tensors, meta)
    with open(tmp_path / "t.safetensors", "rb") as f:
        back = unflatten(*ckptio.formats.read_safetensors(f, "t", mmap_file=False))
    assert back["step"] == 7 and back["none"] is None and back["weird/key"] == [1, (2, 3)]
    assert back["arr"].dtype == np.uint32 and back["arr"].tolist() == [0, 1, 2, 3, 4]
    saved = opt.state_dict()
    assert set(back["optimizer"]["state"]) == set(saved["state"])  # int keys stay ints
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    fresh = torch.optim.Adam(policy.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])
    for pid, st in fresh.state_dict()["state"].items():
        assert torch.equal(st["exp_avg"], saved["state"][pid]["exp_avg"])


def test_trainer_state_refuses_arbitrary_objects():
    with pytest.raises(ckptio.CheckpointFormatError, match="no pickle"):
        flatten({"fn": lambda: 0})


def test_rng_capture_restore():
    state = capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(unflatten(*flatten(state)))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_interval_force_and_resume_in_one_process(tmp_path, env_meta):
    from archs import MLPArch

    cfg = ckptio.CheckpointConfig(epoch_interval=2, keep_last=2)
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    assert ck.policy_architecture == MLPArch()
    with pytest.raises(AttributeError):
        ck.policy_architecture = MLPArch(hidden=3)
    policy = ck.load_or_create_policy(env_meta)
    assert ck.resumed_from is None and ck.start_epoch == 0
    opt = _adam_state(policy)
    saved = [ck.save(policy, e, {"e": e}, {"optimizer": opt.state_dict()}) for e in range(1, 6)]
    assert [s is not None for s in saved] == [False, True, False, True, False]
    assert ck.save(policy, 5, force=True) is not None
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "model_architecture.json").read_text())
    assert manifest["class_path"] == "archs.MLPArch" and manifest["config"] == {"hidden": 16, "tied": False}
    assert {"ckptio_version", "created_at"} <= set(manifest)

    again = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    resumed = again.load_or_create_policy(env_meta)
    assert again.resumed_from.epoch == 5 and again.start_epoch == 6
    assert again.trainer_state is None  # the forced save at epoch 5 carried no trainer state
    assert torch.equal(resumed.head.weight, policy.head.weight)

    other = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=8), cfg)
    with pytest.raises(ckptio.ArchitectureError, match="different model"):
        other.load_or_create_policy(env_meta)


def test_fresh_policies_are_identical_and_do_not_shift_rng(tmp_path, env_meta):
    from archs import MLPArch

    torch.manual_seed(5)
    a = ckptio.Checkpointer(str(tmp_path / "a"), MLPArch()).load_or_create_policy(env_meta)
    after_a = torch.rand(1)
    torch.manual_seed(5)
    b = ckptio.Checkpointer(str(tmp_path / "b"), MLPArch()).load_or_create_policy(env_meta)
    assert torch.equal(torch.rand(1), after_a)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_load_into_checks_every_key_and_shape_and_names_the_differences(tmp_path, env_meta):
    from archs import MLPArch

    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16))
    assert not ck.load_into(MLPArch(hidden=16).make_policy(env_meta))  # nothing saved yet: False, model untouched
    model = ck.load_or_create_policy(env_meta)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, env_meta["obs_dim"])).sum().backward()
    opt.step()
    ck.save(model, 1, {"r": 1.0}, optimizer=opt)
    # the same architecture, any fresh values: loads exactly, optimizer too
    target = MLPArch(hidden=16).make_policy(env_meta)
    target_opt = torch.optim.Adam(target.parameters())
    assert ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16)).load_into(target, target_opt)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert torch.equal(target_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # another width: every differing shape is listed, nothing is loaded
    wide = MLPArch(hidden=32).make_policy(env_meta)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ckptio.StateDictMismatchError) as err:
        ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(hidden=16)).load_into(wide)
    message = str(err.value)
    assert "body.weight: checkpoint [16, 16], model [32, 32]" in message and "run.e00000001.safetensors" in message
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())
