"""Sharded state dicts (DTensor parameters, as FSDP2 and tensor parallelism make them).

Saving: every rank takes part, the master writes (``ShardedSave``). ``ShardGather`` sends each rank's blocks of one
tensor (or of a batch of small ones) at a time to the master over a gloo group of its own, as the master's writer
reaches it; the file is one standard safetensors file of the full tensors, and the master holds a few full tensors
at a time. The master announces each tensor or batch (or that it failed, or finished) with a broadcast, so no rank
waits on the master's disk inside an accelerator collective, and a failed write stops every rank.

Loading: each rank slices its own block of every tensor out of the memory-mapped file, so it
reads only those bytes, at any world size and placement.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as _torch_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

# the only public-enough way to know which block of a global tensor a rank holds; DCP uses it too
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointSaveError,
    InvalidArgumentError,
    StateDictMismatchError,
    save_failed,
)
from .formats import LazyTensor, StoredTensor, data_order
from .layout import PendingSave, canonical_name, named_parameters, unwrap_module
from .ranks import Handoff, all_gather_object, raise_together
from .trainer_state import FlatTrainerState, capture_rng_state, flatten

__all__ = [
    "ShardGather",
    "ShardedSave",
    "has_dtensors",
    "load_model_state",
    "resume_reads",
    "load_optimizer_state",
    "model_state",
    "new_group",
    "optimizer_state",
    "renames_state",
    "trainer_state_of",
]

log = logging.getLogger("ckptio")

_DONE, _ABORT = -1, -2
_MAX_BATCH = 1024  # tensors announced together at most (the announcement is one int64 each)
# the tensors sent and received (see ranks.Handoff); blocks can be large, so only the last few
_blocks = Handoff(keep=4)
_handed = Handoff(keep=64)


def has_dtensors(*tensor_dicts: Mapping[str, Any]) -> bool:
    return any(isinstance(v, DTensor) for d in tensor_dicts for v in d.values())


def new_group(timeout_s: float) -> Any:
    """Collective: a gloo group of all ranks for sharded saves, apart from the training's own groups."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def renames_state(model: torch.nn.Module) -> bool:
    """Whether a module's own state-dict hook renames what it saves (a fused parameter saved as its parts, as
    torchtitan's fused QKV is): torch's state-dict APIs look each key up as an attribute and cannot follow."""
    for module in unwrap_module(model).modules():
        hooks = [getattr(h, "hook", h) for h in module._state_dict_hooks.values()]
        hooks += [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()]
        if not all(getattr(h, "__module__", "").startswith(_COPY_SAFE_HOOKS) for h in hooks):
            return True
    return False


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict by FQN (no wrapper prefixes), DTensors left sharded."""
    if renames_state(model):  # the module's own state_dict names what it saves; its load_state_dict takes it back
        return {canonical_name(k): v for k, v in unwrap_module(model).state_dict().items()}
    return dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))


_no_init_lock = threading.Lock()


@contextlib.contextmanager
def _optimizer_as_it_is() -> Any:
    """torch's optimizer state-dict APIs, without their initialisation of an optimizer that has no state.

    ``get_/set_optimizer_state_dict`` run a step with lr=0 on an optimizer with no state, so that
    Adam has state to save: the never-stepped optimizer then has ``step == 1`` and its user's step
    hooks ran, and training after the save differs from training without it. A save observes; an
    optimizer with no state is saved (and restored) with none.
    """
    init = getattr(_torch_state_dict, "_init_optim_state", None)
    if init is None:  # a torch without it has nothing to undo
        yield
        return
    with _no_init_lock:
        _torch_state_dict._init_optim_state = lambda optim: None
        try:
            yield
        finally:
            _torch_state_dict._init_optim_state = init


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter FQN, as torch.distributed.checkpoint defines it; touches nothing."""
    with _optimizer_as_it_is():
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))


def trainer_state_of(policy: Any, epoch: int, user: Any, optimizer: torch.optim.Optimizer | None) -> FlatTrainerState:
    """Every rank: the trainer state a save stores: the user's, the epoch, every rank's RNG state (gathered) and
    the optimizer's, keyed by parameter FQN."""
    tree = {"user": user, "epoch": epoch, "rng": all_gather_object(capture_rng_state())}
    if optimizer is not None:
        if not isinstance(policy, torch.nn.Module):
            raise InvalidArgumentError("save(optimizer=...) needs the model itself, not a state dict")
        tree["optimizer"] = optimizer_state(policy, optimizer)
    return flatten(tree)


@dataclass
class _Block:
    """One rank's part of a global tensor: where it sits, and (on its own rank) its data."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    local: torch.Tensor | None = None


@functools.lru_cache(maxsize=65536)
def _placement_block(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> tuple[Any, Any]:
    # the same few (shape, mesh, placements) recur for every save and every optimizer state of a
    # parameter; computing them is most of the metadata cost a background save puts on the training thread
    return compute_local_shape_and_global_offset(shape, mesh, placements)


def _block_of(t: DTensor, name: str) -> _Block:
    if any(p.is_partial() for p in t.placements):  # each rank holds a summand, not a block: no rank's is the value
        raise CheckpointFormatError(f"{name} has placements {t.placements}, a pending reduction; reduce it first")
    shape, offset = _placement_block(tuple(t.shape), t.device_mesh, tuple(t.placements))
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointSaveError(
            f"{name}: the local shard on rank {dist.get_rank()} is {list(local.shape)}, its placements say "
            f"{list(shape)} (padded shards are not supported)"
        )
    return _Block(tuple(shape), tuple(offset), local)


def _region(full: torch.Tensor, block: _Block) -> torch.Tensor:
    return full[tuple(slice(o, o + s) for o, s in zip(block.offset, block.shape, strict=True))]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # gloo moves bytes: any dtype travels as uint8 (bool, float8 and complex included)
    return t.contiguous().reshape(-1).view(torch.uint8)


_FILE_LABELS = {"w": "weights", "t": "trainer state"}


def _spec(t: torch.Tensor) -> tuple[Any, ...]:
    """What every rank must agree on about one saved tensor: dtype, global shape and, if sharded, placement."""
    if isinstance(t, DTensor):
        return (str(t.dtype), tuple(t.shape), tuple(map(str, t.placements)), tuple(t.device_mesh.shape))
    return (str(t.dtype), tuple(t.shape))


def _describe(files: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, tuple[Any, ...]]:
    """The tensors every rank must hold alike: every DTensor, and every weight (plain trainer tensors are the master's)."""
    return {
        f"{label}/{key}": _spec(t)
        for label, tensors in files.items()
        for key, t in tensors.items()
        if label == "w" or isinstance(t, DTensor)
    }


def _shown(entry: str) -> str:
    label, _, key = entry.partition("/")
    key = key.split(":", 1)[1].lstrip("/") if label == "t" and ":" in key else key  # "12:/optimizer/..." as a path
    return f"{key} ({_FILE_LABELS.get(label, label)})"


def _shown_spec(spec: tuple[Any, ...]) -> str:
    text = f"{spec[0].removeprefix('torch.')}{list(spec[1])}"
    return text + (f" {'/'.join(spec[2])} on mesh {list(spec[3])}" if len(spec) > 2 else " (not sharded)")


def _disagreement(described: list[dict[str, tuple[Any, ...]]], source: str) -> StateDictMismatchError:
    """Which tensors differ between each rank and the master, as one error every rank raises alike."""
    lines = []
    master = {_shown(k): v for k, v in described[0].items()}
    for rank, raw in enumerate(described[1:], start=1):
        mine = {_shown(k): v for k, v in raw.items()}
        lines += [f"  {k}: on rank 0, not on rank {rank}" for k in sorted(master.keys() - mine.keys())]
        lines += [f"  {k}: on rank {rank}, not on rank 0" for k in sorted(mine.keys() - master.keys())]
        lines += [
            f"  {k}: rank 0 {_shown_spec(master[k])}, rank {rank} {_shown_spec(mine[k])}"
            for k in sorted(master.keys() & mine.keys())
            if master[k] != mine[k]
        ]
        if raw != described[0] and mine == master:  # the same paths, numbered differently in the trainer state
            lines.append(f"  trainer state: rank {rank} holds its tensors in another order than rank 0")
    more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
    return StateDictMismatchError(
        f"{source}: the ranks hold different state dicts to save; nothing was written\n" + "\n".join(lines[:20]) + more
    )


class ShardGather:
    """One sharded save, on every rank: the plan of who sends which block, then the transfers.

    ``files`` maps a file label to its tensors (DTensor values are sharded; others are the
    master's own); ``prepare(blocks)`` runs on this rank's blocks first (a background save's
    snapshot). Building it is a collective on ``group``: every rank first proves it holds the
    same tensors as the master (names, dtypes, global shapes, placements: one digest each, the
    details only when they differ), so no byte moves and nothing is written unless they agree.
    A failure on any rank while planning raises on every rank.
    """

    def __init__(
        self,
        group: Any,
        files: Mapping[str, Mapping[str, torch.Tensor]],
        source: str,
        prepare: Callable[[dict[tuple[str, str], _Block]], None] | None = None,
    ):
        self.group, self.source = group, source
        self.me = dist.get_rank()

        described = _describe(files)
        digest = hashlib.sha256(repr(sorted(described.items())).encode()).hexdigest()
        self.blocks: dict[tuple[str, str], _Block] = {}
        error: BaseException | None = None
        try:
            self.blocks = {
                (label, key): _block_of(t, f"{source}: {_shown(f'{label}/{key}')}")
                for label, tensors in files.items()
                for key, t in tensors.items()
                if isinstance(t, DTensor)
            }
            if prepare is not None:  # a background save's snapshot: its failure travels in the same collective
                prepare(self.blocks)
        except Exception as e:  # reported after the agreement check, which names the cause when ranks differ
            error = e
        layout = [(self.blocks[e].shape, self.blocks[e].offset) for e in sorted(self.blocks)]
        everyone = all_gather_object((digest, layout, error is not None), group=group)
        if len({d for d, _, _ in everyone}) > 1:  # every rank sees it: all enter the details' gather
            raise _disagreement(all_gather_object(described, group=group), source)
        if any(failed for _, _, failed in everyone):
            raise_together(error, group)
        self.entries = sorted(self.blocks)  # every rank the same order: the same DTensors, by label and key
        self.specs = {
            (label, key): (t.dtype, tuple(t.shape))
            for label, tensors in files.items()
            for key, t in tensors.items()
            if isinstance(t, DTensor)
        }
        # one provider per distinct block (replicas hold the same bytes): the lowest rank
        self.providers: list[list[tuple[int, _Block]]] = []
        for i in range(len(self.entries)):
            seen: dict[tuple[Any, ...], int] = {}
            for rank, (_, blocks_of_rank, _) in enumerate(everyone):
                shape, offset = blocks_of_rank[i]
                if all(s > 0 for s in shape) and (shape, offset) not in seen:
                    seen[(shape, offset)] = rank
            self.providers.append([(r, _Block(tuple(s), tuple(o))) for (s, o), r in seen.items()])
        self._index = {e: i for i, e in enumerate(self.entries)}
        self._batch_of: dict[int, tuple[int, ...]] = {}  # the master's: which tensors travel together
        self._ready: dict[int, torch.Tensor] = {}  # the master's: tensors of a batch not yet reached by the writer

    def lazy(
        self, label: str, tensors: Mapping[str, torch.Tensor], ahead: int = 0, batch_bytes: int = 0
    ) -> dict[str, torch.Tensor | LazyTensor]:
        """The master's view of one file: DTensors become tensors gathered as the writer reaches them (up to
        ``ahead`` tensors before, overlapping the writes). Tensors smaller than ``batch_bytes`` travel together,
        in the writer's order, up to ``batch_bytes`` per message: one round trip for many small ones."""
        out: dict[str, torch.Tensor | LazyTensor] = {}
        for key, t in tensors.items():
            if isinstance(t, DTensor):
                dtype, shape = self.specs[(label, key)]
                gather = functools.partial(self._materialize, self._index[(label, key)])
                out[key] = LazyTensor(dtype, shape, gather, ahead=ahead)
            else:
                out[key] = t
        batch: list[int] = []
        size = 0
        # the writer's order is by decreasing element size: each block in a batch's message starts aligned
        for key in data_order(out):
            t = out[key]
            if not isinstance(t, LazyTensor):
                continue
            i, n = self._index[(label, key)], t.numel() * t.element_size()
            if n >= batch_bytes:
                self._batch_of[i] = (i,)
                continue
            if size + n > batch_bytes or len(batch) == _MAX_BATCH:
                self._batch_of.update(dict.fromkeys(batch, tuple(batch)))
                batch, size = [], 0
            batch.append(i)
            size += n
        self._batch_of.update(dict.fromkeys(batch, tuple(batch)))
        return out

    def _materialize(self, i: int) -> torch.Tensor | list[torch.Tensor]:
        """Master: tensor ``i``, gathered with the rest of its batch when the writer first reaches one of them."""
        ready = self._ready.pop(i, None)
        if ready is not None:
            return ready
        batch = self._batch_of.get(i, (i,))
        self._tell(len(batch), batch)
        if len(batch) == 1:
            return self._gather(i)
        self._ready.update(self._gather_batch(batch))
        return self._ready.pop(i)

    def _tell(self, count: int, entries: tuple[int, ...] = (0,)) -> None:
        """Master: announce the next ``count`` tensors, ``entries``, to every rank (or, as ``count``, ``_DONE``/
        ``_ABORT``); the first travels in the head, the others after it."""
        head = _handed(torch.tensor([count, entries[0]], dtype=torch.int64))
        dist.broadcast(head, src=0, group=self.group)
        if count > 1:
            dist.broadcast(_handed(torch.tensor(entries, dtype=torch.int64)), src=0, group=self.group)

    def _hear(self) -> tuple[int, list[int]]:
        """Every rank but the master: the master's announcement, as (count, or ``_DONE``/``_ABORT``; the tensors)."""
        head = _handed(torch.zeros(2, dtype=torch.int64))
        dist.broadcast(head, src=0, group=self.group)
        count, first = (int(v) for v in head.tolist())
        if count <= 1:
            return count, [first]
        entries = _handed(torch.zeros(count, dtype=torch.int64))
        dist.broadcast(entries, src=0, group=self.group)
        return count, entries.tolist()

    def _gather_batch(self, batch: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Master: several small tensors in full, from one message per rank holding blocks of them (its blocks
        back to back, in the batch's order)."""
        sizes: dict[int, int] = {}
        for i in batch:
            itemsize = self.specs[self.entries[i]][0].itemsize
            for rank, block in self.providers[i]:
                if rank != self.me:
                    sizes[rank] = sizes.get(rank, 0) + math.prod(block.shape) * itemsize
        received = {}
        for rank, n in sorted(sizes.items()):
            received[rank] = torch.empty(n, dtype=torch.uint8)
            dist.recv(_blocks(received[rank]), src=rank, group=self.group)
        at = dict.fromkeys(received, 0)
        out = {}
        for i in batch:
            dtype, shape = self.specs[self.entries[i]]
            full = torch.empty(shape, dtype=dtype)
            for rank, block in self.providers[i]:
                if rank == self.me:
                    part = self.blocks[self.entries[i]].local
                else:
                    n = math.prod(block.shape) * dtype.itemsize
                    part = received[rank][at[rank] : at[rank] + n].view(dtype).reshape(block.shape)
                    at[rank] += n
                _region(full, block).copy_(part)
            out[i] = full
        return out

    def _gather(self, i: int) -> torch.Tensor | list[torch.Tensor]:
        """Master, once ``i`` is announced: tensor ``i`` in full, each block from the rank that provides it; blocks
        along the first dimension that follow each other are returned as those pieces (the master's own written
        from where it lies)."""
        dtype, shape = self.specs[self.entries[i]]
        rows = sorted(self.providers[i], key=lambda p: p[1].offset)
        ends = [0] + [b.offset[0] + b.shape[0] for _, b in rows]
        if shape and all(b.shape[1:] == shape[1:] and not any(b.offset[1:]) for _, b in rows) and all(
            b.offset[0] == ends[k] for k, (_, b) in enumerate(rows)
        ) and ends[-1] == shape[0]:  # fmt: skip
            pieces = []
            for rank, block in rows:
                if rank == self.me:
                    pieces.append(self.blocks[self.entries[i]].local)
                else:
                    buf = torch.empty(block.shape, dtype=dtype)
                    dist.recv(_blocks(_as_bytes(buf)), src=rank, group=self.group)
                    pieces.append(buf)
            return pieces
        full = torch.empty(shape, dtype=dtype)
        for rank, block in self.providers[i]:
            region = _region(full, block)
            if rank == self.me:
                region.copy_(self.blocks[self.entries[i]].local)
            elif region.is_contiguous():  # a block along the first dimension: straight into place, no copy
                dist.recv(_blocks(_as_bytes(region)), src=rank, group=self.group)
            else:
                buf = torch.empty(block.shape, dtype=dtype)
                dist.recv(_blocks(_as_bytes(buf)), src=rank, group=self.group)
                region.copy_(buf)
        return full

    def finish(self, ok: bool) -> None:
        """Master: tell every rank the save is over (``ok``) or failed."""
        self._tell(_DONE if ok else _ABORT)

    def serve(self) -> None:
        """Every rank but the master: send this rank's blocks of the tensors the master announces, in one message."""
        while True:
            i, batch = self._hear()
            if i == _DONE:
                return
            if i == _ABORT:
                raise CheckpointSaveError(
                    f"{self.source}: the master's save failed (its error is raised on the master)"
                )
            mine = [
                _as_bytes(self.blocks[self.entries[j]].local.cpu())
                for j in batch
                if any(rank == self.me for rank, _ in self.providers[j])
            ]
            if mine:
                dist.send(_blocks(mine[0] if len(mine) == 1 else torch.cat(mine)), dst=0, group=self.group)


class ShardedSave:
    """One sharded save as one unit, on every rank: the plan (every rank agrees, then who sends which block) and a
    background save's snapshot of this rank's blocks, then ``write``: the master streams the gathered file while
    the other ranks send their blocks, and the master ends it with done or abort.

    Building it is the collective part, on the caller's thread (background saves too): ranks that disagree, or
    one that cannot plan or snapshot, fail here together. ``snapshot(tensors, prefix)`` copies tensors the
    training thread may go on changing (None: the save is written before the caller goes on).
    """

    def __init__(
        self,
        group: Any,
        job: PendingSave,
        snapshot: Callable[..., Mapping[str, torch.Tensor]] | None,
        *,
        ahead: int = 2,
        batch_bytes: int = 0,
        ties: Mapping[str, str] | None = None,
    ):
        # a tie is gathered and stored once, under its first name, the others aliases of it (as an unsharded save
        # stores it): every rank leaves the same names out of the plan, as the module's structure names them
        self.ties = {a: n for a, n in (ties or {}).items() if a in job.weights and n in job.weights}
        if self.ties:
            job = replace(job, weights={k: v for k, v in job.weights.items() if k not in self.ties})
        self.ahead = ahead  # tensors the master gathers ahead of its writer: its RAM is at most ahead + 1 of them
        self.batch_bytes = batch_bytes  # small tensors travel together, this many bytes of them at most
        target = job.checkpoint.uri
        if job.checkpoint.format != "safetensors":
            raise CheckpointFormatError(f"{target}: a sharded (DTensor) model is saved as safetensors only")
        files: dict[str, Mapping[str, torch.Tensor]] = {"w": job.weights}
        if job.trainer is not None:
            files["t"] = job.trainer[0]
        master = dist.get_rank() == 0

        def prepare(blocks: dict[tuple[str, str], _Block]) -> None:
            if snapshot is None:
                return
            local = snapshot({f"{lb}/{k}": b.local for (lb, k), b in blocks.items()}, "s.")
            for (lb, k), b in blocks.items():
                b.local = local[f"{lb}/{k}"]
            if master:  # the master's own plain tensors: the rest of what it writes
                for label, d in files.items():
                    plain = {k: v for k, v in d.items() if (label, k) not in blocks}
                    files[label] = {**d, **snapshot(plain, f"{label}.")}

        try:
            self._gather = ShardGather(group, files, target, prepare)
        except CheckpointError:
            raise
        except Exception as e:  # the gloo group itself failed: a rank died or timed out
            raise save_failed(target, "planning the sharded save", e) from e
        trainer = (files["t"], job.trainer[1]) if job.trainer is not None else None
        self.job = replace(job, weights=files["w"], trainer=trainer)
        if snapshot is not None:
            self.job = self.job.copied()

    def write(self, write: Callable[[PendingSave], None]) -> None:
        """Every rank: on the master, ``write`` the save with its tensors gathered as the writer reaches them."""
        target = self.job.checkpoint.uri
        if dist.get_rank() != 0:
            try:
                self._gather.serve()
            except CheckpointError:
                raise
            except Exception as e:
                raise save_failed(target, "sending this rank's shards to the master", e) from e
            return
        ok = False
        try:
            job = self.job
            lazy = functools.partial(self._gather.lazy, ahead=self.ahead, batch_bytes=self.batch_bytes)
            trainer = (lazy("t", job.trainer[0]), job.trainer[1]) if job.trainer is not None else None
            weights = lazy("w", job.weights)
            weights.update({alias: weights[name] for alias, name in self.ties.items()})
            write(replace(job, weights=weights, trainer=trainer))
            ok = True
        finally:
            try:
                self._gather.finish(ok)
            except Exception as e:
                if ok:
                    raise save_failed(target, "telling the other ranks the save finished", e) from e
                log.error("could not tell the other ranks the save failed: %r", e)


def resume_reads(current: Mapping[str, torch.Tensor]) -> Callable[[str, str, tuple[int, ...]], Any]:
    """What this rank reads of a checkpoint to resume a model whose ``model_state`` is ``current`` (see
    ``layout.Want``): its block of each sharded parameter and of the optimizer state shaped like it, every other
    tensor whole; nothing of tensors it lacks."""
    blocks = {
        fqn: (tuple(v.shape), _placement_block(tuple(v.shape), v.device_mesh, tuple(v.placements)))
        for fqn, v in current.items()
        if isinstance(v, DTensor)
    }

    def want(label: str, key: str, shape: tuple[int, ...]) -> Any:
        fqn = key
        if label == "trainer":  # "12:/optimizer/state/<fqn>/exp_avg" (see trainer_state.flatten)
            path = key.split(":", 1)[-1]
            fqn = (
                path.removeprefix("/optimizer/state/").rpartition("/")[0]
                if path.startswith("/optimizer/state/")
                else ""
            )
        elif key not in current:
            return None
        if fqn in blocks and blocks[fqn][0] == tuple(shape):
            local_shape, offset = blocks[fqn][1]
            return tuple(offset), tuple(local_shape)
        return (0,) * len(shape), tuple(shape)

    return want


def _whole(t: torch.Tensor | StoredTensor) -> torch.Tensor:
    return t.read() if isinstance(t, StoredTensor) else t


def _local_block(full: torch.Tensor | StoredTensor, like: DTensor) -> torch.Tensor:
    """``like``'s own block of ``full``: a view of the mapped file, read when copied."""
    block = _Block(*_placement_block(tuple(full.shape), like.device_mesh, tuple(like.placements)))
    part = full.region(block.offset, block.shape) if isinstance(full, StoredTensor) else _region(full, block)
    if like.device_mesh.device_type != "cpu":
        part = part.to(like.device_mesh.device_type)
    return part


def _local_part(full: torch.Tensor | StoredTensor, like: DTensor) -> DTensor:
    """``like``'s own block of ``full`` as a DTensor."""
    return DTensor.from_local(
        _local_block(full, like), like.device_mesh, like.placements, run_check=False, shape=full.shape,
        stride=full.stride(),
    )  # fmt: skip


def _diff(
    saved: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    source: str,
    *,
    missing_ok: bool = False,
    unexpected_ok: bool = False,
) -> None:
    missing = [] if missing_ok else sorted(current.keys() - saved.keys())
    unexpected = [] if unexpected_ok else sorted(saved.keys() - current.keys())
    shapes = [
        f"{k}: checkpoint {list(saved[k].shape)}, model {list(current[k].shape)}"
        for k in sorted(current.keys() & saved.keys())
        if tuple(saved[k].shape) != tuple(current[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not match the model"]
        lines += [f"  missing from checkpoint: {k}" for k in missing[:20]]
        lines += [f"  not in model: {k}" for k in unexpected[:20]]
        lines += [f"  shape {s}" for s in shapes[:20]]
        raise StateDictMismatchError("\n".join(lines))


# FSDP2's load hooks: they bring a parameter back to its sharded form before a load (a state-dict read already
# did), and re-pad a local shard whose memory the load replaced (a copy into it replaces none)
_COPY_SAFE_HOOKS = ("torch.distributed.fsdp._fully_shard.",)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _loads_by_copy(model: torch.nn.Module, current: Mapping[str, torch.Tensor]) -> bool:
    """Whether copying into ``current`` is all that ``load_state_dict`` would do to ``model``: every tensor is the
    model's own memory (not a copy), and no module loads in a way of its own (an override or a
    hook)."""
    root = unwrap_module(model)
    for module in root.modules():
        if type(module)._load_from_state_dict is not torch.nn.Module._load_from_state_dict:
            return False
        hooks = [getattr(h, "hook", h) for h in module._load_state_dict_pre_hooks.values()]
        hooks += list(module._load_state_dict_post_hooks.values())
        if not all(getattr(h, "__module__", "").startswith(_COPY_SAFE_HOOKS) for h in hooks):
            return False
    own = {canonical_name(n): t for n, t in root.named_parameters(remove_duplicate=False)}
    own |= {canonical_name(n): t for n, t in root.named_buffers(remove_duplicate=False)}
    for key, t in current.items():
        mine, theirs = _local(t), _local(own[key]) if key in own else None
        if theirs is None or (mine.numel() and mine.data_ptr() != theirs.data_ptr()):
            return False
        if (mine.shape, mine.stride(), mine.dtype) != (theirs.shape, theirs.stride(), theirs.dtype):
            return False
    return True


def load_model_state(
    model: torch.nn.Module,
    current: Mapping[str, torch.Tensor],
    saved: Mapping[str, torch.Tensor],
    source: str,
    *,
    missing_ok: bool = False,
    unexpected_ok: bool = False,
) -> None:
    """Fill ``model`` (sharded or not, allocated; ``current`` is its ``model_state``) from full saved tensors: each
    rank copies its block. ``missing_ok``: the model's tensors the checkpoint lacks stay as they are;
    ``unexpected_ok``: the checkpoint's tensors the model lacks are skipped. A shape that differs is always refused."""
    _diff(saved, current, source, missing_ok=missing_ok, unexpected_ok=unexpected_ok)
    kept = {k: v for k, v in current.items() if k in saved}
    if len(kept) < len(current) or len(kept) < len(saved):
        log.info("%s: loaded %d of the model's %d tensors (%d of the checkpoint's skipped)", source, len(kept),
                 len(current), len(saved) - len(kept))  # fmt: skip
    current = kept
    on_meta = sorted(k for k, v in current.items() if _local(v).is_meta)
    if on_meta:  # torch's load would copy into nothing, warn, and leave the model empty
        raise InvalidArgumentError(
            f"{source}: the model's {', '.join(on_meta[:3])}{' ...' if len(on_meta) > 3 else ''} on the meta device "
            "have no memory to load into: allocate the model first (model.to_empty(device=...)), then load"
        )
    if _loads_by_copy(model, current):
        # each block straight into the rank's own memory: torch's state-dict load would make every block a
        # DTensor and copy it through DTensor dispatch, a millisecond of CPU per tensor
        with torch.no_grad():
            for k, v in current.items():
                _local(v).copy_(_local_block(saved[k], v) if isinstance(v, DTensor) else _whole(saved[k]))
        return
    new = {k: _local_part(saved[k], v) if isinstance(v, DTensor) else _whole(saved[k]) for k, v in current.items()}
    if renames_state(model):  # its hooks turn the saved names back into its parameters
        result = unwrap_module(model).load_state_dict(new, strict=False)
        left = [k for k in result.missing_keys if not missing_ok] + list(result.unexpected_keys)
        if left:
            raise StateDictMismatchError(f"{source}: the model's state-dict hooks left {left[:5]} unloaded")
        return
    set_model_state_dict(model, new, options=StateDictOptions(strict=not missing_ok))


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], source: str
) -> None:
    """Restore an optimizer from its saved FQN-keyed state, each rank taking its block of every state tensor."""
    params = named_parameters(model)
    state: dict[str, dict[str, Any]] = {}
    for fqn, entry in saved.get("state", {}).items():
        if fqn not in params:
            raise StateDictMismatchError(f"{source}: optimizer state for {fqn!r}, which the model does not have")
        p = params[fqn]
        state[fqn] = {}
        for k, v in entry.items():
            if (
                isinstance(v, (torch.Tensor, StoredTensor))
                and isinstance(p, DTensor)
                and tuple(v.shape) == tuple(p.shape)
            ):
                # its own memory: the optimizer updates it in place, and must not keep the file mapped
                state[fqn][k] = DTensor.from_local(
                    _local_block(v, p).clone(), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
            elif isinstance(v, (torch.Tensor, StoredTensor)):
                state[fqn][k] = _whole(v).clone()
            else:
                state[fqn][k] = v
    with _optimizer_as_it_is():  # a saved optimizer without state loads as one without state
        set_optimizer_state_dict(
            model, optimizer, {"state": state, "param_groups": saved.get("param_groups", [])},
            options=StateDictOptions(full_state_dict=False),
        )  # fmt: skip
