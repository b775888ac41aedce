"""Who this process is in a distributed job, and the few collectives checkpointing needs.

Rank facts come from ``torch.distributed`` when a process group is initialized, else from the
variables torchrun sets, else a single process. Collectives run on a gloo group: a non-master
rank waiting for the master to finish a minutes-long save must not sit in an NCCL collective,
whose watchdog would time out and kill the job.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .errors import CheckpointError

__all__ = [
    "RankInfo",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "is_master",
    "master_result",
    "raise_together",
    "rank_info",
]

# Checkpoint waits are bounded by how long a save or a download takes, not by a training step.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def is_local_master(self) -> bool:
        return self.local_rank == 0


def _env_int(name: str, default: int) -> int:
    # torch.distributed has no accessor for LOCAL_WORLD_SIZE (nor for WORLD_SIZE/RANK before init)
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank_info() -> RankInfo:
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        return RankInfo(rank, dist.get_node_local_rank(fallback_rank=rank % local_world), world, local_world)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return RankInfo()
    rank = _env_int("RANK", 0)
    return RankInfo(rank, dist.get_node_local_rank(fallback_rank=0), world, _env_int("LOCAL_WORLD_SIZE", world))


def is_master() -> bool:
    return rank_info().is_master


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_gloo_group: Any = None


def _group() -> Any:
    """A gloo group for CPU-side coordination (the default group itself when it is already gloo)."""
    global _gloo_group
    if dist.get_backend() == "gloo":
        return None
    if _gloo_group is None:  # collective: every rank reaches this on its first checkpoint collective
        _gloo_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    return _gloo_group


def barrier() -> None:
    if _distributed():
        dist.barrier(group=_group())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a small picklable value chosen by the master)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_group())
    return out


def _for_others(error: BaseException, rank: int) -> BaseException:
    """An error to raise on the ranks that did not fail: the same ckptio error where it travels."""
    if isinstance(error, CheckpointError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:
            pass
    return CheckpointError(f"rank {rank} failed: {type(error).__name__}: {error}")


def master_result(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on the master, its result on every rank; if it raises, every rank raises.

    A rank doing I/O that others wait for must tell them when it fails, or they wait in the
    collective until its timeout.
    """
    outcome: tuple[str, Any] | None = None
    error: BaseException | None = None
    if is_master():
        try:
            outcome = ("ok", fn())
        except Exception as e:
            error = e
            outcome = ("error", _for_others(e, rank_info().rank))
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def raise_together(error: BaseException | None) -> None:
    """Collective: every rank raises if any rank's ``error`` is set (each its own, or the first other)."""
    if not _distributed():
        if error is not None:
            raise error
        return
    me = rank_info().rank
    errors = all_gather_object(None if error is None else _for_others(error, me))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
