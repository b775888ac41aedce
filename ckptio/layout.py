"""A checkpoint's layout on storage: its file names, the run manifest, writing and reading its files.

This module alone knows which files make up a checkpoint and in which order they are committed.

A checkpoint ``{run}.e{epoch:08d}`` is the weights file (``.safetensors`` or ``.pt``) and optional
sidecars, named per save: ``{base}.{save_id}.metrics.json`` and ``{base}.{save_id}.trainer.safetensors``.
Sidecars are written first and the weights last; the weights header names its sidecars (and the
metrics' CRC-32), so renaming the weights file into place commits the whole checkpoint at once. A
re-save of the same epoch writes new sidecar names, commits, then removes the previous save's
files: a reader sees the old checkpoint or the new one, never a mix. Files written before sidecars
were named per save (``{base}.metrics.json``, ``{base}.trainer.safetensors``) still load.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import io
import json
import logging
import os
import re
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import IO, Any

import torch

from .architecture import architecture_or_record
from .artifact import tied_groups
from .cache import NodeCache
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    InvalidArgumentError,
)
from .formats import (
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    ChunkDigests,
    PartialTensors,
    SafetensorsHeader,
    block_ranges,
    check_format_version,
    chunk_digests,
    crc32_hex,
    file_size,
    load_pt,
    load_pt_object,
    pt_weights_key,
    read_header,
    read_safetensors,
    save_pt,
    verify_safetensors,
    write_safetensors,
)
from .hf import HF_INDEX, config_architecture, is_hf_name, read_config, read_shards
from .storage import FileInfo, Storage, covers, is_network_filesystem, merge_ranges
from .trainer_state import FlatTrainerState

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST_NAME",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "PARTIAL_KEY",
    "PendingSave",
    "SavedCheckpoint",
    "Sidecars",
    "base_of",
    "canonical_name",
    "checkpoint_base",
    "delete_checkpoint",
    "Want",
    "FileChunks",
    "cache_headers",
    "file_chunks",
    "fetch_local",
    "format_of",
    "load_checkpoint",
    "named_parameters",
    "checkpoint_at",
    "checkpoint_of",
    "read_metrics",
    "read_pt_training_state",
    "read_trainer_state",
    "state_dict_of",
    "subset_of",
    "tied_names",
    "uncommitted_sidecars",
    "check_manifest_format",
    "write_checkpoint",
    "wanted_ranges",
    "weights_name",
    "write_manifest",
]

log = logging.getLogger("ckptio")

CHECKPOINTS_DIR = "checkpoints"  # a run directory keeps its checkpoints and manifest here
MANIFEST_NAME = "model_architecture.json"
WEIGHT_EXTENSIONS = (".safetensors", ".pt")
METRICS_SUFFIX = ".metrics.json"
TRAINER_SUFFIX = ".trainer.safetensors"
LEGACY_ARCH_SUFFIX = ".policyarchitecture"
_NAME_RE = re.compile(r"^(?P<run>[A-Za-z0-9_-]+)\.e(?P<epoch>\d+)\.(?P<fmt>safetensors|pt)$")
# weights-header keys that bind a checkpoint's files together
SAVE_ID_KEY = "ckptio.save_id"
PARTIAL_KEY = "ckptio.partial"  # "1": the weights are a subset of the model's (save(only=...)), loaded into it
METRICS_FILE_KEY = "ckptio.metrics_file"
METRICS_CRC_KEY = "ckptio.metrics_crc32"
TRAINER_FILE_KEY = "ckptio.trainer_file"
# a digest of the directory a checkpoint was saved in (not the path itself: headers travel); a local file
# found elsewhere is a copy, whose sidecars may not have come along
SAVED_IN_KEY = "ckptio.saved_in"


def directory_digest(storage: Storage) -> str:
    where = os.path.realpath(storage.root) if storage.is_local else storage.url()  # one digest per place
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def base_of(weights: str) -> str:
    """The checkpoint a weights file name belongs to (its sidecars share it): the name less its extension."""
    return weights.rsplit(".", 1)[0]


def format_of(weights: str) -> str:
    return weights.rsplit(".", 1)[1]


def weights_name(base: str, checkpoint_format: str) -> str:
    return f"{base}.{checkpoint_format}"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint, as its weights file names it: where it is, its run, epoch and format.

    ``name`` is the weights file in ``storage`` (a ``{run}:v{epoch}/`` checkpoint's includes its folder);
    the checkpoint's other files share its ``base``.
    """

    uri: str
    name: str
    epoch: int
    format: str
    run: str
    storage: Storage
    legacy: bool = False  # named by another tool: read and resumed from, never pruned

    @property
    def base(self) -> str:
        return base_of(self.name)

    @property
    def rank(self) -> tuple[int, str, int]:
        """Sort key: by epoch, then run; safetensors after pt, so it wins when both exist for one epoch."""
        return (self.epoch, self.run, 1 if self.format == "safetensors" else 0)


# Names earlier tools wrote, read but never written (':' is unsafe on several filesystems):
# {run}:v{epoch}.pt|.safetensors, {run}__e{epoch}__s{step}__t{seconds}__sc{score}.pt, and a directory
# {run}:v{epoch}/ holding weights.safetensors.
_VERSIONED_RE = re.compile(r"^(?P<run>[^/]+):v(?P<epoch>\d+)\.(?P<fmt>safetensors|pt)$")
_STEP_SCORE_RE = re.compile(
    r"^(?P<run>[^/]+?)__e(?P<epoch>\d+)__s(?P<step>\d+)__t(?P<seconds>\d+(?:\.\d+)?)__sc(?P<score>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\.pt$"
)
_VERSION_DIR_RE = re.compile(r"^(?P<run>[^/]+):v(?P<epoch>\d+)$")
VERSION_DIR_WEIGHTS = "weights.safetensors"


def sanitize_run_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "run"


def check_epoch(epoch: Any) -> int:
    """``epoch`` itself if it is a non-negative int (not a bool, float or string)."""
    if type(epoch) is not int or epoch < 0:
        raise InvalidArgumentError(f"epoch must be a non-negative int, got {epoch!r} ({type(epoch).__name__})")
    return epoch


def check_format(checkpoint_format: Any) -> str:
    """``checkpoint_format`` itself if ckptio writes it."""
    if checkpoint_format not in ("safetensors", "pt"):
        raise CheckpointFormatError(f"unknown checkpoint_format {checkpoint_format!r} (use 'safetensors' or 'pt')")
    return checkpoint_format


def checkpoint_base(run: str, epoch: int) -> str:
    return f"{sanitize_run_name(run)}.e{check_epoch(epoch):08d}"


def _parse(filename: str) -> tuple[str, int, str, bool] | None:
    """(run, epoch, format, legacy) a weights file name carries: ckptio's own name, or a legacy one."""
    m = _NAME_RE.match(filename)
    if m:
        return m["run"], int(m["epoch"]), m["fmt"], False
    m = _VERSIONED_RE.match(filename) or _STEP_SCORE_RE.match(filename)
    if m:
        return m["run"], int(m["epoch"]), format_of(filename), True
    directory, _, leaf = filename.partition("/")
    m = _VERSION_DIR_RE.match(directory)
    if m and leaf == VERSION_DIR_WEIGHTS:
        return m["run"], int(m["epoch"]), "safetensors", True
    return None


def checkpoint_at(storage: Storage, filename: str) -> CheckpointInfo | None:
    """The checkpoint whose weights file is ``filename`` in ``storage``; None if the name is no checkpoint's.

    A legacy ``{run}:v{epoch}`` folder stands for the weights file inside it.
    """
    if _VERSION_DIR_RE.match(filename):
        filename = f"{filename}/{VERSION_DIR_WEIGHTS}"
    parsed = _parse(filename)
    if parsed is None:
        return None
    run, epoch, fmt, legacy = parsed
    return CheckpointInfo(storage.url(filename), filename, epoch, fmt, run, storage, legacy)


def checkpoint_of(storage: Storage, run: str, epoch: int, checkpoint_format: str) -> CheckpointInfo:
    """The checkpoint ckptio names ``{run}.e{epoch}`` in ``storage`` (whether or not it exists yet)."""
    info = checkpoint_at(storage, weights_name(checkpoint_base(run, epoch), check_format(checkpoint_format)))
    assert info is not None
    return info


def legacy_name_metrics(filename: str) -> dict[str, Any] | None:
    """Step, time and score carried by a {run}__e{epoch}__s{step}__t{seconds}__sc{score}.pt name."""
    m = _STEP_SCORE_RE.match(filename)
    if m is None:
        return None
    return {"agent_step": int(m["step"]), "time_s": float(m["seconds"]), "score": float(m["score"])}


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP/DataParallel wrappers and torch.compile.

    FSDP2 (``fully_shard``) wraps nothing: it changes the module's class in place, so there is no
    wrapper to unwrap; its parameters are DTensors.
    """
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(module, "module"):
            module = module.module
        else:
            return module


# names that wrappers insert inside a model: torch.compile of a submodule, activation checkpointing
# (checkpoint_wrapper), FSDP1; torch.distributed.checkpoint leaves them out of its FQNs too
_WRAPPER_ATOMS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def canonical_name(name: str) -> str:
    """A parameter's or buffer's name as the unwrapped model has it: one name whatever wraps the model."""
    return ".".join(atom for atom in name.split(".") if atom not in _WRAPPER_ATOMS)


def named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's parameters by canonical name (the names its saved state and optimizer state use)."""
    return {canonical_name(n): p for n, p in unwrap_module(model).named_parameters()}


def tied_names(policy: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: name}`` of a module's tied parameters and buffers (one object under several names; the first
    name, in state-dict order, is the one stored), by canonical name; none for a state dict."""
    if not isinstance(policy, torch.nn.Module):
        return {}
    groups = tied_groups(unwrap_module(policy))
    return {canonical_name(alias): canonical_name(names[0]) for names in groups for alias in names[1:]}


def subset_of(state: Mapping[str, Any], policy: Any, only: Iterable[str] | str, source: str) -> dict[str, Any]:
    """The entries ``only`` names of a state dict (``"trainable"``: the module's parameters that require grad)."""
    if only == "trainable":
        if not isinstance(policy, torch.nn.Module):
            raise InvalidArgumentError(f"{source}: only='trainable' needs the module, not a state dict")
        only = [canonical_name(n) for n, p in unwrap_module(policy).named_parameters() if p.requires_grad]
    elif isinstance(only, str):
        raise InvalidArgumentError(f"{source}: only= takes names (or 'trainable'), got {only!r}")
    names = list(dict.fromkeys(only))
    unknown = [n for n in names if n not in state]
    if unknown or not names:
        raise InvalidArgumentError(
            f"{source}: only= names {', '.join(map(repr, unknown[:5])) or 'nothing'}"
            + (", which the state dict does not have" if unknown else " to save")
        )
    return {n: state[n] for n in names}


def state_dict_of(policy: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's state dict by canonical name (a given mapping as it is)."""
    if isinstance(policy, torch.nn.Module):
        return {canonical_name(k): v for k, v in unwrap_module(policy).state_dict().items()}
    if isinstance(policy, Mapping):
        return dict(policy)
    raise CheckpointFormatError(f"cannot save a {type(policy).__name__}: expected a module or a state dict")


@dataclass(frozen=True)
class Sidecars:
    """The sidecar files that belong to one saved weights file, as its header names them."""

    metrics: str | None
    metrics_crc32: str | None
    trainer: str | None
    declared: bool  # False for files from before sidecars were named: fixed names, each optional
    # the weights no longer carry the name they were saved under (a copy or a rename): sidecars
    # found beside them are proven theirs by the header's digests; absent ones are not damage
    moved: bool = False

    @classmethod
    def of(cls, weights: str, metadata: Mapping[str, str], source: str, storage: Storage | None = None) -> Sidecars:
        base = base_of(weights)
        if SAVE_ID_KEY not in metadata:
            return cls(base + METRICS_SUFFIX, None, base + TRAINER_SUFFIX, declared=False)
        metrics, trainer = metadata.get(METRICS_FILE_KEY), metadata.get(TRAINER_FILE_KEY)
        for name, suffix in ((metrics, METRICS_SUFFIX), (trainer, TRAINER_SUFFIX)):
            # a plain file name beside the weights: a header can never point a reader elsewhere
            if name is not None and ("/" in name or "\\" in name or name.startswith(".") or not name.endswith(suffix)):
                raise CorruptCheckpointError(f"{source}: header names sidecar {name!r}, which is not a file beside it")
        moved = any(n is not None and not n.startswith(base + ".") for n in (metrics, trainer))
        # the same name in another local directory; object stores are where ckptio's own uploads live
        saved_in = metadata.get(SAVED_IN_KEY)
        if storage is not None and storage.is_local and saved_in is not None:
            moved = moved or saved_in != directory_digest(storage)
        return cls(metrics, metadata.get(METRICS_CRC_KEY), trainer, declared=True, moved=moved)

    def names(self) -> list[str]:
        return [n for n in (self.metrics, self.trainer) if n is not None]


def _raise_missing(
    storage: Storage, weights: str, metadata: Mapping[str, str], sidecars: Sidecars, name: str | None = None
) -> None:
    """A named sidecar is not there: the checkpoint moved on meanwhile (retry), is damaged, or is a copy without it.

    Returns (after one warning) only for a copy: a copy's weights load without what did not come along.
    """
    name = name or sidecars.metrics
    assert name is not None
    error = _sidecar_missing(storage, weights, metadata, name)
    if not sidecars.moved or isinstance(error, CheckpointNotFoundError):
        raise error from None
    warnings.warn(
        f"{storage.url(weights)}: a copy whose sidecar {name} is not beside it; loading its weights without it "
        "(ckptio export copies a checkpoint with all its files)",
        CheckpointWarning,
        stacklevel=4,
    )


@dataclass(frozen=True)
class SavedCheckpoint:
    """What one save committed: the weights URI and every file name, in commit order (weights last)."""

    uri: str
    names: tuple[str, ...]

    @property
    def weights(self) -> str:
        return self.names[-1]


def metrics_payload(training_metrics: Mapping[str, Any], base: str) -> bytes:
    try:
        return json.dumps(dict(training_metrics), indent=1, sort_keys=True).encode()
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"training_metrics for {base} are not JSON-serializable: {e}") from e


@dataclass(frozen=True)
class PendingSave:
    """What one save writes: the checkpoint it names, its weights, training metrics and trainer state."""

    checkpoint: CheckpointInfo
    weights: Mapping[str, Any]  # tensors; sharded ones (DTensor) until gathered, lazily gathered ones while written
    metrics: Mapping[str, Any] | None = None
    trainer: FlatTrainerState | None = None
    partial: bool = False  # a subset of the model's tensors (save(only=...))

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch

    def copied(self, copy: Callable[[Mapping[str, Any], str], Mapping[str, Any]] | None = None) -> PendingSave:
        """This save as of now: tensors through ``copy(tensors, prefix)`` (a background save's snapshot, if
        given) and metrics frozen through their JSON form, so the caller may go on changing its own."""
        metrics = self.metrics
        if metrics is not None:
            metrics = json.loads(metrics_payload(metrics, self.checkpoint.base))
        if copy is None:
            return replace(self, metrics=metrics)
        trainer = (copy(self.trainer[0], "t."), self.trainer[1]) if self.trainer is not None else None
        return replace(self, weights=copy(self.weights, "w."), metrics=metrics, trainer=trainer)


def write_checkpoint(
    storage: Storage,
    weights: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    architecture_json: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    training_metrics: Mapping[str, Any] | None = None,
    trainer_state: FlatTrainerState | None = None,
    detach_buffers: bool = True,
    replace_other_format: bool = False,
    partial: bool = False,
) -> SavedCheckpoint:
    """Write weights file ``weights`` (its extension names the format) after its sidecars (the weights are the
    commit point), then drop the files it replaced."""
    base, checkpoint_format = base_of(weights), check_format(format_of(weights) if "." in weights else None)
    save_id = uuid.uuid4().hex[:12]
    meta: dict[str, str] = {SAVE_ID_KEY: save_id, SAVED_IN_KEY: directory_digest(storage)}
    if architecture_json is not None:
        meta["ckptio.architecture"] = json.dumps(architecture_json, sort_keys=True)
    if epoch is not None:
        meta["ckptio.epoch"] = str(epoch)
    if partial:
        meta[PARTIAL_KEY] = "1"
    names: list[str] = []
    payload = metrics_payload(training_metrics, base) if training_metrics is not None else None
    trainer: concurrent.futures.Future[str] | None = None
    try:
        if payload is not None:
            name = f"{base}.{save_id}{METRICS_SUFFIX}"
            names.append(name)
            storage.write_bytes(name, payload)
            meta[METRICS_FILE_KEY], meta[METRICS_CRC_KEY] = name, crc32_hex(payload)
        if trainer_state is not None:
            tensors, trainer_meta = trainer_state
            name = f"{base}.{save_id}{TRAINER_SUFFIX}"
            names.append(name)
            trainer = _commit_aside(
                storage, name, lambda f: write_safetensors(f, tensors, {**trainer_meta, SAVE_ID_KEY: save_id})
            )
            meta[TRAINER_FILE_KEY] = name
        committed = trainer.result if trainer is not None else None  # the sidecar appears before the weights
        if checkpoint_format == "safetensors":
            write = functools.partial(write_safetensors, tensors=state_dict, metadata=meta, detach=detach_buffers)
        else:
            write = functools.partial(save_pt, tensors=state_dict, metadata=meta)
        uri = storage.write(weights, write, before_commit=committed)
    except BaseException:
        if trainer is not None:
            concurrent.futures.wait([trainer])  # never a file still being committed behind a failed save
        _remove_uncommitted(storage, weights, save_id, names)
        raise
    names.append(weights)
    remove_replaced(storage, weights, keep=names, other_formats=replace_other_format)
    return SavedCheckpoint(uri=uri, names=tuple(names))


def _remove_uncommitted(storage: Storage, weights: str, save_id: str, sidecars: list[str]) -> None:
    """After a failed save: its sidecars go, unless its weights did appear (a failure after the rename, such as the
    directory's fsync): then they are that checkpoint's. What cannot be removed now, retention removes later."""
    if not sidecars:
        return
    try:
        if read_metadata(storage, weights).get(SAVE_ID_KEY) == save_id:
            return
    except CheckpointError:
        pass  # no weights, or another save's: these sidecars belong to nothing
    for name in sidecars:
        try:
            storage.delete(name)
        except Exception as e:  # the save's own error is the one to raise
            log.warning("%s: could not remove the sidecar of a failed save: %r", storage.url(name), e)


def uncommitted_sidecars(
    storage: Storage, listing: Iterable[str], run: str, *, skip: Iterable[str] = (), writing: Iterable[str] = ()
) -> list[str]:
    """Run ``run``'s sidecars in a listing that no weights file names: a save stopped before its commit (killed,
    or its clean-up failed) left them. Of a checkpoint with weights, only when sidecars of two saves are there
    (then its header tells which is its own). Names in ``skip`` stay, and so do the files of the checkpoints whose
    weights names are in ``writing`` (saves under way)."""
    names, skip, writing = set(listing), set(skip), set(writing)
    by_base: dict[str, dict[str, list[str]]] = {}
    for name in names:
        match = _SIDECAR_RE.match(name)
        if match and match["run"] == run and name not in skip and not weights_names(match["base"]) & writing:
            by_base.setdefault(match["base"], {}).setdefault(match["id"], []).append(name)
    orphans: list[str] = []
    for base, saves in sorted(by_base.items()):
        weights = sorted(weights_names(base) & names)
        if not weights:
            orphans += [n for group in saves.values() for n in group]
            continue
        if len(saves) < 2:
            continue
        own: set[str] = set()
        for w in weights:
            try:
                own.add(read_metadata(storage, w).get(SAVE_ID_KEY, ""))
            except CheckpointError:
                own = set(saves)  # an unreadable header cannot say which save is its own: keep them all
                break
        orphans += [n for save_id, group in saves.items() if save_id not in own for n in group]
    return sorted(orphans)


def _commit_aside(storage: Storage, name: str, writer: Callable[[IO[bytes]], None]) -> concurrent.futures.Future[str]:
    """``storage.write(name, writer)`` on a helper thread, returning once ``writer`` has handed over every byte: the
    caller writes its next file while this one's fsync and rename (or upload) go on. The future is its commit."""
    handed_over = threading.Event()

    def write(f: IO[bytes]) -> None:
        writer(f)
        handed_over.set()

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptio-commit")
    done = pool.submit(storage.write, name, write)
    pool.shutdown(wait=False)
    done.add_done_callback(lambda _: handed_over.set())  # a failure, wherever it happened, once its temporary is gone
    handed_over.wait()
    if done.done():
        done.result()  # raises if it failed: the save stops here
    return done


_SAVE_ID_RE = re.compile(r"[0-9a-f]{12}")
_SIDECAR_RE = re.compile(
    r"^(?P<base>(?P<run>[A-Za-z0-9_-]+)\.e\d+)\.(?P<id>[0-9a-f]{12})(?:\.metrics\.json|\.trainer\.safetensors)$"
)


def weights_names(base: str) -> frozenset[str]:
    """The names checkpoint ``base``'s weights may have (a trainer-state sidecar ends in .safetensors too)."""
    return frozenset(base + ext for ext in WEIGHT_EXTENSIONS)


def files_of(weights: str, listing: Iterable[str]) -> list[str]:
    """The files of the checkpoint of weights file ``weights`` in a listing: weights in any format, sidecars of
    any save, legacy sidecars.

    Only names ckptio itself writes: a user's ``model.config.json`` beside ``model.safetensors`` is not one.
    """
    base = base_of(weights)
    own = weights_names(base) | {base + s for s in (METRICS_SUFFIX, TRAINER_SUFFIX, LEGACY_ARCH_SUFFIX)}
    found = []
    for name in listing:
        if name in own:
            found.append(name)
        elif name.startswith(base + ".") and name.endswith((METRICS_SUFFIX, TRAINER_SUFFIX)):
            middle = name[len(base) + 1 :].split(".", 1)[0]
            if _SAVE_ID_RE.fullmatch(middle) and name[len(base) + 1 + len(middle) :] in (
                METRICS_SUFFIX,
                TRAINER_SUFFIX,
            ):
                found.append(name)
    return found


def remove_replaced(storage: Storage, saved: str, keep: Iterable[str], *, other_formats: bool = False) -> list[str]:
    """After a commit of weights file ``saved``: delete its checkpoint's files the save does not name (a previous
    save's).

    ``other_formats``: also the checkpoint's weights in another format (right in a run directory,
    where they would shadow the new save); otherwise those stay, with every sidecar they name.
    """
    keep = set(keep)
    files = files_of(saved, storage.listdir())
    weights = weights_names(base_of(saved))
    if not other_formats:
        for other in [n for n in files if n in weights and n not in keep]:
            keep.add(other)
            try:
                keep.update(Sidecars.of(other, read_metadata(storage, other), other).names())
            except CheckpointError:
                pass  # unreadable: nothing it names can be told apart, so its legacy names stay too
            keep.update(base_of(saved) + s for s in (METRICS_SUFFIX, TRAINER_SUFFIX, LEGACY_ARCH_SUFFIX))
    stale = [n for n in files if n not in keep]
    # other weights first: until they are gone a reader could still pick them
    stale.sort(key=lambda n: n not in weights)
    for name in stale:
        storage.delete(name)
    return stale


def _read_optional(storage: Storage, name: str) -> bytes | None:
    try:
        return storage.read_bytes(name)
    except CheckpointNotFoundError:
        return None


def _sidecar_missing(storage: Storage, weights: str, metadata: Mapping[str, str], sidecar: str) -> CheckpointError:
    """A named sidecar is gone: the checkpoint was deleted or replaced meanwhile (retry), or it is damaged."""
    try:
        current = read_metadata(storage, weights)
    except CheckpointError:
        current = None
    if current is None or current.get(SAVE_ID_KEY) != metadata.get(SAVE_ID_KEY):
        return CheckpointNotFoundError(
            f"{storage.url(weights)}: checkpoint was deleted or replaced while it was being read"
        )
    return CorruptCheckpointError(
        f"{storage.url(sidecar)}: missing; the checkpoint {storage.url(weights)} was saved with it"
    )


def read_metrics(storage: Storage, weights: str, metadata: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The training metrics saved with weights file ``weights`` (None if it was saved without)."""
    if metadata is None:
        metadata = read_metadata(storage, weights)
    sidecars = Sidecars.of(weights, metadata, storage.url(weights), storage)
    if sidecars.metrics is None:
        return None
    data = _read_optional(storage, sidecars.metrics)
    if data is None:
        if sidecars.declared:
            _raise_missing(storage, weights, metadata, sidecars)
            return None  # a copy without it
        return legacy_name_metrics(weights)
    source = storage.url(sidecars.metrics)
    if sidecars.metrics_crc32 is not None and crc32_hex(data) != sidecars.metrics_crc32:
        raise CorruptCheckpointError(
            f"{source}: content digest mismatch (crc32 {crc32_hex(data)}, weights header says {sidecars.metrics_crc32})"
        )
    try:
        metrics = json.loads(data)
    except ValueError as e:
        raise CorruptCheckpointError(f"{source}: metrics sidecar is not valid JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise CorruptCheckpointError(f"{source}: metrics sidecar is not a JSON object")
    return metrics


def read_trainer_state(
    storage: Storage,
    weights: str,
    metadata: Mapping[str, str],
    *,
    cache: NodeCache | None = None,
    verify: bool = True,
    fetched: Mapping[str, FileInfo] | None = None,
    resume: bool = False,
) -> FlatTrainerState | None:
    """The trainer-state tensors and metadata saved with ``weights``; None if it was saved without.

    A copy of a checkpoint (moved, renamed) may lack its trainer state, with a warning, except for a
    ``resume``: a resume must not restart the optimizer, step and RNG silently, wherever the run now lives.

    Mapped like the weights (a sharded optimizer takes only its ranks' blocks) and, by default,
    checked against its digest: a resume must not continue from a damaged optimizer state. With
    ``fetched`` (the files' stats ``node_fetch`` fetched them at), read from the ranges it put in the node cache
    (each chunk read is checked instead).
    """
    sidecars = Sidecars.of(weights, metadata, storage.url(weights), storage)
    name = sidecars.trainer
    if name is None:
        return None
    try:
        local, held = _local_copy(storage, name, cache, fetched)
        tensors, meta = read_weights(storage, name, verify=verify, local_path=local, held=held)
    except CheckpointNotFoundError:
        if sidecars.declared:
            _raise_missing(storage, weights, metadata, replace(sidecars, moved=False) if resume else sidecars, name)
        return None
    assert isinstance(tensors, Mapping)
    if sidecars.declared and meta.get(SAVE_ID_KEY) != metadata.get(SAVE_ID_KEY):
        raise CorruptCheckpointError(
            f"{storage.url(name)}: trainer state is not from the save of {storage.url(weights)}"
        )
    return dict(tensors), meta


def read_pt_training_state(storage: Storage, weights: str, cache: NodeCache | None = None) -> dict[str, Any] | None:
    """What a .pt training checkpoint holds beside its weights (optimizer, epoch, scheduler...); None otherwise.

    Unpickled with ``weights_only``, as the weights were: tensors and plain containers only.
    """
    if not weights.endswith(".pt"):
        return None
    local = fetch_local(storage, weights, cache)
    with open_weights(storage, weights, local) as f:
        obj = load_pt_object(f, storage.url(weights), mmap_file=False)
    key = pt_weights_key(obj) if isinstance(obj, Mapping) else None
    if key is None:
        return None
    return {str(k): v for k, v in obj.items() if k not in (key, "ckptio_metadata")}


def architecture_record(storage: Storage, weights: str, metadata: Mapping[str, str]) -> tuple[str, Any] | None:
    """(source, raw JSON) of a checkpoint's architecture: its header, else the run manifest, else a
    legacy sidecar. Nothing is imported: copying or describing a checkpoint needs no code."""
    if "ckptio.architecture" in metadata:
        return storage.url(weights) + " header", metadata["ckptio.architecture"]
    if is_hf_name(weights):  # a Hugging Face folder: its config.json, built by transformers' AutoConfig
        config = read_config(storage)
        if config is not None:
            return storage.url("config.json"), json.dumps(config_architecture(config))
    for name in (MANIFEST_NAME, base_of(weights) + LEGACY_ARCH_SUFFIX):
        data = _read_optional(storage, name)
        if data is not None:
            if name == MANIFEST_NAME:
                check_manifest_format(data, storage.url(name))
            return storage.url(name), data
    return None


def check_manifest_format(raw: bytes | str, source: str) -> None:
    """CheckpointFormatError for a run manifest of a newer format (its JSON, unparseable, is its reader's to report)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return
    if isinstance(doc, dict) and "ckptio_format" in doc:
        check_format_version(doc["ckptio_format"], source)


def resolve_architecture(
    storage: Storage, weights: str, metadata: Mapping[str, str], explicit: Any, allow: Iterable[str]
) -> Any:
    """Explicit argument, else the architecture record built through the import allow-list.

    A class that cannot be built here (outside the allow-list) stays a record: reading tensors imports
    nothing, so the load goes on, and building the module raises why."""
    if explicit is not None:
        return explicit
    found = architecture_record(storage, weights, metadata)
    return None if found is None else architecture_or_record(found[1], allow=allow, source=found[0])


def open_weights(storage: Storage, name: str, local_path: str | None = None) -> IO[bytes]:
    path = local_path or storage.local_path(name)
    if path is not None:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: no such checkpoint file") from None
        except IsADirectoryError:
            raise CheckpointFormatError(f"{path}: is a directory, not a checkpoint file") from None
    return storage.open(name, "rb")


def read_metadata(storage: Storage, name: str, local_path: str | None = None) -> dict[str, str]:
    """Header metadata of a weights file: the header alone for safetensors; a weights-only load for .pt."""
    source = storage.url(name)
    if name.endswith(HF_INDEX):  # every shard's header, checked against the index
        return read_shards(storage, name, headers_only=True)[1]
    if name.endswith(".safetensors"):
        if local_path is None and not storage.is_local:
            # two ranged reads, never the whole object
            size = storage.info(name).size
            head = storage.read_range(name, 0, min(size, 8))
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                head += storage.read_range(name, 8, 8 + n)
            return read_header(io.BytesIO(head), size, source).metadata
        with open_weights(storage, name, local_path) as f:
            return read_header(f, file_size(f), source).metadata
    return read_weights(storage, name, local_path=local_path)[1]


def read_weights(
    storage: Storage,
    name: str,
    *,
    mmap: bool | None = None,
    trusted: bool = False,
    verify: bool = False,
    local_path: str | None = None,
    held: list[tuple[int, int]] | None = None,
    cache: NodeCache | None = None,
) -> tuple[Mapping[str, torch.Tensor] | torch.nn.Module, dict[str, str]]:
    """Tensors (or a trusted pickled module) and header metadata of one weights file.

    ``mmap=None`` maps local-disk files and reads network-filesystem files eagerly. ``held``: the
    byte ranges a partial node-cache entry at ``local_path`` holds (its tensors are then read only
    where held, each chunk checked against its digest). A Hugging Face shard index reads every shard it
    names (from ``cache`` where remote).
    """
    source = storage.url(name)
    if name.endswith(HF_INDEX):
        local = storage.local_path(name)
        mmap = (local is None or not is_network_filesystem(local)) if mmap is None else mmap
        return read_shards(storage, name, mmap=mmap, verify=verify, cache=cache)
    path = local_path or storage.local_path(name)
    if mmap is None:
        mmap = path is not None and not is_network_filesystem(path)
    with open_weights(storage, name, local_path) as f:
        if name.endswith(".safetensors"):
            if held is not None and not covers(held, 0, file_size(f)):
                return _read_partial(f, source, held)
            if verify:
                verify_safetensors(f, source)
            return read_safetensors(f, source, mmap_file=mmap and path is not None)
        if name.endswith(".pt"):
            return load_pt(f, source, trusted=trusted, mmap_file=mmap and path is not None)
    raise CheckpointFormatError(f"{source}: unknown checkpoint extension (expected .safetensors or .pt)")


def _read_partial(f: IO[bytes], source: str, held: list[tuple[int, int]]) -> tuple[PartialTensors, dict[str, str]]:
    hdr = read_header(f, file_size(f), source) if covers(held, 0, 8) else None
    chunks = chunk_digests(hdr, source) if hdr is not None and covers(held, 0, hdr.data_start) else None
    if hdr is None or chunks is None:
        raise CheckpointError(f"{source}: the node cache holds part of it without its header or chunk digests")
    tensors, metadata = read_safetensors(f, source)
    data = [(max(b, hdr.data_start) - hdr.data_start, e - hdr.data_start) for b, e in held if e > hdr.data_start]
    return PartialTensors(tensors, data, chunks, source), metadata


def epoch_of(name: str, metadata: Mapping[str, str]) -> int | None:
    epoch_s = metadata.get("ckptio.epoch")
    if epoch_s and epoch_s.isdigit():
        return int(epoch_s)
    parsed = _parse(name)
    return parsed[1] if parsed else None


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What one load read: the weights (or a trusted pickled module), header metadata, metrics, architecture."""

    source: str
    weights: Mapping[str, torch.Tensor] | torch.nn.Module
    metadata: dict[str, str]
    metrics: dict[str, Any] | None
    architecture: Any
    epoch: int | None


def fetch_local(storage: Storage, name: str, cache: NodeCache | None) -> str | None:
    """A local path to read ``name`` from: None for local storage, else the node cache's copy.

    Every remote read of a checkpoint's tensors goes through here: one download per node, then mmap.
    """
    return None if storage.is_local else (cache or NodeCache()).fetch(storage, name)


def _local_copy(
    storage: Storage, name: str, cache: NodeCache | None, fetched: Mapping[str, FileInfo] | None
) -> tuple[str | None, list[tuple[int, int]] | None]:
    """Where to read ``name`` from, and (with ``fetched``) the ranges held there: the node cache's partial
    entry as ``node_fetch`` filled it, or else (without one) its whole copy."""
    if fetched is not None and name in fetched:
        # the stat node_fetch fetched with names the entry: no request of this rank's own. On local storage
        # it is the file itself where this node's disk has it, else what the master's node sent this node
        path, held = (cache or NodeCache()).holding(storage, name, fetched[name])
        if held:
            return path, held
    return fetch_local(storage, name, cache), None


def cache_checkpoint(storage: Storage, name: str, cache: NodeCache | None) -> None:
    """Fill the node cache with the files a resume maps: the weights and the trainer state."""
    if storage.is_local:
        return
    local = fetch_local(storage, name, cache)
    trainer = Sidecars.of(name, read_metadata(storage, name, local), storage.url(name)).trainer
    if trainer is not None and storage.exists(trainer):
        fetch_local(storage, trainer, cache)


# a first ranged read of a header: enough for most headers (chunk digests included) in one request
HEADER_GUESS = 64 * 1024
# where a tensor is wanted: (offset, shape) of the block a rank reads, None where it reads none of it
Want = Callable[[str, str, tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]] | None]


def _cached_header(storage: Storage, name: str, cache: NodeCache, info: FileInfo | None = None) -> SafetensorsHeader:
    path, held = cache.fetch_ranges(storage, name, [(0, HEADER_GUESS)], info=info)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > held[0][1] and n <= MAX_HEADER_BYTES:
            path, held = cache.fetch_ranges(storage, name, [(0, 8 + n)], info=info)
        return read_header(f, file_size(f), storage.url(name))


def _header_extent(f: IO[bytes], size: int) -> int:
    n = int.from_bytes(os.pread(f.fileno(), 8, 0), "little")
    return max(min(size, HEADER_GUESS), min(size, 8 + n))


def header_bytes(storage: Storage, name: str, cache: NodeCache, info: FileInfo) -> bytes:
    """The leading bytes of ``name`` a node reads for its header, from the node cache (``cache_headers`` put them
    there): another node given them (``put_header_bytes``) reads its header without a request to the store."""
    path, held = cache.holding(storage, name, info)
    with open(path, "rb") as f:
        end = _header_extent(f, info.size)
        if not covers(held, 0, end):
            raise CorruptCheckpointError(f"{storage.url(name)}: its header is not in the node cache at {path}")
        return os.pread(f.fileno(), end, 0)


def put_header_bytes(storage: Storage, name: str, cache: NodeCache, info: FileInfo, data: bytes) -> None:
    """Put another node's ``header_bytes`` of ``name`` in this node's cache, as if read from the store."""
    cache.put_ranges(storage, name, [(0, data)], None, info)


def trainer_name(storage: Storage, weights: str, metadata: Mapping[str, str]) -> str | None:
    """The trainer-state sidecar a weights header names (None without)."""
    return Sidecars.of(weights, metadata, storage.url(weights)).trainer


def cache_headers(
    storage: Storage, name: str, cache: NodeCache, infos: dict[str, FileInfo] | None = None
) -> dict[str, SafetensorsHeader]:
    """The headers of a checkpoint's tensor files (weights, then trainer state if any), put in the node cache.

    ``infos``: the files' stats as far as known, completed here (on a store, each stat is a request).
    """
    infos = {} if infos is None else infos
    if name not in infos:
        infos[name] = storage.info(name)
    headers = {name: _cached_header(storage, name, cache, infos[name])}
    trainer = trainer_name(storage, name, headers[name].metadata)
    if trainer is not None and trainer not in infos:
        with contextlib.suppress(CheckpointNotFoundError):  # a checkpoint saved without trainer state
            infos[trainer] = storage.info(trainer)
    if trainer is not None and trainer in infos:
        headers[trainer] = _cached_header(storage, trainer, cache, infos[trainer])
    return headers


def wanted_ranges(
    storage: Storage, name: str, cache: NodeCache, want: Want | None, infos: dict[str, FileInfo] | None = None
) -> dict[str, list[tuple[int, int]] | None]:
    """The byte ranges of a checkpoint's tensor files one rank reads, by file, from headers already cached
    (``want`` None: every byte, as a rank loading the whole model reads).

    A file without chunk digests (from older ckptio or another writer) is wanted whole (None): a part of it
    could not be checked.
    """
    out: dict[str, list[tuple[int, int]] | None] = {}
    for file, hdr in cache_headers(storage, name, cache, infos).items():
        label = "weights" if file == name else "trainer"
        chunks = chunk_digests(hdr, storage.url(file))
        if chunks is None:
            out[file] = None
            continue
        if want is None:
            out[file] = [(0, hdr.file_size)]
            continue
        by_key: dict[str, list[str]] = {}
        for alias, target in json.loads(hdr.metadata.get("ckptio.aliases") or "{}").items():
            by_key.setdefault(target, []).append(alias)
        ranges = [(0, hdr.data_start)]
        for key, (dtype, shape, begin, _) in hdr.entries.items():
            for wanted_as in [key, *by_key.get(key, [])]:
                block = want(label, wanted_as, shape)
                if block is None:
                    continue
                at = hdr.data_start + begin
                ranges += [(at + b, at + e) for b, e in block_ranges(shape, dtype.itemsize, *block)]
        out[file] = merge_ranges(ranges)  # the cache widens them to whole chunks
    return out


@dataclass(frozen=True)
class FileChunks:
    """A tensor file's digested chunks as file offsets: the units a node fetches, shares and checks whole."""

    source: str
    size: int
    data_start: int
    digests: ChunkDigests

    @property
    def cuts(self) -> list[int]:
        """The file offset of every chunk's first byte."""
        return [self.data_start + start for start in self.digests.starts]

    def check(self, start: int, data: bytes | memoryview) -> None:
        """Raise unless ``data``, the file's bytes from ``start`` to a chunk's end, match their chunk digests.

        Bytes of the header, before the first chunk, are not digested: a header is validated when read.
        """
        at = self.data_start
        with memoryview(data) as view:
            for i in self.digests.span(max(start, at) - at, start + len(view) - at):
                b, e = self.digests.bounds(i)
                self.digests.check(i, view[b + at - start : e + at - start], self.source)


def file_chunks(storage: Storage, name: str, cache: NodeCache, info: FileInfo | None = None) -> FileChunks | None:
    """A tensor file's chunks, from its header in the node cache (None without chunk digests)."""
    hdr = _cached_header(storage, name, cache, info)
    source = storage.url(name)
    digests = chunk_digests(hdr, source)
    return None if digests is None else FileChunks(source, hdr.file_size, hdr.data_start, digests)


def load_checkpoint(
    storage: Storage,
    name: str,
    *,
    policy_architecture: Any = None,
    mmap: bool | None = None,
    trusted: bool = False,
    verify: bool = False,
    allow: Iterable[str] = (),
    cache: NodeCache | None = None,
    with_metrics: bool = True,
    fetched: Mapping[str, FileInfo] | None = None,
) -> LoadedCheckpoint:
    """Read weights file ``name`` with its metrics and architecture (imported through the allow-list).

    With ``verify``, every file of the checkpoint is checked against its digest first. With
    ``fetched`` (the files' stats ``node_fetch`` fetched them at), a remote file is read from the ranges it put
    in the node cache.
    """
    source = storage.url(name)
    local_path, held = (None, None) if name.endswith(HF_INDEX) else _local_copy(storage, name, cache, fetched)
    obj, metadata = read_weights(
        storage, name, mmap=mmap, trusted=trusted, verify=verify, local_path=local_path, held=held, cache=cache
    )
    if isinstance(obj, torch.nn.Module):
        return LoadedCheckpoint(source, obj, metadata, None, None, None)
    metrics = read_metrics(storage, name, metadata) if with_metrics else None
    if verify:
        read_trainer_state(storage, name, metadata, cache=cache, verify=True)
    arch = resolve_architecture(storage, name, metadata, policy_architecture, allow)
    return LoadedCheckpoint(source, obj, metadata, metrics, arch, epoch_of(name, metadata))


def delete_checkpoint(storage: Storage, name: str, listing: list[str] | None = None) -> None:
    """Delete a checkpoint: its weights first (it vanishes at once), then every other file of it."""
    storage.delete(name)
    names = files_of(name, storage.listdir() if listing is None else listing)
    names.sort(key=lambda n: n not in weights_names(base_of(name)))
    for other in names:
        if other != name:
            storage.delete(other)


def manifest_payload(architecture_json: Mapping[str, Any], version: str) -> bytes:
    doc = dict(architecture_json)
    doc["ckptio_version"] = version
    doc["ckptio_format"] = FORMAT_VERSION
    doc["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def write_manifest(storage: Storage, architecture_json: Mapping[str, Any], version: str) -> bool:
    """Write the run's write-once manifest; False if one exists already (it is never overwritten)."""
    try:
        storage.write_bytes(MANIFEST_NAME, manifest_payload(architecture_json, version), exclusive=True)
        return True
    except FileExistsError:
        return False
