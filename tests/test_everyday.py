"""Existing runs, URIs and scripts: ':latest' URIs, .pt training checkpoints, mock:// in the CLI, launch/ by path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

import ckptio
from ckptio.cli import main


@pytest.fixture
def run(tmp_path, policy):
    mgr = ckptio.CheckpointManager(str(tmp_path / "runs" / "x"))
    for epoch in (1, 2, 3):
        mgr.save_agent({k: v + epoch for k, v in policy.state_dict().items()}, epoch, {"epoch": epoch})
    return str(tmp_path / "runs" / "x")


def test_latest_suffix_on_every_form_of_directory_uri(run, capsys):
    for uri in (
        f"{run}/checkpoints:latest",
        f"file://{run}/checkpoints:latest",
        f"{run}:latest",  # a run directory means its checkpoints/
        f"{run}/checkpoints/:latest",
    ):
        art = ckptio.load_from_uri(uri)
        assert (art.epoch, art.training_metrics) == (3, {"epoch": 3}), uri
    assert [i.epoch for i in ckptio.list_checkpoints(f"{run}:latest")] == [1, 2, 3]
    assert main(["inspect", f"{run}/checkpoints:latest"]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 3
    assert main(["verify", f"{run}:latest"]) == 0
    with pytest.raises(ckptio.CheckpointNotFoundError, match="not a directory"):
        ckptio.load_from_uri(f"{run}/checkpoints/x.e00000003.safetensors:latest")


def test_latest_suffix_on_object_stores(s3, policy):
    opts = s3.options()
    uri = f"s3://{s3.make_bucket()}/runs/x"
    mgr = ckptio.CheckpointManager(uri, storage_options=opts)
    mgr.save_agent(policy, 4, {"epoch": 4})
    mgr.save_agent(policy, 5, {"epoch": 5})
    assert ckptio.load_from_uri(f"{uri}/checkpoints:latest", storage_options=opts).epoch == 5
    assert ckptio.load_from_uri(f"{uri}:latest", storage_options=opts).epoch == 5
    mem = ckptio.CheckpointManager("memory://everyday/run")
    mem.save_agent(policy, 9)
    assert ckptio.load_from_uri("memory://everyday/run/checkpoints:latest").epoch == 9


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict", "policy"])
def test_pt_training_checkpoints_load_their_weights_and_epoch(tmp_path, policy, key, capsys):
    opt = torch.optim.Adam(policy.parameters())
    policy(torch.randn(2, 6)).sum().backward()
    opt.step()
    path = str(tmp_path / "ckpt.pt")
    torch.save({key: policy.state_dict(), "optimizer": opt.state_dict(), "epoch": 7, "config": {"lr": 1e-3}}, path)
    art = ckptio.load_from_uri(path)
    assert art.epoch == 7
    assert all(torch.equal(art.state_dict[k], v) for k, v in policy.state_dict().items())
    assert main(["inspect", path]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights_key"] == key and info["epoch"] == 7


def test_a_pt_with_no_weights_says_what_it_holds(tmp_path):
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, tmp_path / "opt.pt")
    with pytest.raises(ckptio.CheckpointFormatError, match=r"keys \['epoch', 'optimizer'\]"):
        ckptio.load_from_uri(str(tmp_path / "opt.pt"))


def test_cli_inspects_mock_uris(capsys):
    assert main(["inspect", "mock://teacher"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "mock" and info["architecture"]["class_path"] == "ckptio.artifact.MockArchitecture"


def _by_path_env() -> dict[str, str]:
    """No PYTHONPATH: the script must find its own package, as when a user copies the command."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return env


SMALL = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "16", "--hidden", "16"]


def test_launch_scripts_run_by_path_with_python_and_torchrun(tmp_path):
    train = os.path.join(REPO_ROOT, "launch", "train.py")
    one = subprocess.run([sys.executable, train, "--run-dir", str(tmp_path / "one"), *SMALL],
                         cwd=tmp_path, env=_by_path_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", train,
         "--run-dir", str(tmp_path / "two"), *SMALL],
        cwd=tmp_path, env=_by_path_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    evaluate = os.path.join(REPO_ROOT, "launch", "evaluate.py")
    ev = subprocess.run([sys.executable, evaluate, "--uri", str(tmp_path / "two") + ":latest"],
                        cwd=tmp_path, env=_by_path_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["epoch"] == 2
    # both runs record the architecture under its package path, whichever way the script was started
    manifest = json.loads(open(tmp_path / "one" / "checkpoints" / "model_architecture.json").read())
    assert manifest["class_path"] == "launch.tasks.PolicyConfig"


def test_the_remote_uri_of_a_saved_checkpoint(tmp_path, policy):
    import uuid

    from archs import MLPArch

    remote = f"memory://everyday-{uuid.uuid4().hex[:8]}/run"
    seen = []
    cfg = ckptio.CheckpointConfig(remote_uri=remote, on_uploaded=seen.append)
    ck = ckptio.Checkpointer(str(tmp_path / "run"), MLPArch(), cfg)
    local = ck.save(policy, 1, {"r": 1.0})
    assert ck.latest_uri() == local and local.startswith(str(tmp_path))
    ck.wait()
    ck.uploader.wait()
    assert seen == [ck.latest_uri(remote=True)] and len(seen) == 1
    assert seen[0].startswith("memory://") and seen[0].endswith(
        remote[len("memory://") :] + "/checkpoints/run.e00000001.safetensors"
    )
    art = ckptio.load_from_uri(seen[0])  # what a remote evaluation job is handed
    assert art.epoch == 1 and art.training_metrics == {"r": 1.0}
    ck.close()


def test_invalid_arguments_are_value_errors(policy):
    with pytest.raises(ValueError, match="exactly one"):
        ckptio.PolicyArtifact(policy=policy, state_dict=policy.state_dict())
    with pytest.raises(ckptio.ArchitectureError):  # the type existing handlers catch still matches
        ckptio.PolicyArtifact()
    with pytest.raises(ValueError, match="keep_last"):
        ckptio.CheckpointManager("memory://x/run", keep_last=0)


def test_convert_and_inspect_never_import_the_users_architecture(tmp_path, policy, capsys, monkeypatch):
    import importlib

    from ckptio.formats import write_safetensors

    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    record = {"class_path": "models.TinyLMArch", "config": {"layers": 2}}  # the user's class, not importable here
    src = tmp_path / "run" / "run.e00000004.safetensors"
    src.parent.mkdir()
    with open(src, "wb") as f:
        write_safetensors(f, policy.state_dict(), {"ckptio.architecture": json.dumps(record), "ckptio.epoch": "4"})
    for dst in ("c.pt", "c.safetensors"):
        assert main(["convert", str(src), str(tmp_path / dst)]) == 0, capsys.readouterr().err
        assert main(["inspect", str(tmp_path / dst)]) == 0
        info = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after convert's printed URI
        assert info["architecture"] == record and info["epoch"] == 4
    assert imported == []
    with pytest.raises(ckptio.CheckpointSecurityError, match="allow-list"):  # building it still asks
        ckptio.load_from_uri(str(tmp_path / "c.safetensors")).instantiate({"obs_dim": 6, "num_actions": 3})


def _legacy_run(d):
    """A directory as the earlier tools left it, written exactly as they wrote it."""
    from safetensors.torch import save_file

    def sd(epoch):
        return {"w": torch.full((3,), float(epoch))}

    torch.save(sd(2), d / "agent__e2__s400__t3__sc0.9.pt")
    torch.save(sd(3), d / "agent:v3.pt")
    save_file(sd(4), str(d / "agent:v4.safetensors"))
    torch.save(sd(5), d / "agent__e5__s1000__t12.5__sc0.75.pt")
    (d / "agent:v6").mkdir()
    save_file(sd(6), str(d / "agent:v6" / "weights.safetensors"))
    (d / "agent:v6" / "policy_spec.json").write_text("{}")
    (d / "agent:v7").mkdir()  # a checkpoint directory still being written: no weights yet


def test_legacy_names_are_discovered_ordered_and_loaded(tmp_path, capsys):
    _legacy_run(tmp_path)
    d = str(tmp_path)
    assert [i.epoch for i in ckptio.list_checkpoints(d)] == [2, 3, 4, 5, 6]
    art = ckptio.load_from_uri(d)
    assert art.epoch == 6 and art.state_dict["w"][0].item() == 6.0
    assert ckptio.load_from_uri(f"{d}:latest").epoch == 6
    for one, epoch in (
        ("agent:v3.pt", 3),
        ("agent:v4.safetensors", 4),
        ("agent:v6", 6),
        ("agent:v6/weights.safetensors", 6),
    ):
        assert ckptio.load_from_uri(f"{d}/{one}").epoch == epoch, one
    old = ckptio.load_from_uri(f"{d}/agent__e5__s1000__t12.5__sc0.75.pt")
    assert old.epoch == 5 and old.training_metrics == {"agent_step": 1000, "time_s": 12.5, "score": 0.75}
    assert [i.epoch for i in ckptio.select_checkpoints(d, metric="score", count=2)] == [2, 5]
    assert main(["ls", d]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["2", "3", "4", "5", "6"]


def test_legacy_checkpoints_mix_with_ckptio_ones_and_are_never_written_or_pruned(tmp_path):
    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    _legacy_run(ckdir)
    legacy = set(os.listdir(ckdir))
    mgr = ckptio.CheckpointManager(str(tmp_path / "run"), keep_last=1, run_name="agent")
    assert mgr.latest().name == "agent:v6/weights.safetensors"  # a new job resumes the old run
    for epoch in (7, 8, 9):
        mgr.save_agent({"w": torch.full((3,), float(epoch))}, epoch)
    # new saves take ckptio's names; retention pruned ckptio's own, never the other tools' files
    assert set(os.listdir(ckdir)) == legacy | {"agent.e00000009.safetensors"}
    assert [i.epoch for i in mgr.list_checkpoints()] == [2, 3, 4, 5, 6, 9]
    assert ckptio.load_from_uri(str(tmp_path / "run")).epoch == 9


def test_allow_lets_a_launch_script_build_a_users_architecture(tmp_path):
    """evaluate.py builds only launch's classes unless told --allow MODULE (the import allow-list)."""
    from archs import MLPArch

    from launch.tasks import BanditTask

    arch = MLPArch()
    policy = arch.make_policy(BanditTask().metadata)
    uri = ckptio.save_policy_artifact(str(tmp_path / "user"), policy, arch, epoch=1)
    evaluate = [sys.executable, os.path.join(REPO_ROOT, "launch", "evaluate.py"), "--uri", uri, "--episodes", "50"]
    env = dict(_by_path_env(), PYTHONPATH=os.path.join(REPO_ROOT, "tests"))  # archs importable, not allowed
    refused = subprocess.run(evaluate, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "allow-list" in refused.stderr
    allowed = subprocess.run([*evaluate, "--allow", "archs"], env=env, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads(allowed.stdout.strip().splitlines()[-1])["policy"] == "MLP"


SCRIPT = """
import sys
import warnings
from dataclasses import dataclass

import torch

import ckptio


@dataclass
class TinyArch:
    hidden: int = 2

    def make_policy(self, env):
        return torch.nn.Linear(2, self.hidden)


if __name__ == "__main__":
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = ckptio.CheckpointManager(sys.argv[1])
        for epoch in (1, 2):
            mgr.save_agent(TinyArch().make_policy(None), epoch, policy_architecture=TinyArch())
    print("WARNINGS", sum("defined in the script being run" in str(w.message) for w in caught))
"""


def test_an_architecture_defined_in_the_running_script_is_recorded_importably_or_warned_about(tmp_path):
    """python -m pkg.script records pkg.script.TinyArch (another process builds it); a script run by path
    cannot be imported elsewhere: one warning at save time says how to fix it (#19)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("")
    (tmp_path / "pkgx" / "script.py").write_text(SCRIPT)
    env = subprocess_env(PYTHONPATH=str(tmp_path))
    runs = {}
    for how, cmd in (("module", ["-m", "pkgx.script"]), ("path", [str(tmp_path / "pkgx" / "script.py")])):
        run = str(tmp_path / how)
        out = subprocess.run([sys.executable, *cmd, run], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        runs[how] = (run, out.stdout)
    assert "WARNINGS 0" in runs["module"][1] and "WARNINGS 1" in runs["path"][1]  # once, though saved twice
    sys.path.insert(0, str(tmp_path))
    try:
        art = ckptio.load_from_uri(runs["module"][0], allow=["pkgx"])
        assert art.policy_architecture.__class__.__module__ == "pkgx.script"
        assert art.instantiate(None).weight.shape == (2, 2)
    finally:
        sys.path.remove(str(tmp_path))
    assert ckptio.load_from_uri(runs["path"][0]).policy_architecture.class_path == "__main__.TinyArch"


def test_resuming_a_pt_training_checkpoint_keeps_its_optimizer(tmp_path, policy, env_meta):
    """{"model", "optimizer", "epoch"}: the weights, the epoch and the optimizer all come back (#19)."""
    from archs import MLPArch

    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    policy(torch.randn(4, env_meta["obs_dim"])).sum().backward()
    opt.step()
    run = tmp_path / "agent"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(
        {"model": policy.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "scheduler": {"last_epoch": 3}},
        run / "checkpoints" / "agent:v3.pt",
    )
    ck = ckptio.Checkpointer(str(run), MLPArch())
    model = ck.load_or_create_policy(env_meta)
    assert ck.start_epoch == 4 and torch.equal(model.head.weight, policy.head.weight)
    assert set(ck.trainer_state) == {"optimizer", "epoch", "scheduler"}
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(ck.trainer_state["optimizer"])  # as the README's loop restores a user's optimizer
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(fresh.state_dict()["state"][i][k], v), (i, k)
    # the FQN-keyed restore cannot map parameter indices by itself: it says what to do instead of guessing
    with pytest.raises(ckptio.CheckpointError, match=r"optimizer.load_state_dict\(ckpt.trainer_state\['optimizer'\]\)"):
        ck.load_optimizer(model, fresh)


def test_convert_migrates_a_run_keeping_optimizers_and_verify_reports_every_file(tmp_path, policy, env_meta, capsys):
    """convert OLD NEW/ renames a legacy run to ckptio's names with epochs and optimizers; verify misses no file (#19)."""
    from archs import MLPArch

    from ckptio.cli import main

    old = tmp_path / "old"
    old.mkdir()
    _legacy_run(old)
    opt = torch.optim.Adam(policy.parameters())
    policy(torch.randn(2, env_meta["obs_dim"])).sum().backward()
    opt.step()
    torch.save({"model": policy.state_dict(), "optimizer": opt.state_dict(), "epoch": 9}, old / "agent:v9.pt")
    # one file: the optimizer and epoch go with it
    assert main(["convert", str(old / "agent:v9.pt"), str(tmp_path / "one.safetensors")]) == 0
    from ckptio.layout import read_trainer_state
    from ckptio.storage import Storage
    from ckptio.trainer_state import unflatten

    meta = ckptio.inspect_checkpoint(str(tmp_path / "one.safetensors"))
    assert meta["epoch"] == 9 and len(meta["files"]) == 2  # weights and trainer state
    one = Storage(str(tmp_path))
    header = ckptio.layout.read_metadata(one, "one.safetensors")
    tree = unflatten(*read_trainer_state(one, "one.safetensors", header))
    assert tree["epoch"] == 9 and torch.equal(
        tree["user"]["optimizer"]["state"][0]["exp_avg"], opt.state[policy.embed.weight]["exp_avg"]
    )
    # a whole run, into a run directory: ckptio names, every epoch, verified, resumable
    capsys.readouterr()
    assert main(["convert", str(old), str(tmp_path / "new") + "/"]) == 0
    assert [i.epoch for i in ckptio.list_checkpoints(str(tmp_path / "new"))] == [2, 3, 4, 5, 6, 9]
    assert all(i.name.startswith("new.e0000000") for i in ckptio.list_checkpoints(str(tmp_path / "new")))
    assert all(r.ok for r in ckptio.verify(str(tmp_path / "new")))
    ck = ckptio.Checkpointer(str(tmp_path / "new"), MLPArch())
    ck.load_or_create_policy(env_meta)
    assert ck.start_epoch == 10 and "optimizer" in ck.trainer_state
    # verify DIR: a copy under another name is verified, a file of no checkpoint is reported, not skipped
    ckpts = tmp_path / "new" / "checkpoints"
    (ckpts / "best.safetensors").write_bytes((ckpts / "new.e00000004.safetensors").read_bytes())
    (ckpts / "notes.txt").write_text("hi")
    results = {os.path.basename(r.uri): r for r in ckptio.verify(str(tmp_path / "new"))}
    assert results["best.safetensors"].status == "ok"
    assert results["notes.txt"].status == "unverified" and "not a file of any checkpoint" in results["notes.txt"].detail
    assert "model_architecture.json" not in results
