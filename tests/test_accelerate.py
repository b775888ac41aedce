"""use_ckptio under real accelerate at 2 CPU processes (torchrun, gloo): save_state writes the model through
ckptio, load_state in a new job fills a differently initialised model, and training goes on bit-identically."""

import os

import pytest
import torch

pytest.importorskip("accelerate")

from conftest import run_torchrun
from safetensors.torch import load_file

import ckptio
from ckptio.integrations.accelerate import model_uri


def test_save_state_through_ckptio_then_load_state_continues_bit_identically(tmp_path):
    state = str(tmp_path / "state")
    run_torchrun("accelerate_job", "save", state, str(tmp_path / "saved.safetensors"), timeout=240)
    files = set(os.listdir(state))
    assert "ckptio" in files and not files & {"model.safetensors", "pytorch_model.bin"}  # accelerate saved no model
    (info,) = ckptio.list_checkpoints(model_uri(state))
    assert all(r.status == "ok" for r in ckptio.verify(info.uri))
    assert set(load_file(info.uri)) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # unwrapped: no "module."
    run_torchrun("accelerate_job", "load", state, str(tmp_path / "loaded.safetensors"), timeout=240)
    saved, loaded = load_file(str(tmp_path / "saved.safetensors")), load_file(str(tmp_path / "loaded.safetensors"))
    assert saved.keys() == loaded.keys() and any(k.startswith("opt.") for k in saved)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
