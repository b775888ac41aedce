"""CkptioCheckpointManager as torchtitan's job config selects it, beside torchtitan's own DCP manager on the same
steps: torchtitan's llama3 debug model under FSDP2 at 2 CPU ranks (torchrun, gloo), its optimizer and LR-scheduler
containers, trained, SIGKILLed after a save, resumed at 2 ranks and at 1. torchtitan's Trainer cannot train on CPU
(FlexAttention has no CPU backward), so titan_job drives the manager the way the Trainer does."""

import json
import os
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("torchtitan.components.checkpointer")

from conftest import REPO_ROOT, subprocess_env, torchrun_cmd
from safetensors.torch import load_file

import ckptio


def _run(kind, dump, *, kill=-1, load_step=-1, nproc=2, out=None):
    args = [kind, str(dump), "4", str(kill), str(load_step), str(out or f"{dump}.final")]
    return subprocess.run(
        torchrun_cmd("titan_job", *args, nproc=nproc), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def _final(path):
    with open(f"{path}.json") as f:
        return load_file(str(path)), json.load(f)


def _same(a, b):
    (ta, ja), (tb, jb) = _final(a), _final(b)
    ja.pop("start"), jb.pop("start")  # where each began: compared by the caller
    assert ja == jb  # step, tokens seen, learning rate
    assert ta.keys() == tb.keys() and any(k.startswith("opt.") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def dcp_reference(tmp_path_factory):
    """torchtitan's DCP manager: 4 steps at 2 ranks, checkpoints at steps 2 and 4."""
    dump = tmp_path_factory.mktemp("titan-dcp") / "dump"
    _ok(_run("dcp", dump))
    return dump


@pytest.mark.parametrize("kind", ["ckptio", "ckptio-async"])
def test_killed_and_resumed_at_two_ranks_then_at_one_as_torchtitans_dcp_manager(dcp_reference, tmp_path, kind):
    dump = tmp_path / "dump"
    killed = _run(kind, dump, kill=2)
    assert killed.returncode != 0 and not os.path.exists(f"{dump}.final.json")
    (info,) = ckptio.list_checkpoints(str(dump / "checkpoint"))
    assert info.epoch == 2 and all(r.status == "ok" for r in ckptio.verify(info.uri))
    shutil.copytree(dump, tmp_path / "one")
    _ok(_run(kind, dump))
    _same(f"{dcp_reference}.final", f"{dump}.final")
    assert _final(f"{dump}.final")[1]["start"] == 2  # resumed, not started over
    # at one rank: ckptio's step-2 checkpoint against DCP's, each resumed and trained on the same steps
    shutil.copytree(dcp_reference, tmp_path / "dcp-one")
    _ok(_run("dcp", tmp_path / "dcp-one", load_step=2, nproc=1))
    _ok(_run(kind, tmp_path / "one", nproc=1))
    _same(f"{tmp_path / 'dcp-one'}.final", f"{tmp_path / 'one'}.final")
    assert _final(f"{tmp_path / 'one'}.final")[1]["start"] == 2


def test_one_standard_file_per_step_holding_torchtitans_names(dcp_reference, tmp_path):
    dump = tmp_path / "dump"
    _ok(_run("ckptio", dump))
    infos = ckptio.list_checkpoints(str(dump / "checkpoint"))
    assert [i.epoch for i in infos] == [2, 4]
    weights = load_file(infos[-1].uri)  # stock safetensors: the whole model, gathered from both ranks
    final, _ = _final(f"{dump}.final")
    model = {k.removeprefix("model."): v for k, v in final.items() if k.startswith("model.")}
    assert weights.keys() == model.keys() and "layers.0.attention.qkv_linear.wq.weight" in weights
    assert all(torch.equal(weights[k], model[k]) for k in model)
    state = ckptio.CheckpointManager(str(dump / "checkpoint"), run_name="step").load_trainer_state(infos[-1])
    assert state["user"]["train_state"] == {"step": 4, "ntokens_seen": 4 * 2 * 33}  # per rank, as the job counts
    assert state["user"]["lr_scheduler"] and state["optimizer"]["state"]


def _manager(model, dump, **config):
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw

    from ckptio.integrations.torchtitan import CkptioCheckpointManager

    optimizers = default_adamw().build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=1).build(optimizers=optimizers, training_steps=10)
    adapter = config.pop("sd_adapter", None)
    return CkptioCheckpointManager.Config(enable=True, **config).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers, states={},
        sd_adapter=adapter, base_folder=str(dump),
    )  # fmt: skip


def test_initial_load_path_a_ckptio_checkpoint_or_a_hugging_face_folder(tmp_path):
    from safetensors.torch import save_file
    from torchtitan.models.llama3 import model_registry

    spec = model_registry("debugmodel")

    def build(seed):
        torch.manual_seed(seed)
        return spec.model.build()

    source = build(0)
    reference = {k: v.clone() for k, v in source.state_dict().items()}
    adapter = spec.state_dict_adapter(spec.model, None)
    (tmp_path / "hf").mkdir()  # torchtitan's names mapped to Hugging Face's by the model's own adapter
    hf = {k: v.contiguous() for k, v in adapter.to_hf(dict(source.state_dict())).items()}
    save_file(hf, str(tmp_path / "hf" / "model.safetensors"), {"format": "pt"})
    ckptio.CheckpointManager(str(tmp_path / "base")).save_checkpoint(source, 7)
    for name, extra in (("base", {}), ("hf", {"initial_load_in_hf": True, "sd_adapter": adapter})):
        model = build(1)
        manager = _manager(model, tmp_path / f"run-{name}", initial_load_path=str(tmp_path / name), **extra)
        assert manager.load() is True
        assert manager.checkpointer.resumed_from is None and manager.checkpointer.start_epoch == 0
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items()), name
        manager.close()
        manager.close()  # torchtitan's Trainer closes it, and __del__ again: once is what runs
    with pytest.raises(ckptio.InvalidArgumentError, match="load_step=3"):
        _manager(build(2), tmp_path / "run-base").load(step=3)
