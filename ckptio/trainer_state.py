"""Trainer state without pickle: tensors go to safetensors, the structure around them to JSON.

Handles what optimizers, schedulers and RNGs produce: nested dicts (string, int, float, bool or
None keys), lists, tuples, tensors, numpy arrays and JSON scalars. Anything else is refused
rather than pickled.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import CheckpointFormatError, CorruptCheckpointError
from .formats import LazyTensor

__all__ = [
    "FlatTrainerState", "as_flat_trainer_state", "capture_rng_state", "flatten", "restore_rng_state", "unflatten",
]  # fmt: skip

_STRUCTURE_KEY = "ckptio.trainer_structure"

# a trainer-state tree as a checkpoint stores it: its tensors, and the metadata holding its structure
FlatTrainerState = tuple[Mapping[str, torch.Tensor], Mapping[str, str]]


def as_flat_trainer_state(state: Any) -> FlatTrainerState | None:
    """A trainer state as a checkpoint stores it: a nested dict flattened; a (tensors, metadata) pair as it is."""
    if state is None or (isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], Mapping)):
        return state
    if isinstance(state, Mapping):
        return flatten(state)
    raise CheckpointFormatError(
        f"trainer_state is a {type(state).__name__}: give a dict (nested dicts, lists, tensors, JSON scalars)"
    )


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # a FlatTrainerState
    """(tensors, metadata) for a nested trainer-state tree; metadata holds the JSON structure."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, (torch.Tensor, LazyTensor)):  # a lazy one is read when the writer reaches it
            name = f"{len(tensors)}:{path}"  # the index keeps names unique whatever the keys contain
            # detach() is slow on DTensors; only cut autograd
            tensors[name] = x.detach() if isinstance(x, torch.Tensor) and x.requires_grad else x
            return {"t": name}
        if isinstance(x, np.ndarray):
            name = f"{len(tensors)}:{path}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(x))
            return {"n": name}
        if isinstance(x, (bool, int, float, str)) or x is None:
            return {"v": x}
        if isinstance(x, Mapping):
            items = []
            for k, v in x.items():
                if not (isinstance(k, (str, int, float, bool)) or k is None):
                    raise CheckpointFormatError(f"trainer state key {k!r} at {path or '/'} is not a JSON scalar")
                items.append([k, enc(v, f"{path}/{k}")])
            return {"d": items}
        if isinstance(x, (list, tuple)):
            return {"l" if isinstance(x, list) else "u": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        raise CheckpointFormatError(
            f"trainer state at {path or '/'} is a {type(x).__name__}; only tensors, arrays, containers and JSON "
            "scalars are stored (no pickle)"
        )

    structure = enc(tree, "")
    return tensors, {_STRUCTURE_KEY: json.dumps(structure)}


def unflatten(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str = "<trainer state>") -> Any:
    try:
        structure = json.loads(metadata[_STRUCTURE_KEY])
    except (KeyError, ValueError) as e:
        raise CorruptCheckpointError(f"{source}: missing or invalid trainer-state structure: {e!r}") from None

    def dec(node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise CorruptCheckpointError(f"{source}: malformed trainer-state node {str(node)[:80]}")
        ((kind, val),) = node.items()
        if kind == "v":
            return val
        if kind in ("t", "n"):
            if val not in tensors:
                raise CorruptCheckpointError(f"{source}: trainer state refers to missing tensor {val!r}")
            t = tensors[val]
            return t.numpy().copy() if kind == "n" else t
        if kind == "d":
            return {k: dec(v) for k, v in val}
        if kind == "l":
            return [dec(v) for v in val]
        if kind == "u":
            return tuple(dec(v) for v in val)
        raise CorruptCheckpointError(f"{source}: unknown trainer-state node kind {kind!r}")

    return dec(structure)


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), Python and numpy RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).clone())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).clone() for s in state["cuda"]])
