"""Who this process is in a distributed job, and the few collectives checkpointing needs.

Rank facts come from ``torch.distributed`` when a process group is initialized, else from the
variables torchrun sets, else a single process. Collectives run on a gloo group: a non-master
rank waiting for the master to finish a minutes-long save must not sit in an NCCL collective,
whose watchdog would time out and kill the job.
"""

from __future__ import annotations

import collections
import datetime
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError

__all__ = [
    "Handoff",
    "RankInfo",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "exchange",
    "gather_results",
    "has_process_group",
    "is_master",
    "master_result",
    "raise_together",
    "rank_info",
    "together",
]

log = logging.getLogger("ckptio")

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
    """This process's rank, node-local rank and world sizes (a single process when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        return RankInfo(rank, dist.get_node_local_rank(fallback_rank=rank % local_world), world, local_world)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return RankInfo()
    rank = _env_int("RANK", 0)
    return RankInfo(rank, dist.get_node_local_rank(fallback_rank=0), world, _env_int("LOCAL_WORLD_SIZE", world))


def node_id() -> str:
    """Which node this process runs on: torchrun's node rank (GROUP_RANK) where it set one, else the host name."""
    group = os.environ.get("GROUP_RANK")
    return f"node {group}" if group is not None else socket.gethostname()


def is_master() -> bool:
    """True on global rank 0, the only rank that writes checkpoints (and in a single process)."""
    return rank_info().is_master


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def has_process_group() -> bool:
    """True when this job's ranks can talk to each other (torch.distributed initialized, more than one rank)."""
    return _distributed()


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


class Handoff:
    """Tensors handed to a gloo collective, kept referenced from C++ until long after gloo let go.

    A gloo worker thread drops its reference to a collective's tensors after the caller's wait()
    has returned. For a tensor made in Python whose only other owner is its Python object, that
    drop releases the Python object, which takes the GIL. If the main thread holds the GIL in a
    blocking C++ call at that moment (a process group's destructor joining those same threads, at
    ``destroy_process_group`` or at interpreter exit), the process hangs, or aborts with "terminate
    called without an active exception". A view keeps a C++ reference to its base, so with one kept
    here the worker's drop is never the one that reaches Python; the views are released by later
    collectives (on the calling thread), when gloo is long done with the tensors.
    """

    def __init__(self, keep: int) -> None:
        self._views: collections.deque[torch.Tensor] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            view = tensor.view(tensor.shape)
        with self._lock:
            self._views.append(view)
        return tensor


# the object collectives' tensors are a few bytes each: keep plenty (several collectives' worth)
_handed = Handoff(keep=512)


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled: the peers are this job's own ranks)."""
    if not _distributed():
        return [obj]
    group = _group() if group is None else group
    world = dist.get_world_size(group)
    payload = pickle.dumps(obj)
    hand = _handed
    size = hand(torch.tensor([len(payload)], dtype=torch.int64))
    sizes = [hand(torch.zeros(1, dtype=torch.int64)) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(t.item()) for t in sizes]
    data = hand(torch.zeros(max(lengths), dtype=torch.uint8))
    data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    out = [hand(torch.empty(max(lengths), dtype=torch.uint8)) for _ in range(world)]
    dist.all_gather(out, data, group=group)
    return [pickle.loads(t[:n].numpy().tobytes()) for t, n in zip(out, lengths, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (a small picklable value chosen by the master)."""
    if not _distributed():
        return obj
    group = _group()
    payload = pickle.dumps(obj) if dist.get_rank() == src else b""
    hand = _handed
    size = hand(torch.tensor([len(payload)], dtype=torch.int64))
    dist.broadcast(size, src=src, group=group)
    n = int(size.item())
    data = hand(torch.zeros(n, dtype=torch.uint8))
    if payload:
        data[:] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=group)
    return obj if dist.get_rank() == src else pickle.loads(data.numpy().tobytes())


def exchange(sends: Mapping[int, Sequence[bytes | memoryview]], sizes: Mapping[int, int]) -> dict[int, memoryview]:
    """Point-to-point on the gloo group: the parts in ``sends[r]`` to rank ``r``; ``sizes[r]`` bytes from rank ``r``.

    Both sides know every message's size (they plan it from the same facts), so no size travels
    first. Returns what arrived, by sender. Ranks given the same list of parts (a replicated resume:
    every node lacks the same bytes) share one send buffer.
    """
    group = _group()
    works, received = [], {}
    for src, n in sizes.items():
        if n:
            buf = torch.empty(n, dtype=torch.uint8)
            works.append(dist.irecv(buf, src=src, group=group))
            received[src] = buf
    packed: dict[int, torch.Tensor] = {}
    for dst, parts in sends.items():
        n = sum(len(p) for p in parts)
        if n:
            buf = packed.get(id(parts))  # the same list for several ranks: packed once
            if buf is None:
                buf = packed[id(parts)] = torch.empty(n, dtype=torch.uint8)
                view, at = memoryview(buf.numpy()), 0
                for part in parts:
                    view[at : at + len(part)] = part
                    at += len(part)
            works.append(dist.isend(buf, dst=dst, group=group))
    for work in works:
        work.wait()
    # point-to-point work is waited on, and released, on this thread (unlike a collective's, see Handoff)
    del works
    return {src: memoryview(buf.numpy()) for src, buf in received.items()}


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


def gather_results(fn: Callable[[], Any], group: Any = None) -> list[Any]:
    """Collective: every rank's ``fn()``, in rank order; if it raised on any rank, every rank raises.

    The failing rank raises its own error, the others the first failing rank's (typed where it
    travels): a check or I/O that one rank does inside a collective operation must stop the others
    promptly, not leave them waiting in the next collective until its timeout.
    """
    value: Any = None
    error: BaseException | None = None
    try:
        value = fn()
    except Exception as e:
        error = e
    if not _distributed():
        if error is not None:
            raise error
        return [value]
    me = rank_info().rank
    outcomes = all_gather_object((None, value) if error is None else (_for_others(error, me), None), group=group)
    if error is not None:
        raise error
    first = next((e for e, _ in outcomes if e is not None), None)
    if first is not None:
        raise first
    return [v for _, v in outcomes]


def together(fn: Callable[[], Any], *, here: bool = True) -> Any:
    """Collective: ``fn()`` on this rank (only where ``here``), its result here; if it raised on any rank, every
    rank raises (no other rank is left waiting in a later collective for one that failed)."""
    result: Any = None

    def local() -> None:
        nonlocal result
        if here:
            result = fn()

    gather_results(local)
    return result


def raise_together(error: BaseException | None, group: Any = None) -> None:
    """Collective: every rank raises if any rank's ``error`` is set (each its own, or the first other)."""

    def local() -> None:
        if error is not None:
            raise error

    gather_results(local, group)
