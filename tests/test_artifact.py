"""PolicyArtifact validation, instantiate (strict, cache, zero-copy) and the architecture allow-list."""

import json
import os
import sys

import pytest
import torch

import ckptio
from ckptio.architecture import architecture_from_json, architecture_to_json


def test_exactly_one_form(policy):
    with pytest.raises(ckptio.ArchitectureError):
        ckptio.PolicyArtifact()
    with pytest.raises(ckptio.ArchitectureError):
        ckptio.PolicyArtifact(policy=policy, state_dict={})
    with pytest.raises(ckptio.ArchitectureError, match="tensors"):
        ckptio.PolicyArtifact(state_dict={"a": [1, 2]})
    with pytest.raises(ckptio.ArchitectureError, match="JSON"):
        ckptio.PolicyArtifact(state_dict={}, training_metrics={"x": object()})
    with pytest.raises(ckptio.ArchitectureError, match="state-dict form"):
        ckptio.PolicyArtifact(policy=policy, training_metrics={"x": 1})


def test_instantiate_is_zero_copy_and_cached(tmp_path, policy, env_meta):
    from archs import MLPArch

    uri = ckptio.save_policy_artifact(str(tmp_path / "p"), policy, MLPArch(), {"score": 2.5})
    artifact = ckptio.load_from_uri(uri)
    assert artifact.training_metrics == {"score": 2.5}
    module = artifact.instantiate(env_meta)
    assert module.embed.weight.data_ptr() == artifact.state_dict["embed.weight"].data_ptr()  # no second copy
    assert module.embed.weight.requires_grad
    assert artifact.instantiate(env_meta) is module
    x = torch.randn(2, env_meta["obs_dim"])
    assert torch.allclose(module(x), policy(x))


def test_non_persistent_buffers_fall_back_to_a_real_build(tmp_path, env_meta):
    from archs import NonPersistentArch

    arch = NonPersistentArch()
    m = arch.make_policy(env_meta)
    uri = ckptio.save_policy_artifact(str(tmp_path / "np"), m, arch)
    module = ckptio.load_from_uri(uri).instantiate(env_meta)
    assert not module.scale.is_meta and module.scale.tolist() == [2.0] * 4
    assert torch.equal(module.weight, m.weight)


def test_strict_mismatch_is_readable(tmp_path, env_meta):
    from archs import MLPArch

    small = MLPArch(hidden=8).make_policy(env_meta)
    sd = dict(small.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["head.bias"]
    artifact = ckptio.PolicyArtifact(policy_architecture=MLPArch(hidden=16), state_dict=sd)
    with pytest.raises(ckptio.StateDictMismatchError) as e:
        artifact.instantiate(env_meta)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "head.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "embed.weight: checkpoint (8, 6) vs model (16, 6)" in msg


def test_non_strict_tolerates_missing_and_unexpected(env_meta):
    from archs import MLPArch

    sd = dict(MLPArch().make_policy(env_meta).state_dict())
    sd.pop("head.bias")
    sd["unused"] = torch.ones(2)
    module = ckptio.PolicyArtifact(policy_architecture=MLPArch(), state_dict=sd).instantiate(env_meta, strict=False)
    assert not any(p.is_meta for p in module.parameters())
    assert torch.equal(module.embed.weight, sd["embed.weight"])
    with pytest.raises(ckptio.StateDictMismatchError):
        ckptio.PolicyArtifact(policy_architecture=MLPArch(), state_dict=sd).instantiate(env_meta)
    # lenient about names, never about shapes: a tensor of another shape is refused, naming it
    sd["embed.weight"] = torch.ones(3, 3)
    with pytest.raises(ckptio.StateDictMismatchError, match=r"embed\.weight"):
        ckptio.PolicyArtifact(policy_architecture=MLPArch(), state_dict=sd).instantiate(env_meta, strict=False)


def test_architecture_json_round_trip():
    from archs import MLPArch

    j = architecture_to_json(MLPArch(hidden=7))
    assert j == {"class_path": "archs.MLPArch", "config": {"hidden": 7, "tied": False}}
    assert architecture_from_json(json.dumps(j)) == MLPArch(hidden=7)


@pytest.mark.parametrize("path", ["os.system", "subprocess.Popen", "builtins.eval", "xml_never_imported_mod.Thing"])
def test_allow_list_refuses_before_import(path):
    mod = path.rsplit(".", 1)[0]
    was_loaded = mod in sys.modules
    with pytest.raises(ckptio.CheckpointSecurityError, match="allow-list"):
        architecture_from_json({"class_path": path, "config": {}}, source="manifest.json")
    assert (mod in sys.modules) == was_loaded


def test_user_can_extend_allow_list():
    data = {"class_path": "json.decoder.JSONDecoder", "config": {}}
    with pytest.raises(ckptio.CheckpointSecurityError):
        architecture_from_json(data)
    with pytest.raises(ckptio.ArchitectureError, match="make_policy"):
        architecture_from_json(data, allow=["json.decoder"])  # imported, then rejected as no architecture


def test_mock_uri(env_meta):
    artifact = ckptio.load_from_uri("mock://teacher")
    module = artifact.instantiate(env_meta)
    assert isinstance(module, ckptio.MockPolicy)
    out = module(torch.randn(5, env_meta["obs_dim"]))
    assert out.shape == (5, env_meta["num_actions"]) and not out.any()


def test_repr_names_the_checkpoint_without_printing_tensors(tmp_path, policy):
    uri = ckptio.CheckpointManager(str(tmp_path / "run")).save_agent(policy, 3, {"reward": 1.0})
    art = ckptio.load_from_uri(uri)
    text = repr(art)
    assert len(text) < 300 and "tensor(" not in text, text
    assert uri in text and "epoch=3" in text and f"tensors={len(policy.state_dict())}" in text and "reward" in text


def test_readme_training_loops_agree_with_the_main_job():
    """Every training loop the README shows iterates epochs as launch/train.py does (a fresh run saves no epoch 0)."""
    import re

    from conftest import REPO_ROOT

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    loops = re.findall(r"for epoch in range\((.*)\):", readme)
    main_job = re.findall(r"for epoch in range\((.*)\):", open(os.path.join(REPO_ROOT, "launch", "train.py")).read())
    assert len(loops) >= 2 and set(loops) == {main_job[0].replace("args.", "")}, loops
