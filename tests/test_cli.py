"""The ckptio command line: inspect, ls, convert, verify."""

import json
import os
import subprocess
import sys

import pytest
import torch

import ckptio
import ckptio.formats
import ckptio.layout
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
    assert _ckptio("verify", bad).returncode == 1  # the process's exit status, as scripts see it
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_cli_verify_of_a_live_run_reports_pruned_checkpoints_as_gone_not_bad(tmp_path, policy, capsys, monkeypatch):
    """Retention deletes a checkpoint while verify reads it: GONE and exit 0; damage alone is BAD (#19)."""
    import ckptio.layout
    import ckptio.tools

    mgr = ckptio.CheckpointManager(str(tmp_path / "run"))
    for epoch in (1, 2, 3):
        mgr.save_agent(policy, epoch, {"r": float(epoch)}, trainer_state=({"t": torch.ones(2)}, {"k": "v"}))
    infos = mgr.list_checkpoints()
    # the moment retention strikes: epoch 1 after its weights were checked (before its metrics are read),
    # epoch 2 between the listing and the opening of its weights
    real_read_metrics, real_open = ckptio.tools.read_metrics, ckptio.tools.open_weights

    def read_metrics_then_prune(storage, name, metadata=None):
        if name == infos[0].name and storage.exists(name):
            mgr.delete(infos[0])
        return real_read_metrics(storage, name, metadata)

    def open_after_prune(storage, name, local_path=None):
        if name == infos[1].name and storage.exists(name):
            mgr.delete(infos[1])
        return real_open(storage, name, local_path)

    monkeypatch.setattr(ckptio.tools, "read_metrics", read_metrics_then_prune)
    monkeypatch.setattr(ckptio.tools, "open_weights", open_after_prune)
    assert main(["verify", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out, out
    assert out.count("GONE") == 3 and "deleted or replaced while it was being verified" in out  # 1's two sidecars, 2
    assert out.count("OK") == 3 + 1  # epoch 3's three files, epoch 1's weights
    # a sidecar missing from a checkpoint that is still there is damage: BAD, exit 1
    monkeypatch.undo()
    metrics = next(n for n in mgr.storage.listdir() if n.startswith(infos[2].base) and n.endswith(".metrics.json"))
    mgr.storage.delete(metrics)
    assert main(["verify", str(tmp_path / "run")]) == 1
    assert "BAD        " in capsys.readouterr().out


def _ckptio(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckptio", *args], capture_output=True, text=True, timeout=120)


def test_a_copied_or_renamed_checkpoint_loads_anywhere_and_export_makes_a_whole_copy(tmp_path, policy, capsys):
    """cp to best.safetensors, or to another directory: loads, inspects, converts (#19); export copies every file."""
    import shutil
    import warnings

    from archs import MLPArch

    run = tmp_path / "run"
    mgr = ckptio.CheckpointManager(str(run))
    trainer = ({"0:/step": torch.tensor(7)}, {"ckptio.trainer_structure": json.dumps({"t": "0:/step"})})
    weights = mgr.save_agent(policy, 1, {"reward": 0.9}, trainer_state=trainer, policy_architecture=MLPArch())
    sidecars = [str(run / "checkpoints" / n) for n in os.listdir(run / "checkpoints") if n.count(".") == 4]
    assert len(sidecars) == 2
    # a rename beside its sidecars, and a copy with them in another directory: the same checkpoint
    best = str(run / "checkpoints" / "best.safetensors")
    shutil.copy(weights, best)
    elsewhere = tmp_path / "eval"
    elsewhere.mkdir()
    for f in [weights, *sidecars]:
        shutil.copy(f, elsewhere)
    for copy in (best, str(elsewhere / os.path.basename(weights))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing to warn about: the sidecars are there
            art = ckptio.load_from_uri(copy)
        assert art.training_metrics == {"reward": 0.9} and torch.equal(
            art.state_dict["head.weight"], policy.head.weight
        )
        assert all(r.status == "ok" for r in ckptio.verify(copy))
        assert main(["inspect", copy]) == 0
        assert json.loads(capsys.readouterr().out)["metrics"] == {"reward": 0.9}
        assert main(["convert", copy, str(tmp_path / f"{len(os.listdir(tmp_path))}.pt")]) == 0
        capsys.readouterr()
    # a copy alone, renamed or under its own name elsewhere: its weights load, no metrics, one warning;
    # verify says what it cannot check. In its own directory, a missing sidecar is still damage.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(weights, alone / "policy.safetensors")
    shutil.copy(weights, alone)
    for copy in (alone / "policy.safetensors", alone / os.path.basename(weights)):
        with pytest.warns(ckptio.CheckpointWarning, match="not beside it") as caught:
            art = ckptio.load_from_uri(str(copy))
        assert len(caught) == 1 and art.training_metrics is None
        assert torch.equal(art.state_dict["body.weight"], policy.body.weight)
        assert [r.status for r in ckptio.verify(str(copy))] == ["ok", "unverified", "unverified"]
    # export: a whole unit under a new name, in a place with no run directory; never over an existing file
    out = _ckptio("export", str(run), str(tmp_path / "shipped" / "best-policy.safetensors"))
    assert out.returncode == 0, out.stderr
    shipped = out.stdout.strip()
    assert sorted(os.listdir(tmp_path / "shipped")) == sorted(
        ["best-policy.safetensors", *map(os.path.basename, sidecars)]
    )
    art = ckptio.load_from_uri(shipped)
    assert art.training_metrics == {"reward": 0.9} and art.policy_architecture == MLPArch()
    assert all(r.status == "ok" for r in ckptio.verify(shipped))
    assert main(["export", str(run), shipped]) == 2 and "never overwrites" in capsys.readouterr().err
    # a header that points anywhere but beside the weights is refused, never followed
    meta = ckptio.formats.read_header(open(weights, "rb"), os.path.getsize(weights), weights).metadata
    with pytest.raises(ckptio.CorruptCheckpointError, match="not a file beside it"):
        ckptio.layout.Sidecars.of("x", {**meta, "ckptio.metrics_file": "../x.metrics.json"}, "src")


def test_cli_papercuts(tmp_path, policy, capsys):
    """--version; --storage-options after the subcommand; a closed pipe; files that are not checkpoints; empty ls.

    The closed pipe and --version go through a real process (file descriptors, argparse's exit);
    the rest through the command's main(), which the process runs.
    """
    run = str(tmp_path / "run")
    for epoch in range(3):
        ckptio.CheckpointManager(run).save_agent(policy, epoch)
    out = _ckptio("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ckptio {ckptio.__version__}"
    # the reader went away (ckptio inspect DIR | head -1): no error message, no traceback, exit 0
    proc = subprocess.Popen([sys.executable, "-m", "ckptio", "inspect", run], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and err == "", err
    # the option where users put it: parsed there (a bad value is reported, a good one works)
    assert main(["ls", run, "--storage-options", "{not json"]) == 2
    assert "--storage-options is not valid JSON" in capsys.readouterr().err
    assert main(["ls", run, "--storage-options", "{}"]) == 0 and len(capsys.readouterr().out.splitlines()) == 3
    # a text file named .safetensors, an existing file that is no checkpoint, an empty directory
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not tensors\n" * 10)
    other = tmp_path / "config.yaml"
    other.write_text("lr: 0.1\n")
    (tmp_path / "empty").mkdir()
    for args, needle in (
        (["inspect", str(text)], "not a safetensors file"),
        (["inspect", str(other)], "not a checkpoint file (a checkpoint ends in .safetensors or .pt)"),
        (["ls", str(tmp_path / "empty")], "no checkpoints in this directory"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert needle in err and len(err.splitlines()) == 1, (args, err)


def test_gs_without_a_server_is_one_line_at_once_through_the_real_command():
    """gcsfs retried a refused connection for 38-60 s, printing a traceback per retry (#19)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    opts = json.dumps({"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"})
    out = _ckptio("ls", "gs://bucket/run", "--storage-options", opts)
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"ckptio: error: gs://bucket/run: stat failed: cannot connect to http://127.0.0.1:{port}: "
        "[Errno 111] Connection refused"
    ], out.stderr


def test_an_export_that_does_not_verify_raises(tmp_path, policy):
    """export hands out only copies that verify: a damaged source is reported, not copied as if whole."""
    run = str(tmp_path / "run")
    src = ckptio.CheckpointManager(run).save_agent(policy, 1, {"score": 1.0})
    metrics = next(p for p in os.listdir(os.path.dirname(src)) if p.endswith(".metrics.json"))
    path = os.path.join(os.path.dirname(src), metrics)
    open(path, "w").write(open(path).read().replace("1.0", "2.0"))  # valid JSON, wrong digest
    with pytest.raises(ckptio.CorruptCheckpointError, match="does not verify"):
        ckptio.export(src, str(tmp_path / "copy") + "/")


def test_the_version_is_the_packages():
    """What manifests and ``--version`` report is the installed distribution's version."""
    import importlib.metadata

    assert ckptio.__version__ == importlib.metadata.version("ckptio")


def test_a_cli_warning_is_one_line(tmp_path, capsys):
    import shutil

    saved = ckptio.CheckpointManager(str(tmp_path / "run")).save_agent({"w": torch.ones(2)}, 1, {"r": 1})
    os.makedirs(tmp_path / "copy")
    shutil.copy(saved, tmp_path / "copy" / "x.safetensors")  # a copy without its metrics: loads, with a warning
    assert main(["inspect", str(tmp_path / "copy" / "x.safetensors")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ckptio: warning: ") and "not beside it" in err, err


@pytest.mark.parametrize("command", ["inspect", "ls", "convert", "export", "verify"])
def test_every_positional_argument_says_what_it_takes(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    section = text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    rows = [line.split(None, 1) for line in section.strip().splitlines() if not line.startswith("    " * 3)]
    assert rows and all(len(row) == 2 for row in rows), section
