"""Hugging Face folders both ways, against transformers itself: ckptio's export loads with ``from_pretrained``,
and a ``save_pretrained`` folder (sharded or not) is a checkpoint every ckptio tool and a new run read."""

import json
import os
import subprocess

import pytest
import torch

pytest.importorskip("transformers")

from conftest import PYTHON, REPO_ROOT, run_torchrun, subprocess_env
from hf_models import logits, tiny_config, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import ckptio

ARCH = ckptio.TransformersArchitecture.of(tiny_config(), "LlamaForCausalLM")
SHARD = "30KB"  # the tiny model in several shards


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "ckptio", *args], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True
    )


@pytest.fixture
def saved(tmp_path):
    """A ckptio run holding the tiny Llama at epoch 3, its architecture a transformers config."""
    model = tiny_llama()
    ckptio.CheckpointManager(str(tmp_path / "run")).save_checkpoint(model, 3, policy_architecture=ARCH)
    return model, str(tmp_path / "run")


def _stored_keys(folder: str) -> set[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("shard", [None, SHARD])
def test_export_loads_with_from_pretrained_and_matches_save_pretrained(saved, tmp_path, shard):
    model, run = saved
    out = ckptio.export(run, str(tmp_path / "hf"), hf=True, max_shard_size=shard)
    files = sorted(os.listdir(out))
    reference = tmp_path / "ref"
    model.save_pretrained(reference, max_shard_size=shard or "10GB")
    # what transformers writes: the same weights files, the same keys (the tie left out), config.json
    assert [f for f in files if f.endswith((".safetensors", ".json"))] == sorted(
        f for f in os.listdir(reference) if f != "generation_config.json"
    )
    assert _stored_keys(out) == _stored_keys(str(reference)) and "lm_head.weight" not in _stored_keys(out)
    for name in (f for f in files if f.endswith(".safetensors")):
        with safe_open(os.path.join(out, name), "pt") as f:
            assert f.metadata()["format"] == "pt"
    if shard:
        assert len([f for f in files if f.startswith("model-")]) > 1
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        shards = {n: load_file(os.path.join(out, n)) for n in set(index["weight_map"].values())}
        assert index["metadata"]["total_size"] == sum(t.nbytes for s in shards.values() for t in s.values())
        assert all(k in shards[n] for k, n in index["weight_map"].items())
        assert all(os.path.getsize(os.path.join(out, n)) < 30_000 + 4096 for n in shards)
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_export_casts_floating_tensors_to_dtype(saved, tmp_path):
    model, run = saved
    out = ckptio.export(run, str(tmp_path / "hf"), hf=True, dtype="bfloat16", max_shard_size=SHARD)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    stored = {}
    for name in (n for n in os.listdir(out) if n.endswith(".safetensors")):
        stored.update(load_file(os.path.join(out, name)))  # stock safetensors: what the files hold
    assert stored and all(t.dtype == torch.bfloat16 for t in stored.values())
    assert all(torch.equal(t, model.state_dict()[k].to(torch.bfloat16)) for k, t in stored.items())
    loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t.to(torch.bfloat16)), key
    assert torch.equal(logits(loaded), logits(model.to(torch.bfloat16)))


def test_export_from_the_command_line_with_a_user_config(tmp_path):
    # an architecture of the user's own: config.json comes from --config
    model = tiny_llama(tie=False)
    torch_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckptio.CheckpointManager(str(tmp_path)).save_checkpoint(torch_sd, 0)
    src = ckptio.latest(str(tmp_path)).uri
    config = tmp_path / "config.json"
    config.write_text(tiny_config(tie=False).to_json_string())
    out = str(tmp_path / "hf")
    proc = cli("export", "--hf", "--config", str(config), "--max-shard-size", SHARD, src, out)
    assert proc.returncode == 0, proc.stderr
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(model))
    again = cli("export", "--hf", src, out)  # never over a model
    assert again.returncode == 2 and "exists" in again.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 32}))
    proc = cli("export", "--hf", "--config", str(bad), src, str(tmp_path / "hf2"))
    assert proc.returncode == 2 and "model_type" in proc.stderr
    assert cli("export", "--dtype", "float16", src, str(tmp_path / "x.safetensors")).returncode == 2


@pytest.fixture(params=["single", "sharded"])
def pretrained(request, tmp_path):
    """A folder transformers' save_pretrained wrote, with the model it holds."""
    model = tiny_llama(seed=5)
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder, max_shard_size=SHARD if request.param == "sharded" else "10GB")
    return model, str(folder)


def test_a_pretrained_folder_is_a_checkpoint_every_tool_reads(pretrained, tmp_path):
    model, folder = pretrained
    info = ckptio.inspect_checkpoint(folder)
    assert info["tensor_count"] == len(_stored_keys(folder))
    assert info["architecture"]["class_path"] == "transformers.AutoConfig"
    assert info["architecture"]["config"]["model_type"] == "llama"
    assert {os.path.basename(f) for f in info["files"]} >= {"config.json"} | {
        f for f in os.listdir(folder) if f.startswith("model")
    }
    (listed,) = ckptio.list_checkpoints(folder)
    assert listed.epoch == 0 and listed.uri.startswith(folder)
    results = ckptio.verify(folder)
    assert all(r.ok for r in results) and len(results) == len([f for f in os.listdir(folder) if f.startswith("model")])
    artifact = ckptio.load_from_uri(folder)
    loaded = artifact.instantiate().eval()
    assert type(loaded) is LlamaForCausalLM and torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie save_pretrained left out
    # into a run: its first checkpoint, which a Checkpointer resumes
    run = ckptio.convert(folder, str(tmp_path / "run") + "/")
    assert [i.epoch for i in ckptio.list_checkpoints(run)] == [0]
    ckpt = ckptio.Checkpointer(str(tmp_path / "run"), ARCH)
    resumed = ckpt.load_or_create_policy(None).eval()
    assert ckpt.resumed_from.epoch == 0 and torch.equal(logits(resumed), logits(model))
    ckpt.close()


def test_a_transformers_architecture_is_allow_listed_like_any_other(pretrained):
    _, folder = pretrained
    artifact = ckptio.load_from_uri(folder)
    import ckptio.architecture as architecture

    saved = set(architecture._allowed_prefixes)
    architecture._allowed_prefixes.discard("transformers")
    try:
        refused = ckptio.load_from_uri(folder)
        with pytest.raises(ckptio.CheckpointSecurityError, match="transformers"):
            refused.instantiate()
    finally:
        architecture._allowed_prefixes |= saved
    assert isinstance(artifact.policy_architecture, ckptio.TransformersArchitecture)


def test_a_new_run_starts_from_a_pretrained_folder_then_resumes_its_own(pretrained, tmp_path):
    model, folder = pretrained
    fresh = tiny_llama(seed=9)
    assert not torch.equal(logits(fresh), logits(model))
    config = ckptio.CheckpointConfig(initial_load=folder)
    with ckptio.Checkpointer(str(tmp_path / "run"), ARCH, config) as ckpt:
        assert ckpt.load_into(fresh) is True
        assert ckpt.initial_loaded_from == folder and ckpt.resumed_from is None and ckpt.start_epoch == 0
        assert torch.equal(logits(fresh), logits(model))
        with torch.no_grad():
            fresh.model.norm.weight.add_(1.0)  # "training"
        ckpt.save(fresh, epoch=0)
    again = tiny_llama(seed=11)
    with ckptio.Checkpointer(str(tmp_path / "run"), ARCH, config) as ckpt:
        assert ckpt.load_into(again) is True
        assert ckpt.resumed_from.epoch == 0 and ckpt.initial_loaded_from is None
        assert torch.equal(logits(again), logits(fresh))
    with ckptio.Checkpointer(str(tmp_path / "run2"), ARCH, config) as ckpt:
        built = ckpt.load_or_create_policy(None).eval()
        assert torch.equal(logits(built), logits(model)) and ckpt.initial_loaded_from == folder


def test_fsdp2_at_two_ranks_starts_from_a_sharded_pretrained_folder(tmp_path):
    model = tiny_llama(seed=5)
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder, max_shard_size=SHARD)
    out = str(tmp_path / "full.safetensors")
    run_torchrun("hf_job", str(folder), str(tmp_path / "run"), out, timeout=240)
    with safe_open(out, "pt") as f:
        assert f.metadata()["tied"] == "True"
    held = load_file(out)
    # differential: what torch's own full state dict holds equals what transformers saved, tensor by tensor
    reference = {}
    for name in {n for n in os.listdir(folder) if n.startswith("model-")}:
        reference.update(load_file(str(folder / name)))
    assert held.keys() == reference.keys()
    assert all(torch.equal(held[k], reference[k]) for k in reference)
    assert [i.epoch for i in ckptio.list_checkpoints(str(tmp_path / "run"))] == [0]


def _shards(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("model-"))


def test_an_index_naming_a_missing_shard_is_a_typed_error(tmp_path):
    folder = str(tmp_path / "pretrained")
    tiny_llama().save_pretrained(folder, max_shard_size=SHARD)
    gone = _shards(folder)[1]
    os.remove(os.path.join(folder, gone))
    with pytest.raises(ckptio.CorruptCheckpointError, match=f"names shard '{gone}'.*missing"):
        ckptio.load_from_uri(folder)
    proc = cli("verify", folder)
    assert proc.returncode == 1 and gone in proc.stdout and "BAD" in proc.stdout


def test_a_shard_disagreeing_with_its_index_is_a_typed_error(tmp_path):
    folder = str(tmp_path / "pretrained")
    tiny_llama().save_pretrained(folder, max_shard_size=SHARD)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    key, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in _shards(folder) if s != shard)
    index["weight_map"][key] = other  # the index now says the tensor is in another shard
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(ckptio.CorruptCheckpointError, match=f"{other}: lacks tensor '{key}'"):
        ckptio.load_from_uri(folder)
    (bad,) = [r for r in ckptio.verify(folder) if not r.ok]
    assert bad.uri.endswith(other) and key in bad.detail
    index["weight_map"][key] = shard
    del index["weight_map"][key]  # a tensor in a shard the index does not name at all
    with open(index_path, "w") as f:
        json.dump(index, f)
    with pytest.raises(
        ckptio.CorruptCheckpointError, match=f"{shard}: holds tensor '{key}', which the index maps to no shard"
    ):
        ckptio.inspect_checkpoint(folder)


def test_a_config_without_model_type_is_a_typed_error(tmp_path):
    folder = tmp_path / "pretrained"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckptio.CheckpointFormatError, match=r"config\.json: has no 'model_type'"):
        ckptio.load_from_uri(str(folder))
    assert "model_type" in cli("inspect", str(folder)).stderr
