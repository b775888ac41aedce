"""The ckptio command line: inspect, ls, convert, verify."""

import json
import subprocess
import sys

import torch

import ckptio
from ckptio.cli import main


def test_cli_inspect_ls_convert(tmp_path, policy, capsys):
    from archs import MLPArch

    mgr = ckptio.CheckpointManager(str(tmp_path / "run"))
    mgr.save_agent(policy, 3, {"score": 1.5}, policy_architecture=MLPArch())
    mgr.save_agent(policy, 4, policy_architecture=MLPArch())
    # one real process, as a user runs it
    out = subprocess.run(
        [sys.executable, "-m", "ckptio", "inspect", str(tmp_path / "run")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "safetensors" and info["epoch"] == 4
    assert info["tensor_count"] == len(policy.state_dict())
    assert info["total_bytes"] == sum(t.numel() * t.element_size() for t in policy.state_dict().values())
    assert info["architecture"]["class_path"] == "archs.MLPArch"
    assert main(["ls", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["3", "4"]
    src = str(tmp_path / "run" / "checkpoints" / "run.e00000003.safetensors")
    assert main(["convert", src, str(tmp_path / "x.pt")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "x.pt")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "pt" and info["metrics"] == {"score": 1.5} and info["epoch"] == 3
    assert torch.equal(ckptio.load_from_uri(str(tmp_path / "x.pt")).state_dict["head.weight"], policy.head.weight)


def test_cli_verify_reports_each_bad_file(tmp_path, policy, capsys):
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"))
    good = mgr.save_agent(policy, 1)
    bad = mgr.save_agent(policy, 2)
    data = bytearray(open(bad, "rb").read())
    data[-3] ^= 0xFF  # flip a byte inside the tensor data: lengths still agree
    open(bad, "wb").write(data)
    assert ckptio.load_from_uri(bad).epoch == 2  # the cheap checks cannot see it
    assert main(["verify", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert f"OK         {good}\n" in out and f"BAD        {bad}: content digest mismatch" in out
    assert out.count(bad) == 1  # each path once
    assert main(["verify", good]) == 0
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
