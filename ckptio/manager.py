"""CheckpointManager: persistence of a run's checkpoints (URIs, formats, discovery, retention).

No rank logic lives here: the Checkpointer decides who calls what.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .architecture import architecture_to_json
from .artifact import MockArchitecture, PolicyArtifact
from .cache import NodeCache
from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from .policy_io import (
    LEGACY_ARCH_SUFFIX,
    MANIFEST_NAME,
    METRICS_SUFFIX,
    TRAINER_SUFFIX,
    WEIGHT_EXTENSIONS,
    CheckpointName,
    checkpoint_base,
    load_checkpoint,
    parse_checkpoint_name,
    read_metrics,
    read_weights,
    sanitize_run_name,
    state_dict_of,
    write_checkpoint,
)
from .storage import Storage, is_temporary

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "convert",
    "inspect_checkpoint",
    "latest",
    "list_checkpoints",
    "load_from_uri",
    "resolve",
    "select_checkpoints",
    "verify",
]

CHECKPOINTS_DIR = "checkpoints"
_LATEST_RETRIES = 5


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint: its weights URI, epoch, format and the storage it lives in."""

    uri: str
    name: str
    epoch: int
    format: str
    run: str
    storage: Storage

    @property
    def base(self) -> str:
        return self.name.rsplit(".", 1)[0]


def _scan(storage: Storage) -> list[CheckpointInfo]:
    """Committed checkpoints in a directory, oldest first; one per epoch, safetensors preferred."""
    by_epoch: dict[int, CheckpointName] = {}
    for name in storage.listdir():
        if is_temporary(name) or name.startswith("."):
            continue
        parsed = parse_checkpoint_name(name)
        if parsed is not None and (parsed.epoch not in by_epoch or parsed > by_epoch[parsed.epoch]):
            by_epoch[parsed.epoch] = parsed
    return [
        CheckpointInfo(
            uri=storage.url(n.filename), name=n.filename, epoch=n.epoch, format=n.fmt, run=n.run, storage=storage
        )
        for n in (by_epoch[e] for e in sorted(by_epoch))
    ]


def _checkpoint_dir(storage: Storage) -> Storage:
    """A run directory means its checkpoints/ folder; any other directory means itself."""
    if storage.fs.isdir(storage.path(CHECKPOINTS_DIR)):
        return Storage(storage.url(CHECKPOINTS_DIR), storage.storage_options)
    return storage


def resolve(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str | None]:
    """(directory storage, weights file name) for a file URI; (checkpoint directory, None) for a directory."""
    opts = dict(storage_options or {})
    stripped = uri.rstrip("/")
    if stripped.endswith(WEIGHT_EXTENSIONS):
        directory, name = posixpath.split(stripped)
        return Storage(directory or ".", opts), name
    storage = Storage(stripped or "/", opts)
    if storage.fs.isdir(storage.root):
        return _checkpoint_dir(storage), None
    directory, base = posixpath.split(stripped)
    parent = Storage(directory or ".", opts)
    for ext in WEIGHT_EXTENSIONS:  # a base path without extension
        if parent.exists(base + ext):
            return parent, base + ext
    raise CheckpointNotFoundError(f"{uri}: no such checkpoint file or directory")


def list_checkpoints(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints under a directory URI, oldest first."""
    storage, name = resolve(uri, storage_options)
    if name is not None:
        raise CheckpointFormatError(f"{uri}: is a checkpoint file, not a directory")
    return _scan(storage)


def latest(uri: str, storage_options: Mapping[str, Any] | None = None) -> CheckpointInfo:
    """The checkpoint with the highest epoch under a directory URI."""
    found = list_checkpoints(uri, storage_options)
    if not found:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    return found[-1]


def _metric_value(metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    value = (metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _best(infos: list[CheckpointInfo], metric: str | None, mode: str, count: int) -> list[CheckpointInfo]:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if metric is None:
        ranked = sorted(infos, key=lambda i: i.epoch, reverse=True)
    else:
        scored = [(v, i) for i in infos if (v := _metric_value(read_metrics(i.storage, i.base), metric)) is not None]
        # ties go to the newer checkpoint
        ranked = [
            i for _, i in sorted(scored, key=lambda s: (s[0] if mode == "max" else -s[0], s[1].epoch), reverse=True)
        ]
    return ranked[:count]


def select_checkpoints(
    uri: str,
    metric: str | None = None,
    mode: str = "max",
    count: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """The best ``count`` checkpoints by a training metric (newest first when no metric is named)."""
    return _best(list_checkpoints(uri, storage_options), metric, mode, count)


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
    """Load a PolicyArtifact from a file, a directory (its latest checkpoint), a remote URI or ``mock://``.

    ``mmap``: None maps local files and reads network filesystems eagerly; True/False force it.
    Remote files are downloaded once into the node-local ``cache`` and mapped from there.
    """
    if uri.startswith("mock://"):
        return PolicyArtifact(policy_architecture=MockArchitecture(), state_dict={}, source=uri)
    storage, name = resolve(uri, storage_options)
    kwargs = dict(
        policy_architecture=policy_architecture, mmap=mmap, trusted=trusted, verify=verify, allow=allow, cache=cache
    )
    if name is not None:
        return load_checkpoint(storage, name, **kwargs)
    # "Latest" can be pruned between listing and opening it by a writer saving concurrently:
    # list again rather than fail, a bounded number of times.
    for attempt in range(_LATEST_RETRIES):
        info = latest(storage.url(), storage_options)
        try:
            return load_checkpoint(info.storage, info.name, **kwargs)
        except CheckpointNotFoundError:
            if attempt == _LATEST_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def convert(src: str, dst: str, *, trusted: bool = False, storage_options: Mapping[str, Any] | None = None) -> str:
    """Rewrite a checkpoint in the format named by ``dst``'s extension (.safetensors or .pt)."""
    if not dst.endswith(WEIGHT_EXTENSIONS):
        raise CheckpointFormatError(f"{dst}: destination must end in .safetensors or .pt")
    artifact = load_from_uri(src, trusted=trusted, storage_options=storage_options)
    state = state_dict_of(artifact.policy) if artifact.policy is not None else dict(artifact.state_dict or {})
    directory, name = posixpath.split(dst)
    storage = Storage(directory or ".", dict(storage_options or {}))
    base, fmt = name.rsplit(".", 1)
    arch = artifact.policy_architecture
    return write_checkpoint(
        storage,
        base,
        state,
        architecture_json=architecture_to_json(arch) if arch is not None else None,
        epoch=artifact.epoch,
        training_metrics=artifact.training_metrics,
        checkpoint_format=fmt,
    )


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run under ``{run_dir}/checkpoints``."""

    def __init__(
        self,
        run_dir_or_uri: str,
        checkpoint_format: str = "safetensors",
        keep_last: int | None = None,
        keep_best: tuple[str, str, int] | None = None,
        *,
        run_name: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ):
        if checkpoint_format not in ("safetensors", "pt"):
            raise CheckpointFormatError(f"unknown checkpoint_format {checkpoint_format!r} (use 'safetensors' or 'pt')")
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be >= 1 (the newest checkpoint is never deleted)")
        if keep_best is not None and (len(keep_best) != 3 or keep_best[1] not in ("max", "min") or keep_best[2] < 1):
            raise ValueError("keep_best must be (metric, 'max'|'min', count >= 1)")
        self.storage_options = dict(storage_options or {})
        root = run_dir_or_uri.rstrip("/")
        if posixpath.basename(root) == CHECKPOINTS_DIR:
            root = posixpath.dirname(root)
        self.run_storage = Storage(root, self.storage_options)
        self.storage = Storage(self.run_storage.url(CHECKPOINTS_DIR), self.storage_options)
        self.run_name = sanitize_run_name(run_name or posixpath.basename(self.run_storage.root) or "run")
        self.checkpoint_format = checkpoint_format
        self.keep_last = keep_last
        self.keep_best = keep_best
        self._cleaned = False

    @property
    def checkpoint_dir(self) -> str:
        return self.storage.url()

    def base_name(self, epoch: int) -> str:
        return checkpoint_base(self.run_name, epoch)

    def save_agent(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None = None,
        *,
        policy_architecture: Any = None,
        trainer_state: tuple[Mapping[str, torch.Tensor], Mapping[str, str]] | None = None,
        protect: Iterable[str] = (),
        prune: bool = True,
    ) -> str:
        """Write the checkpoint for ``epoch`` atomically, then apply retention; returns its URI."""
        if not self._cleaned:
            self.storage.clean_temporaries()
            self._cleaned = True
        uri = write_checkpoint(
            self.storage,
            self.base_name(epoch),
            state_dict_of(policy),
            architecture_json=architecture_to_json(policy_architecture) if policy_architecture is not None else None,
            epoch=epoch,
            training_metrics=training_metrics,
            trainer_state=trainer_state,
            checkpoint_format=self.checkpoint_format,
        )
        if prune:
            self.prune(protect=protect)
        return uri

    def list_checkpoints(self, uri: str | None = None) -> list[CheckpointInfo]:
        return _scan(self.storage) if uri is None else list_checkpoints(uri, self.storage_options)

    def latest(self, uri: str | None = None) -> CheckpointInfo:
        found = self.list_checkpoints(uri)
        if not found:
            raise CheckpointNotFoundError(f"{uri or self.checkpoint_dir}: no checkpoints in this directory")
        return found[-1]

    def select_checkpoints(
        self, uri: str | None = None, metric: str | None = None, mode: str = "max", count: int = 1
    ) -> list[CheckpointInfo]:
        return _best(self.list_checkpoints(uri), metric, mode, count)

    def load_from_uri(self, uri: str | None = None, policy_architecture: Any = None, **kwargs: Any) -> PolicyArtifact:
        """Load a checkpoint (default: this run's latest)."""
        kwargs.setdefault("storage_options", self.storage_options)
        return load_from_uri(uri or self.checkpoint_dir, policy_architecture, **kwargs)

    def read_trainer_state(
        self, info: CheckpointInfo, cache: NodeCache | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        name = info.base + TRAINER_SUFFIX
        if not info.storage.exists(name):
            return None
        local = None if info.storage.is_local else (cache or NodeCache()).fetch(info.storage, name)
        tensors, meta = read_weights(info.storage, name, mmap=False, local_path=local)
        assert isinstance(tensors, Mapping)
        return tensors, meta

    def retained(self, infos: list[CheckpointInfo], protect: Iterable[str] = ()) -> set[str]:
        """Names retention keeps: the newest, the last N, the best k, and anything protected."""
        if not infos:
            return set()
        keep = {infos[-1].name} | set(protect)
        if self.keep_last is None and self.keep_best is None:
            return {i.name for i in infos}
        if self.keep_last is not None:
            keep |= {i.name for i in infos[-self.keep_last :]}
        if self.keep_best is not None:
            metric, mode, k = self.keep_best
            keep |= {i.name for i in _best(infos, metric, mode, k)}
        return keep

    def prune(self, protect: Iterable[str] = ()) -> list[str]:
        """Delete checkpoints retention does not keep (weights first, so each vanishes at once)."""
        infos = _scan(self.storage)
        keep = self.retained(infos, protect)
        deleted = []
        for info in infos:
            if info.name in keep:
                continue
            self.delete(info)
            deleted.append(info.uri)
        return deleted

    def delete(self, info: CheckpointInfo) -> None:
        info.storage.delete(info.name)
        for suffix in (*WEIGHT_EXTENSIONS, METRICS_SUFFIX, TRAINER_SUFFIX, LEGACY_ARCH_SUFFIX):
            info.storage.delete(info.base + suffix)


def inspect_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without importing its architecture: format, epoch, tensors, bytes, metrics."""
    storage, name = resolve(uri, storage_options)
    if name is None:
        info = latest(storage.url(), storage_options)
        storage, name = info.storage, info.name
    obj, metadata = read_weights(storage, name, mmap=None)
    tensors = state_dict_of(obj)
    arch_raw = metadata.get("ckptio.architecture")
    if arch_raw is None and storage.exists(MANIFEST_NAME):
        arch_raw = storage.read_bytes(MANIFEST_NAME).decode("utf-8", "replace")
    base = name.rsplit(".", 1)[0]
    parsed = parse_checkpoint_name(name)
    epoch = metadata.get("ckptio.epoch")
    unique = {id(t): t for t in tensors.values()}
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + 1
    try:
        architecture = json.loads(arch_raw) if arch_raw else None
    except ValueError:
        architecture = arch_raw
    return {
        "uri": storage.url(name),
        "format": name.rsplit(".", 1)[1],
        "epoch": int(epoch) if epoch and epoch.isdigit() else (parsed.epoch if parsed else None),
        "tensor_count": len(tensors),
        "total_bytes": sum(t.numel() * t.element_size() for t in unique.values()),
        "dtypes": dtypes,
        "metrics": read_metrics(storage, base),
        "architecture": architecture,
        "digest": metadata.get("ckptio.crc32"),
    }


def verify(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, str | None]]:
    """Fully verify a file, or every checkpoint in a directory: [(uri, error message or None)]."""
    storage, name = resolve(uri, storage_options)
    names = [name] if name is not None else [i.name for i in _scan(storage)]
    if not names:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    results: list[tuple[str, str | None]] = []
    for n in names:
        try:
            read_weights(storage, n, verify=True)
            results.append((storage.url(n), None))
        except CheckpointError as e:
            results.append((storage.url(n), str(e)))
    return results
