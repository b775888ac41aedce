"""torch.distributed.checkpoint (DCP) checkpoints in: described and converted one tensor at a time, then resumed.

The DCP checkpoints are written by torch's own ``dcp.save`` from real 2-rank FSDP2 and tensor-parallel
jobs (locally and to moto S3 through torch's fsspec writer); the converted files are compared bit for bit
with torch's own full state dicts, and the converted run resumes at 1 and 3 ranks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess

import pytest
import torch
from conftest import PYTHON, REPO_ROOT, run_torchrun, subprocess_env, torchrun_cmd
from safetensors import safe_open
from safetensors.torch import load_file

import ckptio
from ckptio.cli import main as cli

pytestmark = pytest.mark.slow

ARCH = {"class_path": "archs.MLPArch", "config": {"hidden": 16, "tied": False}}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def fsdp_dcp(tmp_path_factory):
    """A DCP checkpoint from a 2-rank FSDP2 job with AdamW, and torch's full view of what it saved."""
    d = tmp_path_factory.mktemp("fsdp")
    run_torchrun("dcp_job", "save", str(d / "dcp"), str(d / "ref"), "--mode", "fsdp", timeout=180)
    return d


def _optimizer_of(run_dir) -> dict[str, torch.Tensor]:
    """The converted trainer state's optimizer tensors, keyed as sharded_job's flat_optim keys torch's."""
    manager = ckptio.CheckpointManager(str(run_dir))
    tree = manager.load_trainer_state()
    return {f"{fqn}.{k}": v for fqn, st in tree["optimizer"]["state"].items() for k, v in st.items()}


def _resume(run_dir, out, nproc: int) -> None:
    proc = subprocess.run(torchrun_cmd("dcp_job", "resume", str(run_dir), str(out), nproc=nproc), cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_an_fsdp2_dcp_checkpoint_converts_bit_for_bit_and_resumes_at_other_world_sizes(fsdp_dcp, tmp_path):
    run = tmp_path / "run"
    uri = ckptio.convert(str(fsdp_dcp / "dcp"), str(run) + "/", architecture=ARCH)
    assert uri.endswith("run/checkpoints/run.e00000007.safetensors")  # the state's own step names the epoch
    ref = load_file(str(fsdp_dcp / "ref" / "ref.safetensors"))
    _same(ref, load_file(uri))
    _same(load_file(str(fsdp_dcp / "ref" / "ref_optim.safetensors")), _optimizer_of(run))
    assert all(r.ok for r in ckptio.verify(str(run)))
    for nproc in (1, 3):
        out = tmp_path / f"out{nproc}"
        _resume(run, out, nproc)
        _same(ref, load_file(str(out / "resumed.safetensors")))
        _same(
            load_file(str(fsdp_dcp / "ref" / "ref_optim.safetensors")),
            load_file(str(out / "resumed_optim.safetensors")),
        )
        resumed = json.load(open(out / "trainer_state.json"))
        assert resumed == {
            "epoch": 7,
            "user": {"lr_scheduler": {"last_epoch": 3, "_step_count": 4}, "train_state": {"step": 7}},
        }
    # one file, with an architecture that builds the module on its own
    single = ckptio.convert(
        str(fsdp_dcp / "dcp"), str(tmp_path / "one" / "policy.safetensors"), epoch=3, architecture=ARCH
    )
    module = ckptio.load_from_uri(single, allow=["archs"]).instantiate({"obs_dim": 8, "num_actions": 4})
    _same(ref, {k: v for k, v in module.state_dict().items()})
    assert ckptio.load_from_uri(single).epoch == 3


def test_a_tensor_parallel_dcp_checkpoint_converts_bit_for_bit(tmp_path):
    run_torchrun("dcp_job", "save", str(tmp_path / "dcp"), str(tmp_path / "ref"), "--mode", "tp", timeout=180)
    out = ckptio.convert(str(tmp_path / "dcp"), str(tmp_path / "policy.safetensors"))
    _same(load_file(str(tmp_path / "ref" / "ref.safetensors")), load_file(out))


def test_a_dcp_checkpoint_on_s3_converts(s3, tmp_path, fsdp_dcp):
    remote = f"s3://{s3.make_bucket()}/dcp"
    run_torchrun("dcp_job", "save", remote, str(tmp_path / "ref"), "--mode", "fsdp", "--storage-options",
                 json.dumps(s3.options()), timeout=180)  # fmt: skip
    described = ckptio.inspect_checkpoint(remote, s3.options())
    assert described["format"] == "dcp" and described["tensors"]["model.body.weight"]["shape"] == [16, 16]
    out = ckptio.convert(remote, str(tmp_path / "policy.safetensors"), storage_options=s3.options())
    _same(load_file(str(tmp_path / "ref" / "ref.safetensors")), load_file(out))


def test_inspect_describes_a_dcp_checkpoint_without_converting_it(fsdp_dcp, capsys):
    assert cli(["inspect", str(fsdp_dcp / "dcp")]) == 0
    described = json.loads(capsys.readouterr().out)
    ref = load_file(str(fsdp_dcp / "ref" / "ref.safetensors"))
    assert described["format"] == "dcp" and described["top_level_keys"] == [
        "lr_scheduler",
        "model",
        "optimizer",
        "train_state",
    ]
    for k, v in ref.items():
        entry = described["tensors"][f"model.{k}"]
        assert entry["shape"] == list(v.shape) and entry["dtype"] == str(v.dtype).removeprefix("torch.")
        assert entry["bytes"] == v.numel() * v.element_size()
    assert "train_state.step" in described["values"]


def _broken(fsdp_dcp, tmp_path, name: str):
    src = tmp_path / name
    subprocess.run(["cp", "-r", str(fsdp_dcp / "dcp"), str(src)], check=True)
    return src


def _nothing_written(out) -> None:
    assert not os.path.exists(out) or os.listdir(out) == []


def test_damaged_dcp_checkpoints_are_typed_errors_naming_the_file_and_nothing_is_written(fsdp_dcp, tmp_path, capsys):
    missing = _broken(fsdp_dcp, tmp_path, "missing")
    os.unlink(missing / "__1_0.distcp")
    with pytest.raises(ckptio.CheckpointNotFoundError, match=r"__1_0\.distcp: missing"):
        ckptio.convert(str(missing), str(tmp_path / "o1" / "p.safetensors"))
    _nothing_written(tmp_path / "o1")
    truncated = _broken(fsdp_dcp, tmp_path, "truncated")
    with open(truncated / "__0_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "__0_0.distcp") // 2)
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"__0_0\.distcp: truncated"):
        ckptio.convert(str(truncated), str(tmp_path / "o2") + "/")
    _nothing_written(tmp_path / "o2")
    garbage = _broken(fsdp_dcp, tmp_path, "garbage")
    (garbage / ".metadata").write_bytes(b"\x80\x04not a pickle at all")
    assert cli(["convert", str(garbage), str(tmp_path / "o3" / "p.safetensors")]) == 2
    assert "garbage/.metadata: not a DCP metadata file" in capsys.readouterr().err
    _nothing_written(tmp_path / "o3")
    uncovered = _broken(fsdp_dcp, tmp_path, "uncovered")
    md = ckptio.dcp._MetadataUnpickler(open(uncovered / ".metadata", "rb"), "x").load()
    md.state_dict_metadata["model.body.weight"].chunks.pop()  # one rank's half of the tensor is not there
    (uncovered / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(ckptio.CorruptCheckpointError, match=r"chunks of 'model.body.weight' cover 128 of its 256"):
        ckptio.convert(str(uncovered), str(tmp_path / "o4" / "p.safetensors"))
    _nothing_written(tmp_path / "o4")


class _Runs:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_dcp_metadata_that_would_run_code_is_refused_and_never_runs(fsdp_dcp, tmp_path, monkeypatch):
    evil = _broken(fsdp_dcp, tmp_path, "evil")
    (evil / ".metadata").write_bytes(pickle.dumps(_Runs()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ckptio.CheckpointSecurityError, match=r"\.metadata: names posix\.system"):
        ckptio.convert(str(evil), str(tmp_path / "o" / "p.safetensors"))
    assert not (tmp_path / "pwned").exists()


def test_an_unrecognised_layout_names_the_keys_found_and_how_to_name_the_models(fsdp_dcp, tmp_path):
    with pytest.raises(ckptio.CheckpointFormatError, match=r"no entries under 'policy'; top-level keys found: "
                       r"lr_scheduler, model, optimizer, train_state; .*--model-key"):  # fmt: skip
        ckptio.convert(str(fsdp_dcp / "dcp"), str(tmp_path / "p.safetensors"), model_key="policy")


def test_dcps_own_reader_loads_a_ckptio_export_at_another_world_size(tmp_path):
    """The other direction: a ckptio checkpoint of a 2-rank FSDP2 run, loaded with dcp.load into 3 ranks' shards."""
    run_torchrun("sharded_job", str(tmp_path / "run"), str(tmp_path / "out"), "--mode", "fsdp", "--epochs", "1",
                 timeout=180)  # fmt: skip
    ckptio.export(str(tmp_path / "run"), str(tmp_path / "export") + "/")
    code = (
        "import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp\n"
        "from archs import MLPArch\nfrom sharded_job import ENV, FULL, shard\n"
        "from safetensors.torch import save_file\n"
        "from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict\n"
        "dist.init_process_group('gloo')\n"
        "model = shard(MLPArch(hidden=16).make_policy(ENV), 'fsdp', dist.get_world_size())\n"
        "sd = get_model_state_dict(model)\n"
        f"dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader({str(tmp_path / 'export')!r}))\n"
        "set_model_state_dict(model, sd)\n"
        "full = get_model_state_dict(model, options=FULL)\n"
        f"if dist.get_rank() == 0: save_file({{k: v.contiguous() for k, v in full.items()}}, {str(tmp_path / 'dcp.safetensors')!r})\n"
        "dist.barrier()\nimport os\nos._exit(0)  # as dcp_job leaves: DCP's object collectives, then no destructor\n"
    )
    script = tmp_path / "load_with_dcp.py"
    script.write_text(code)
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(script)],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    _same(load_file(str(tmp_path / "out" / "ref.e0.safetensors")), load_file(str(tmp_path / "dcp.safetensors")))
    with safe_open(str(tmp_path / "dcp.safetensors"), "pt") as f:
        assert len(list(f.keys())) == len(load_file(str(tmp_path / "out" / "ref.e0.safetensors")))
