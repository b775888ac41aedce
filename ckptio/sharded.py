"""Sharded state dicts (DTensor parameters, as FSDP2 and tensor parallelism make them).

Saving: every rank takes part, the master writes. ``ShardGather`` sends each rank's blocks of one
tensor at a time to the master over a gloo group of its own, as the master's writer reaches that
tensor; the file is one standard safetensors file of the full tensors, and the master holds one
full tensor at a time. The master announces each tensor (or that it failed, or finished) with a
broadcast, so no rank waits on the master's disk inside an accelerator collective, and a failed
write stops every rank.

Loading: each rank slices its own block of every tensor out of the memory-mapped file, so it
reads only those bytes, at any world size and placement.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
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

from .errors import CheckpointFormatError, CheckpointSaveError, StateDictMismatchError
from .formats import LazyTensor
from .layout import unwrap_module
from .ranks import Handoff, all_gather_object

__all__ = [
    "ShardGather",
    "has_dtensors",
    "load_model_state",
    "load_optimizer_state",
    "model_state",
    "new_group",
    "optimizer_state",
]

log = logging.getLogger("ckptio")

_DONE, _ABORT = -1, -2
# the tensors sent and received (see ranks.Handoff); blocks can be large, so only the last few
_blocks = Handoff(keep=4)
_handed = Handoff(keep=64)


def has_dtensors(*tensor_dicts: Mapping[str, Any]) -> bool:
    return any(isinstance(v, DTensor) for d in tensor_dicts for v in d.values())


def new_group(timeout_s: float) -> Any:
    """Collective: a gloo group of all ranks for sharded saves, apart from the training's own groups."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict by FQN (no wrapper prefixes), DTensors left sharded."""
    return dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter FQN, as torch.distributed.checkpoint defines it."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))


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


def _block_of(t: DTensor) -> _Block:
    if any(p.is_partial() for p in t.placements):  # each rank holds a summand, not a block: no rank's is the value
        raise CheckpointFormatError(f"a DTensor with placements {t.placements} is a pending reduction; reduce it first")
    shape, offset = _placement_block(tuple(t.shape), t.device_mesh, tuple(t.placements))
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):
        raise CheckpointSaveError(
            f"a DTensor's local shard is {list(local.shape)}, its placements say {list(shape)} (padded shards are not supported)"
        )
    return _Block(tuple(shape), tuple(offset), local)


def local_blocks(tensors: Mapping[str, torch.Tensor]) -> dict[str, _Block]:
    """This rank's block of every DTensor (its local tensor as it is: snapshot it for a background save)."""
    return {k: _block_of(v) for k, v in tensors.items() if isinstance(v, DTensor)}


def _region(full: torch.Tensor, block: _Block) -> torch.Tensor:
    return full[tuple(slice(o, o + s) for o, s in zip(block.offset, block.shape, strict=True))]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # gloo moves bytes: any dtype travels as uint8 (bool, float8 and complex included)
    return t.contiguous().reshape(-1).view(torch.uint8)


class ShardGather:
    """One sharded save, on every rank: the plan of who sends which block, then the transfers.

    ``files`` maps a file label to its tensors (DTensor values are sharded; others are the
    master's own). ``blocks`` are this rank's blocks of the DTensors, by (label, key). Building
    it is a collective on ``group``.
    """

    def __init__(
        self,
        group: Any,
        files: Mapping[str, Mapping[str, torch.Tensor]],
        blocks: Mapping[tuple[str, str], _Block],
    ):
        self.group = group
        self.me = dist.get_rank()
        self.entries = sorted(blocks)  # every rank the same order: the same DTensors, by label and key
        self.specs = {
            (label, key): (t.dtype, tuple(t.shape))
            for label, tensors in files.items()
            for key, t in tensors.items()
            if isinstance(t, DTensor)
        }
        mine = [(blocks[e].shape, blocks[e].offset) for e in self.entries]
        everyone = all_gather_object(mine, group=group)
        # one provider per distinct block (replicas hold the same bytes): the lowest rank
        self.providers: list[list[tuple[int, _Block]]] = []
        for i in range(len(self.entries)):
            seen: dict[tuple[Any, ...], int] = {}
            for rank, blocks_of_rank in enumerate(everyone):
                shape, offset = blocks_of_rank[i]
                if all(s > 0 for s in shape) and (shape, offset) not in seen:
                    seen[(shape, offset)] = rank
            self.providers.append([(r, _Block(tuple(s), tuple(o))) for (s, o), r in seen.items()])
        self.blocks = blocks
        self._index = {e: i for i, e in enumerate(self.entries)}

    def lazy(self, label: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | LazyTensor]:
        """The master's view of one file: DTensors become tensors gathered when the writer reaches them."""
        out: dict[str, torch.Tensor | LazyTensor] = {}
        for key, t in tensors.items():
            if isinstance(t, DTensor):
                dtype, shape = self.specs[(label, key)]
                out[key] = LazyTensor(dtype, shape, lambda i=self._index[(label, key)]: self._gather(i))
            else:
                out[key] = t
        return out

    def _announce(self, value: int) -> int:
        flag = _handed(torch.tensor([value], dtype=torch.int64))
        dist.broadcast(flag, src=0, group=self.group)
        return int(flag.item())

    def _gather(self, i: int) -> torch.Tensor:
        """Master: tensor ``i`` in full, each block from the rank that provides it."""
        self._announce(i)
        dtype, shape = self.specs[self.entries[i]]
        full = torch.empty(shape, dtype=dtype)
        for rank, block in self.providers[i]:
            region = _region(full, block)
            if rank == self.me:
                region.copy_(self.blocks[self.entries[i]].local)
                continue
            buf = torch.empty(block.shape, dtype=dtype)
            dist.recv(_blocks(_as_bytes(buf)), src=rank, group=self.group)
            region.copy_(buf)
        return full

    def finish(self, ok: bool) -> None:
        """Master: tell every rank the save is over (``ok``) or failed."""
        self._announce(_DONE if ok else _ABORT)

    def serve(self) -> None:
        """Every rank but the master: send this rank's blocks of each tensor the master announces."""
        while True:
            i = self._announce(0)
            if i == _DONE:
                return
            if i == _ABORT:
                raise CheckpointSaveError("the master's sharded save failed (its error is raised on the master)")
            if any(rank == self.me for rank, _ in self.providers[i]):
                dist.send(_blocks(_as_bytes(self.blocks[self.entries[i]].local.cpu())), dst=0, group=self.group)


def _local_part(full: torch.Tensor, like: DTensor) -> DTensor:
    """``like``'s own block of ``full`` as a DTensor: a view of the mapped file, read when copied."""
    block = _Block(*_placement_block(tuple(full.shape), like.device_mesh, tuple(like.placements)))
    part = _region(full, block)
    if like.device_mesh.device_type != "cpu":
        part = part.to(like.device_mesh.device_type)
    return DTensor.from_local(
        part, like.device_mesh, like.placements, run_check=False, shape=full.shape, stride=full.stride()
    )


def _diff(saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], source: str) -> None:
    missing = sorted(current.keys() - saved.keys())
    unexpected = sorted(saved.keys() - current.keys())
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


def load_model_state(model: torch.nn.Module, saved: Mapping[str, torch.Tensor], source: str) -> None:
    """Fill ``model`` (sharded or not, possibly on ``meta``) from full saved tensors: each rank copies its block."""
    current = model_state(model)
    _diff(saved, current, source)
    new = {k: _local_part(saved[k], v) if isinstance(v, DTensor) else saved[k] for k, v in current.items()}
    set_model_state_dict(model, new, options=StateDictOptions(strict=True))


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], source: str
) -> None:
    """Restore an optimizer from its saved FQN-keyed state, each rank taking its block of every state tensor."""
    params = dict(unwrap_module(model).named_parameters())
    state: dict[str, dict[str, Any]] = {}
    for fqn, entry in saved.get("state", {}).items():
        if fqn not in params:
            raise StateDictMismatchError(f"{source}: optimizer state for {fqn!r}, which the model does not have")
        p = params[fqn]
        state[fqn] = {}
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and isinstance(p, DTensor) and tuple(v.shape) == tuple(p.shape):
                local = _local_part(v, p)
                # its own memory: the optimizer updates it in place, and must not keep the file mapped
                state[fqn][k] = DTensor.from_local(
                    local.to_local().clone(), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                )  # fmt: skip
            elif isinstance(v, torch.Tensor):
                state[fqn][k] = v.clone()
            else:
                state[fqn][k] = v
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": saved.get("param_groups", [])},
        options=StateDictOptions(full_state_dict=False),
    )  # fmt: skip
