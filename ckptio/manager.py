"""CheckpointManager: persistence of a run's checkpoints (URIs, formats, discovery, retention).

No rank logic lives here: the Checkpointer decides who calls what.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .architecture import architecture_to_json
from .artifact import MockArchitecture, PolicyArtifact
from .cache import NodeCache
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSecurityError,
    CorruptCheckpointError,
    InvalidArgumentError,
    save_failed,
    typed_io,
)
from .formats import check_digest
from .policy_io import (
    MANIFEST_NAME,
    WEIGHT_EXTENSIONS,
    CheckpointName,
    SavedCheckpoint,
    Sidecars,
    architecture_record,
    checkpoint_base,
    epoch_of,
    files_of,
    load_checkpoint,
    open_weights,
    parse_checkpoint_name,
    read_metadata,
    read_metrics,
    read_trainer_state,
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

log = logging.getLogger("ckptio")

CHECKPOINTS_DIR = "checkpoints"
LATEST_SUFFIX = ":latest"
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


def _scan(storage: Storage, listing: list[str] | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints in a directory, by epoch (then run name); one per run and epoch, safetensors preferred."""
    chosen: dict[tuple[int, str], CheckpointName] = {}
    for name in storage.listdir() if listing is None else listing:
        if is_temporary(name) or name.startswith("."):
            continue
        parsed = parse_checkpoint_name(name)
        if parsed is not None and "/" in parsed.filename and not storage.exists(parsed.filename):
            continue  # a {run}:v{epoch}/ directory without its weights (yet)
        if parsed is not None:
            key = (parsed.epoch, parsed.run)
            if key not in chosen or parsed > chosen[key]:
                chosen[key] = parsed
    return [
        CheckpointInfo(
            uri=storage.url(n.filename), name=n.filename, epoch=n.epoch, format=n.fmt, run=n.run, storage=storage
        )
        for n in (chosen[k] for k in sorted(chosen))
    ]


def _is_legacy(info: CheckpointInfo) -> bool:
    parsed = parse_checkpoint_name(info.name)
    return parsed is not None and parsed.legacy_name is not None


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
    if stripped.endswith(WEIGHT_EXTENSIONS):
        directory, name = posixpath.split(stripped)
        parent, folder = posixpath.split(directory)
        legacy = parse_checkpoint_name(f"{folder}/{name}")
        if legacy is not None and legacy.filename == f"{folder}/{name}":  # {run}:v{epoch}/weights.safetensors
            return Storage(parent or ".", opts), legacy.filename
        return Storage(directory or ".", opts), name
    storage = Storage(stripped or "/", opts)
    kind = storage.kind()
    parent, folder = posixpath.split(stripped)
    legacy = parse_checkpoint_name(folder)
    if kind == "directory" and legacy is not None and "/" in legacy.filename:  # one {run}:v{epoch}/ checkpoint
        outer = Storage(parent or "/", opts)
        if outer.exists(legacy.filename):
            return outer, legacy.filename
    if kind == "directory" or (kind is None and not storage.is_local and storage.listdir()):
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


def checkpoint_metrics(info: CheckpointInfo) -> dict[str, Any] | None:
    """The training metrics saved with a checkpoint (None if saved without)."""
    return read_metrics(info.storage, info.name)


def _best(
    infos: list[CheckpointInfo], metric: str | None, mode: str, count: int, *, strict: bool = True
) -> list[CheckpointInfo]:
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
    with typed_io(uri, "loading"):
        return _load(uri, storage_options, policy_architecture, mmap, trusted, verify, allow, cache)


def _load(
    uri: str,
    storage_options: Mapping[str, Any] | None,
    policy_architecture: Any,
    mmap: bool | None,
    trusted: bool,
    verify: bool,
    allow: Iterable[str],
    cache: NodeCache | None,
) -> PolicyArtifact:
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
    """Rewrite a checkpoint in the format named by ``dst``'s extension (.safetensors or .pt).

    Copies the weights, metrics, epoch and the architecture record as they are: the architecture's
    class is never imported.
    """
    if not dst.endswith(WEIGHT_EXTENSIONS):
        raise CheckpointFormatError(f"{dst}: destination must end in .safetensors or .pt")
    with typed_io(src, "reading"):
        storage, name = _locate(src, storage_options)
        obj, metadata = read_weights(storage, name, trusted=trusted)
        metrics = read_metrics(storage, name, metadata) if not isinstance(obj, torch.nn.Module) else None
        record = architecture_record(storage, name.rsplit(".", 1)[0], metadata)
    arch_json = None
    if record is not None:
        try:
            arch_json = json.loads(record[1])
        except ValueError as e:
            raise CheckpointFormatError(f"{record[0]}: architecture record is not valid JSON: {e}") from None
    state = state_dict_of(obj)
    directory, out_name = posixpath.split(dst)
    out = Storage(directory or ".", dict(storage_options or {}))
    base, fmt = out_name.rsplit(".", 1)
    try:
        return write_checkpoint(
            out,
            base,
            state,
            architecture_json=arch_json,
            epoch=epoch_of(name, metadata),
            training_metrics=metrics,
            checkpoint_format=fmt,
        ).uri
    except (CheckpointFormatError, InvalidArgumentError):
        raise
    except Exception as e:
        raise save_failed(out.url(out_name), "converting " + src, e) from e


class CheckpointManager:
    """Saves, finds, loads and prunes the checkpoints of one run under ``{run_dir}/checkpoints``.

    Listing, ``latest`` and retention concern this run's name only: several runs may share a
    directory without one pruning or resuming from the other's checkpoints.
    """

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
        if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
            raise InvalidArgumentError(
                f"keep_last must be an int >= 1 (the newest checkpoint is never deleted), got {keep_last!r}"
            )
        if keep_best is not None and (
            len(keep_best) != 3
            or keep_best[1] not in ("max", "min")
            or type(keep_best[2]) is not int
            or keep_best[2] < 1
        ):
            raise InvalidArgumentError(f"keep_best must be (metric, 'max'|'min', count >= 1), got {keep_best!r}")
        self.storage_options = dict(storage_options or {})
        root = run_dir_or_uri.rstrip("/")
        if posixpath.basename(root) == CHECKPOINTS_DIR:
            root = posixpath.dirname(root)
        self.run_storage = Storage(root, self.storage_options)
        self.storage = Storage(self.run_storage.url(CHECKPOINTS_DIR), self.storage_options)
        for where in (self.run_storage, self.storage):
            if where.is_local and os.path.exists(where.root) and not os.path.isdir(where.root):
                raise CheckpointFormatError(f"{where.root}: is a file, not a run directory")
        self.run_name = sanitize_run_name(run_name or posixpath.basename(self.run_storage.root) or "run")
        self.checkpoint_format = checkpoint_format
        self.keep_last = keep_last
        self.keep_best = keep_best
        self._cleaned = False
        self._last_saved: str | None = None  # retention never deletes this process's newest save

    @property
    def checkpoint_dir(self) -> str:
        return self.storage.url()

    def base_name(self, epoch: int) -> str:
        return checkpoint_base(self.run_name, epoch)

    def save_checkpoint(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None = None,
        *,
        policy_architecture: Any = None,
        trainer_state: tuple[Mapping[str, torch.Tensor], Mapping[str, str]] | None = None,
        protect: Iterable[str] = (),
        prune: bool = True,
    ) -> SavedCheckpoint:
        """Write the checkpoint for ``epoch`` atomically, then apply retention; returns what it committed.

        A failure raises CheckpointSaveError (also an OSError when the cause is one); what was
        committed before stays as it was.
        """
        base = self.base_name(epoch)
        state = state_dict_of(policy)
        arch_json = architecture_to_json(policy_architecture) if policy_architecture is not None else None
        try:
            if not self._cleaned:
                step = "removing what crashed writers left"
                self.storage.clean_temporaries()
                self._cleaned = True
            step = "writing"
            saved = write_checkpoint(
                self.storage,
                base,
                state,
                architecture_json=arch_json,
                epoch=epoch,
                training_metrics=training_metrics,
                trainer_state=trainer_state,
                checkpoint_format=self.checkpoint_format,
                replace_other_format=True,  # in a run directory the old format would shadow this save
            )
            self._last_saved = saved.weights
            if prune:
                step = "applying retention"
                self.prune(protect=protect)
        except (CheckpointFormatError, InvalidArgumentError, CheckpointSecurityError):
            raise  # the caller's input, not a failed write
        except Exception as e:
            raise save_failed(self.storage.url(f"{base}.{self.checkpoint_format}"), step, e) from e
        return saved

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
        return self.save_checkpoint(
            policy,
            epoch,
            training_metrics,
            policy_architecture=policy_architecture,
            trainer_state=trainer_state,
            protect=protect,
            prune=prune,
        ).uri

    def list_checkpoints(self, uri: str | None = None) -> list[CheckpointInfo]:
        """This run's checkpoints, oldest first (any directory's, all runs, when ``uri`` is given)."""
        if uri is not None:
            return list_checkpoints(uri, self.storage_options)
        return [i for i in _scan(self.storage) if i.run == self.run_name]

    def info(self, name: str) -> CheckpointInfo:
        """The CheckpointInfo of weights file ``name`` in this run's directory (without listing it)."""
        parsed = parse_checkpoint_name(name)
        if parsed is None:
            raise CheckpointFormatError(f"{self.storage.url(name)}: not a checkpoint file name")
        return CheckpointInfo(self.storage.url(name), name, parsed.epoch, parsed.fmt, parsed.run, self.storage)

    def latest(self, uri: str | None = None) -> CheckpointInfo:
        found = self.list_checkpoints(uri)
        if not found:
            raise CheckpointNotFoundError(f"{uri or self.checkpoint_dir}: no checkpoints of run {self.run_name!r}")
        return found[-1]

    def select_checkpoints(
        self, uri: str | None = None, metric: str | None = None, mode: str = "max", count: int = 1
    ) -> list[CheckpointInfo]:
        return _best(self.list_checkpoints(uri), metric, mode, count)

    def load_from_uri(self, uri: str | None = None, policy_architecture: Any = None, **kwargs: Any) -> PolicyArtifact:
        """Load a checkpoint (default: this run's latest)."""
        kwargs.setdefault("storage_options", self.storage_options)
        if uri is None:
            for attempt in range(_LATEST_RETRIES):  # pruned between listing and opening: list again
                info = self.latest()
                try:
                    return load_from_uri(info.uri, policy_architecture, **kwargs)
                except CheckpointNotFoundError:
                    if attempt == _LATEST_RETRIES - 1:
                        raise
        return load_from_uri(uri, policy_architecture, **kwargs)

    def read_trainer_state(
        self, info: CheckpointInfo, cache: NodeCache | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The trainer state saved with a checkpoint (digest checked); None if it was saved without."""
        local = None if info.storage.is_local else (cache or NodeCache()).fetch(info.storage, info.name)
        metadata = read_metadata(info.storage, info.name, local_path=local)
        return read_trainer_state(info.storage, info.name, metadata, cache=cache)

    def retained(self, infos: list[CheckpointInfo], protect: Iterable[str] = ()) -> set[str]:
        """Names retention keeps: the newest, the last N, the best k, this process's last save, anything protected."""
        if not infos:
            return set()
        keep = {infos[-1].name} | set(protect)
        if self._last_saved is not None:
            keep.add(self._last_saved)
        if self.keep_last is None and self.keep_best is None:
            return {i.name for i in infos}
        if self.keep_last is not None:
            keep |= {i.name for i in infos[-self.keep_last :]}
        if self.keep_best is not None:
            metric, mode, k = self.keep_best
            keep |= {i.name for i in _best(infos, metric, mode, k, strict=False)}
        return keep

    def prune(self, protect: Iterable[str] = ()) -> list[str]:
        """Delete this run's checkpoints that retention does not keep; returns their URIs."""
        listing = self.storage.listdir()
        infos = [i for i in _scan(self.storage, listing) if i.run == self.run_name]
        keep = self.retained(infos, protect)
        deleted = []
        for info in infos:
            if info.name in keep or _is_legacy(info):
                continue  # checkpoints other tools wrote are read and resumed from, never pruned
            self.delete(info, listing)
            deleted.append(info.uri)
        return deleted

    def delete(self, info: CheckpointInfo, listing: list[str] | None = None) -> None:
        """Delete a checkpoint: its weights first (it vanishes at once), then every other file of it."""
        info.storage.delete(info.name)
        names = files_of(info.base, info.storage.listdir() if listing is None else listing)
        names.sort(key=lambda n: not n.endswith(WEIGHT_EXTENSIONS))
        for name in names:
            if name != info.name:
                info.storage.delete(name)


def _locate(uri: str, storage_options: Mapping[str, Any] | None) -> tuple[Storage, str]:
    """(storage, weights name) of a file URI, or of a directory's latest checkpoint."""
    storage, name = resolve(uri, storage_options)
    if name is None:
        info = latest(storage.url(), storage_options)
        storage, name = info.storage, info.name
    return storage, name


def inspect_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without importing its architecture: format, epoch, tensors, bytes, metrics."""
    if uri.startswith("mock://"):
        return {
            "uri": uri, "format": "mock", "epoch": None, "tensor_count": 0, "total_bytes": 0, "dtypes": {},
            "metrics": None, "architecture": architecture_to_json(MockArchitecture()), "digest": None, "files": [],
        }  # fmt: skip
    storage, name = _locate(uri, storage_options)
    obj, metadata = read_weights(storage, name, mmap=None)
    tensors = state_dict_of(obj)
    arch_raw = metadata.get("ckptio.architecture")
    if arch_raw is None and storage.exists(MANIFEST_NAME):
        arch_raw = storage.read_bytes(MANIFEST_NAME).decode("utf-8", "replace")
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
        "epoch": epoch_of(name, metadata),
        "tensor_count": len(tensors),
        "total_bytes": sum(t.numel() * t.element_size() for t in unique.values()),
        "dtypes": dtypes,
        "metrics": read_metrics(storage, name, metadata),
        "architecture": architecture,
        "digest": metadata.get("ckptio.crc32"),
        "weights_key": metadata.get("ckptio.pt_key"),  # a .pt training checkpoint: the entry the weights came from
        "files": [storage.url(n) for n in [*Sidecars.of(name.rsplit(".", 1)[0], metadata, name).names(), name]
                  if storage.exists(n)],
    }  # fmt: skip


@dataclass(frozen=True)
class VerifyResult:
    """One file's verdict: ``ok`` (digest matches), ``bad`` (damaged or missing) or ``unverified`` (no digest)."""

    uri: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "bad"


def _verify_weights(storage: Storage, name: str) -> tuple[VerifyResult, dict[str, str] | None]:
    uri = storage.url(name)
    if not name.endswith(".safetensors"):  # .pt has no digest: a full load is the check
        try:
            metadata = read_weights(storage, name, mmap=False)[1]
        except CheckpointError as e:
            return VerifyResult(uri, "bad", _detail(e, uri)), None
        return VerifyResult(uri, "unverified", "loads, but .pt files carry no digest"), metadata
    try:
        with open_weights(storage, name) as f:
            metadata = check_digest(f, uri)
        if metadata is None:
            unverified = VerifyResult(uri, "unverified", "header and offsets valid; no digest to check contents")
            return unverified, read_metadata(storage, name)
        return VerifyResult(uri, "ok"), metadata
    except CheckpointError as e:
        return VerifyResult(uri, "bad", _detail(e, uri)), None


def _detail(error: BaseException, uri: str) -> str:
    """The error message without the file name it starts with (the caller prints the name once)."""
    text = str(error)
    return text[len(uri) + 2 :] if text.startswith(uri + ": ") else text


def verify_checkpoint(storage: Storage, name: str) -> list[VerifyResult]:
    """Verify every file of one checkpoint: weights, metrics and trainer state, each against its digest."""
    weights, metadata = _verify_weights(storage, name)
    results = [weights]
    if metadata is None:
        return results
    sidecars = Sidecars.of(name.rsplit(".", 1)[0], metadata, weights.uri)
    if sidecars.metrics is not None and (sidecars.declared or storage.exists(sidecars.metrics)):
        uri = storage.url(sidecars.metrics)
        try:
            read_metrics(storage, name, metadata)
            status = "ok" if sidecars.metrics_crc32 else "unverified"
            results.append(VerifyResult(uri, status, "" if sidecars.metrics_crc32 else "valid JSON; no digest"))
        except CheckpointError as e:
            results.append(VerifyResult(uri, "bad", _detail(e, uri)))
    if sidecars.trainer is not None and (sidecars.declared or storage.exists(sidecars.trainer)):
        uri = storage.url(sidecars.trainer)
        try:
            read_trainer_state(storage, name, metadata, verify=True)
            results.append(VerifyResult(uri, "ok"))
        except CheckpointError as e:
            results.append(VerifyResult(uri, "bad", _detail(e, uri)))
    return results


def verify(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[VerifyResult]:
    """Fully verify a checkpoint file, or every checkpoint in a directory: one result per file."""
    storage, name = resolve(uri, storage_options)
    names = [name] if name is not None else [i.name for i in _scan(storage)]
    if not names:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    return [r for n in names for r in verify_checkpoint(storage, n)]
