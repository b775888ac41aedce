"""Child-process bodies for the crash, race and reader/writer tests (run via a forkserver)."""

from __future__ import annotations

import json
import os

import torch

import ckptio
from ckptio.layout import MANIFEST_NAME
from ckptio.storage import Storage


def _warm_up() -> None:
    """Pay torch.optim's lazy imports once in the forkserver, not in every forked writer."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.sum().backward()
    opt.step()
    opt.state_dict()


_warm_up()


def _state(epoch: int, mib: int) -> dict[str, torch.Tensor]:
    # several tensors of mixed dtypes, values tied to the epoch so a mixed-up file is detectable
    n = mib * (1 << 20) // 4 // 4
    return {f"layer{i}.weight": torch.full((n,), float(epoch + i)) for i in range(4)} | {
        "step": torch.tensor(epoch, dtype=torch.int64),
        "half": torch.full((1024,), float(epoch), dtype=torch.bfloat16),
    }


def _report(log_path: str, epoch: int) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{epoch}\n".encode())  # one small append: atomic even if killed right after
    finally:
        os.close(fd)


def manager_writer(run_dir: str, log_path: str, started, keep_last: int, mib: int) -> None:
    torch.set_num_threads(1)
    mgr = ckptio.CheckpointManager(run_dir, keep_last=keep_last)
    try:
        epoch = mgr.latest().epoch + 1
    except ckptio.CheckpointNotFoundError:
        epoch = 0
    while True:
        trainer = ckptio.trainer_state.flatten({"epoch": epoch, "moments": torch.full((1024,), float(epoch))})
        mgr.save_agent(_state(epoch, mib), epoch, {"epoch": epoch}, trainer_state=trainer)
        _report(log_path, epoch)
        started.set()
        epoch += 1


def checkpointer_writer(run_dir: str, log_path: str, started, keep_last: int, mib: int) -> None:
    from archs import ENV, MLPArch

    torch.set_num_threads(1)
    ck = ckptio.Checkpointer(run_dir, MLPArch(hidden=256), ckptio.CheckpointConfig(keep_last=keep_last))
    policy = ck.load_or_create_policy(ENV)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1, momentum=0.9)
    if ck.trainer_state is not None:
        opt.load_state_dict(ck.trainer_state["optimizer"])
    epoch = max(ck.start_epoch, 1)
    while True:
        policy(torch.randn(8, ENV["obs_dim"])).pow(2).mean().backward()
        opt.step()
        ck.save(policy, epoch, {"epoch": epoch}, {"optimizer": opt.state_dict(), "epoch": epoch})
        _report(log_path, epoch)
        started.set()
        epoch += 1


def manifest_racer(run_dir: str, barrier, index: int, out_path: str) -> None:
    storage = Storage(run_dir)
    payload = json.dumps({"writer": index, "padding": "x" * (1 << 20)}).encode()
    barrier.wait()
    try:
        storage.write_bytes(MANIFEST_NAME, payload, exclusive=True)
        won = True
    except FileExistsError:
        won = False
    seen = storage.read_bytes(MANIFEST_NAME)
    with open(out_path, "w") as f:
        json.dump({"won": won, "seen_writer": json.loads(seen)["writer"], "seen_len": len(seen)}, f)


def saver_pruner(run_dir: str, saves: int, done) -> None:
    torch.set_num_threads(1)
    mgr = ckptio.CheckpointManager(run_dir, keep_last=2)
    for epoch in range(saves):
        mgr.save_agent(_state(epoch, 1), epoch, {"epoch": epoch})
    done.set()


def latest_reader(run_dir: str, done, out_path: str) -> None:
    torch.set_num_threads(1)
    loads, errors = 0, []
    while not done.is_set() or loads == 0:
        try:
            art = ckptio.load_from_uri(run_dir, verify=True)
            sd = art.state_dict
            expected = _state(art.epoch, 1)
            if sd.keys() != expected.keys() or not all(torch.equal(sd[k], expected[k]) for k in sd):
                errors.append(f"epoch {art.epoch}: content does not match")
            if art.training_metrics != {"epoch": art.epoch}:  # weights and metrics from one save, always
                errors.append(f"epoch {art.epoch}: metrics {art.training_metrics}")
            loads += 1
        except ckptio.CheckpointNotFoundError:
            if loads:  # before the first save there is legitimately nothing
                errors.append("latest vanished")
        except Exception as e:
            errors.append(repr(e))
    with open(out_path, "w") as f:
        json.dump({"loads": loads, "errors": errors}, f)
