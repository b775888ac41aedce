"""Finding checkpoints: URIs resolved to files, a directory's checkpoints listed, the latest and the best, loads.

Nothing here writes. Saving and retention are the CheckpointManager's; convert, inspect and verify
are in ``tools``.
"""

from __future__ import annotations

import logging
import math
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .artifact import MockArchitecture, PolicyArtifact
from .cache import NodeCache
from .errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidArgumentError,
    typed_io,
)
from .hf import HF_INDEX, hf_name, is_hf_name
from .layout import (
    CHECKPOINTS_DIR,
    WEIGHT_EXTENSIONS,
    CheckpointInfo,
    LoadedCheckpoint,
    checkpoint_at,
    load_checkpoint,
    read_metrics,
    weights_name,
)
from .storage import Storage, is_temporary

__all__ = [
    "LATEST_SUFFIX",
    "CheckpointInfo",
    "artifact_of",
    "best",
    "checkpoint_metrics",
    "latest",
    "list_checkpoints",
    "load_from_uri",
    "load_latest",
    "load_policy_artifact",
    "locate",
    "resolve",
    "scan",
    "select_checkpoints",
]

log = logging.getLogger("ckptio")

LATEST_SUFFIX = ":latest"
LATEST_RETRIES = 5  # "latest" can be pruned between listing and opening it: list again, this many times


def scan(storage: Storage, listing: list[str] | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints in a directory, by epoch (then run name); one per run and epoch, safetensors preferred."""
    chosen: dict[tuple[int, str], CheckpointInfo] = {}
    for name in storage.listdir() if listing is None else listing:
        if is_temporary(name) or name.startswith("."):
            continue
        info = checkpoint_at(storage, name)
        if info is None:
            continue
        if "/" in info.name and not storage.exists(info.name):
            continue  # a {run}:v{epoch}/ directory without its weights (yet)
        key = (info.epoch, info.run)
        if key not in chosen or info.rank > chosen[key].rank:
            chosen[key] = info
    return [chosen[k] for k in sorted(chosen)]


def info_of(storage: Storage, name: str) -> CheckpointInfo:
    """The CheckpointInfo of weights file ``name`` in ``storage`` (without listing it)."""
    info = checkpoint_at(storage, name)
    if info is None:
        raise CheckpointFormatError(f"{storage.url(name)}: not a checkpoint file name")
    return info


def _checkpoint_dir(storage: Storage) -> Storage:
    """A run directory means its checkpoints/ folder; any other directory means itself."""
    if storage.kind(CHECKPOINTS_DIR) == "directory":
        return Storage(storage.url(CHECKPOINTS_DIR), storage.storage_options)
    return storage


def resolve(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str | None]:
    """(directory storage, weights file name) for a file URI; (checkpoint directory, None) for a directory.

    Not found is CheckpointNotFoundError; an unreachable store is StorageError, never "not found".
    """
    opts = dict(storage_options or {})
    stripped = uri.rstrip("/")
    if stripped.endswith(LATEST_SUFFIX):  # "<directory>:latest", as existing configs and command lines say
        directory = stripped.removesuffix(LATEST_SUFFIX).rstrip("/")
        storage = Storage(directory or "/", opts)
        if storage.kind() != "directory" and not (not storage.is_local and storage.listdir()):
            raise CheckpointNotFoundError(f"{uri}: {directory} is not a directory of checkpoints")
        return _checkpoint_dir(storage), None
    if stripped.endswith((*WEIGHT_EXTENSIONS, HF_INDEX)):
        directory, name = posixpath.split(stripped)
        parent, folder = posixpath.split(directory)
        outer = Storage(parent or ".", opts)
        legacy = checkpoint_at(outer, f"{folder}/{name}")
        if legacy is not None and legacy.name == f"{folder}/{name}":  # {run}:v{epoch}/weights.safetensors
            return outer, legacy.name
        return Storage(directory or ".", opts), name
    storage = Storage(stripped or "/", opts)
    kind = storage.kind()
    parent, folder = posixpath.split(stripped)
    if kind == "directory" and "/" not in folder:  # one {run}:v{epoch}/ checkpoint
        outer = Storage(parent or "/", opts)
        legacy = checkpoint_at(outer, folder)
        if legacy is not None and "/" in legacy.name and outer.exists(legacy.name):
            return outer, legacy.name
    if kind == "directory" or (kind is None and not storage.is_local and storage.listdir()):
        checkpoints = _checkpoint_dir(storage)
        if checkpoints is storage:  # a folder save_pretrained wrote is one checkpoint, not a directory of them
            listing = storage.listdir()
            hf = hf_name(listing)
            if hf is not None and not scan(storage, listing):
                return storage, hf
        return checkpoints, None
    directory, base = posixpath.split(stripped)
    parent = Storage(directory or ".", opts)
    for fmt in ("safetensors", "pt"):  # a base path without extension
        if parent.exists(weights_name(base, fmt)):
            return parent, weights_name(base, fmt)
    if kind == "file":
        raise CheckpointFormatError(f"{uri}: not a checkpoint file (a checkpoint ends in .safetensors or .pt)")
    raise CheckpointNotFoundError(f"{uri}: no such checkpoint file or directory")


def list_checkpoints(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints under a directory URI, oldest first."""
    storage, name = resolve(uri, storage_options)
    if name is not None and is_hf_name(name):  # a Hugging Face folder: its one checkpoint, at epoch 0
        return [CheckpointInfo(storage.url(name), name, 0, "safetensors", "model", storage, legacy=True)]
    if name is not None:
        raise CheckpointFormatError(f"{uri}: is a checkpoint file, not a directory")
    return scan(storage)


def latest(uri: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """The checkpoint with the highest epoch under a directory URI."""
    found = list_checkpoints(uri, storage_options)
    if not found:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    return found[-1]


def locate(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str]:
    """(storage, weights name) of a file URI, or of a directory's latest checkpoint."""
    storage, name = resolve(uri, storage_options)
    if name is None:
        info = latest(storage.url(), storage_options)
        storage, name = info.storage, info.name
    return storage, name


def _metric_value(metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    value = (metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def checkpoint_metrics(info: CheckpointInfo) -> dict[str, Any] | None:
    """The training metrics saved with a checkpoint (None if saved without)."""
    return read_metrics(info.storage, info.name)


def best(
    infos: list[CheckpointInfo], metric: str | None, mode: str, count: int, *, strict: bool = True
) -> list[CheckpointInfo]:
    """The ``count`` best by ``metric`` (newest first without one); ``strict=False`` skips damaged metrics."""
    if mode not in ("max", "min"):
        raise InvalidArgumentError(f"mode must be 'max' or 'min', got {mode!r}")
    if type(count) is not int or count < 1:
        raise InvalidArgumentError(f"count must be an int >= 1, got {count!r}")
    if metric is None:
        return sorted(infos, key=lambda i: i.epoch, reverse=True)[:count]
    scored = []
    for info in infos:
        try:
            value = _metric_value(checkpoint_metrics(info), metric)
        except CheckpointNotFoundError:
            continue  # deleted since it was listed
        except CorruptCheckpointError as e:
            if strict:
                raise
            log.warning("ranking by %r: ignoring %s (%s)", metric, info.uri, e)
            continue
        if value is not None:
            scored.append((value, info))
    if infos and not scored and strict:
        raise InvalidArgumentError(f"no checkpoint has a numeric training metric {metric!r} ({len(infos)} checked)")
    # ties go to the newer checkpoint
    ranked = sorted(scored, key=lambda s: (s[0] if mode == "max" else -s[0], s[1].epoch), reverse=True)
    return [i for _, i in ranked[:count]]


def select_checkpoints(
    uri: str,
    metric: str | None = None,
    mode: str = "max",
    count: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """The best ``count`` checkpoints by a training metric (newest first when no metric is named)."""
    return best(list_checkpoints(uri, storage_options), metric, mode, count)


def artifact_of(loaded: LoadedCheckpoint) -> PolicyArtifact:
    if isinstance(loaded.weights, torch.nn.Module):
        return PolicyArtifact(policy=loaded.weights, source=loaded.source)
    return PolicyArtifact(
        policy_architecture=loaded.architecture,
        state_dict=loaded.weights,
        training_metrics=loaded.metrics,
        source=loaded.source,
        epoch=loaded.epoch,
    )


def load_from_uri(
    uri: str,
    policy_architecture: Any = None,
    *,
    mmap: bool | None = None,
    trusted: bool = False,
    verify: bool = False,
    allow: Iterable[str] = (),
    storage_options: Mapping[str, Any] | None = None,
    cache: NodeCache | None = None,
) -> PolicyArtifact:
    """Load a PolicyArtifact from a file, a base path, a directory (its latest checkpoint), a remote URI or ``mock://``.

    ``mmap``: None maps local files and reads network filesystems eagerly; True/False force it.
    Remote files are downloaded once into the node-local ``cache`` and mapped from there.
    """
    if uri.startswith("mock://"):
        return PolicyArtifact(policy_architecture=MockArchitecture(), state_dict={}, source=uri)
    kwargs = dict(
        policy_architecture=policy_architecture, mmap=mmap, trusted=trusted, verify=verify, allow=allow, cache=cache
    )
    with typed_io(uri, "loading"):
        storage, name = resolve(uri, storage_options)
        if name is not None:
            return artifact_of(load_checkpoint(storage, name, **kwargs))
        return load_latest(lambda: latest(storage.url(), storage_options), **kwargs)


def load_latest(find: Callable[[], CheckpointInfo], **kwargs: Any) -> PolicyArtifact:
    """Load the checkpoint ``find()`` names as the latest; if retention deleted it between the listing and the
    load, list again (``LATEST_RETRIES`` times)."""
    for attempt in range(LATEST_RETRIES):
        info = find()
        try:
            return artifact_of(load_checkpoint(info.storage, info.name, **kwargs))
        except CheckpointNotFoundError:
            if attempt == LATEST_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def load_policy_artifact(base_path: str, policy_architecture: Any = None, **kwargs: Any) -> PolicyArtifact:
    """Alias of :func:`load_from_uri`, kept for existing callers (a base path without extension resolves too)."""
    return load_from_uri(base_path, policy_architecture, **kwargs)
