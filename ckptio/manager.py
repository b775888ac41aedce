"""CheckpointManager: persistence of one run's checkpoints (save, the manifest, retention).

No rank logic lives here: the Checkpointer decides who calls what. Finding checkpoints is in
``discovery``, the files of one checkpoint in ``layout``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .architecture import architecture_to_json, architectures_equal
from .artifact import PolicyArtifact
from .cache import NodeCache
from .discovery import CheckpointInfo, best, checkpoint_metrics, list_checkpoints, load_from_uri, load_latest, scan
from .errors import (
    ArchitectureError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSecurityError,
    CheckpointWarning,
    InvalidArgumentError,
    save_failed,
    typed_io,
)
from .layout import (
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    SavedCheckpoint,
    check_epoch,
    check_format,
    check_manifest_format,
    checkpoint_of,
    delete_checkpoint,
    fetch_local,
    read_metadata,
    read_pt_training_state,
    read_trainer_state,
    sanitize_run_name,
    state_dict_of,
    uncommitted_sidecars,
    weights_name,
    write_checkpoint,
    write_manifest,
)
from .storage import FileInfo, Storage
from .trainer_state import FlatTrainerState, as_flat_trainer_state, unflatten
from .version import __version__

__all__ = ["CheckpointManager", "retention", "save_policy_artifact"]

# what a model folder holds (transformers' save_pretrained, torch.save, an export): not a run directory's files
MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".gguf")

log = logging.getLogger("ckptio")


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
        check_format(checkpoint_format)
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
        self._run_name = sanitize_run_name(run_name) if run_name else None  # else found at first need
        self.checkpoint_format = checkpoint_format
        self.keep_last = keep_last
        self.keep_best = keep_best
        self._cleaned = False
        self._warned_unranked = False  # keep_best's metric is on no checkpoint: said once
        self._writing: set[str] = set()  # weights names being saved: their sidecars are not litter yet
        self._writing_lock = threading.Lock()
        self.last_saved: str | None = None  # retention never deletes this process's newest save

    @property
    def checkpoint_dir(self) -> str:
        return self.storage.url()

    @property
    def run_name(self) -> str:
        """The name this run's checkpoint files carry: as given; else the run directory's, unless a local directory
        holds the checkpoints of one other run only (a run directory copied or moved under a new name is that run)."""
        if self._run_name is None:
            self._run_name = self._find_run_name()
        return self._run_name

    def _find_run_name(self) -> str:
        own = sanitize_run_name(posixpath.basename(self.run_storage.root) or "run")
        if not self.storage.is_local:  # copies and renames are a disk's (cp, mv, a new mount): no listing request
            return own
        with typed_io(self.checkpoint_dir, "listing checkpoints"):
            runs = sorted({i.run for i in scan(self.storage)})
        if not runs or own in runs:
            return own
        if len(runs) == 1:
            log.info("%s: holds the checkpoints of run %r only: continuing that run", self.checkpoint_dir, runs[0])
            return runs[0]
        raise CheckpointError(
            f"{self.checkpoint_dir}: holds the checkpoints of runs {', '.join(map(repr, runs))}, none named {own!r} "
            "after its directory: name the run to continue (CheckpointConfig(run_name=...) or "
            "CheckpointManager(..., run_name=...))"
        )

    def check_run_directory(self) -> None:
        """Before a job writes here: CheckpointFormatError if the directory holds model files but no ``checkpoints/``
        (a Hugging Face model folder, an export): that is someone's model, not a run, and ckptio writes nothing there."""
        with typed_io(self.run_storage.url(), "listing the run directory"):
            listing = self.run_storage.listdir()
        if CHECKPOINTS_DIR in listing:
            return
        models = [n for n in listing if n.endswith(MODEL_FILE_SUFFIXES) and not n.startswith(".")]
        if models:
            shown = ", ".join(models[:3]) + (f" and {len(models) - 3} more" if len(models) > 3 else "")
            raise CheckpointFormatError(
                f"{self.run_storage.url()}: holds {shown} but no {CHECKPOINTS_DIR}/ folder: a model folder, not a "
                "ckptio run directory, and ckptio writes nothing into it. Load it with ckptio.load_from_uri (or "
                "ckptio inspect it), and give the Checkpointer a run directory of its own"
            )

    def checkpoint(self, epoch: int) -> CheckpointInfo:
        """The checkpoint this run names for ``epoch`` (whether or not it is saved yet)."""
        return checkpoint_of(self.storage, self.run_name, epoch, self.checkpoint_format)

    def save_checkpoint(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None = None,
        *,
        policy_architecture: Any = None,
        trainer_state: FlatTrainerState | Mapping[str, Any] | None = None,
        protect: Iterable[str] = (),
        prune: bool = True,
        partial: bool = False,
    ) -> SavedCheckpoint:
        """Write the checkpoint for ``epoch`` atomically, then apply retention; returns what it committed.

        ``trainer_state``: a nested dict (tensors and plain values, read back by ``load_trainer_state``) or the
        flat form ``trainer_state.flatten`` gives. ``partial``: the weights are a subset of the model's.

        A failure raises CheckpointSaveError (also an OSError when the cause is one); what was
        committed before stays as it was.
        """
        target = self.checkpoint(epoch)
        state = state_dict_of(policy)
        arch_json = architecture_to_json(policy_architecture) if policy_architecture is not None else None
        try:
            if not self._cleaned:
                step = "removing what crashed writers left"
                self.storage.clean_temporaries()
                self._cleaned = True
            step = "writing"
            with self._writing_lock:
                self._writing.add(target.name)
            try:
                saved = write_checkpoint(
                    self.storage,
                    target.name,
                    state,
                    architecture_json=arch_json,
                    epoch=epoch,
                    training_metrics=training_metrics,
                    trainer_state=as_flat_trainer_state(trainer_state),
                    replace_other_format=True,  # in a run directory the old format would shadow this save
                    partial=partial,
                )
            finally:
                with self._writing_lock:
                    self._writing.discard(target.name)
            self.last_saved = saved.weights
            if prune:
                step = "applying retention"
                self.prune(protect=protect)
        except (CheckpointFormatError, InvalidArgumentError, CheckpointSecurityError):
            raise  # the caller's input, not a failed write
        except Exception as e:
            raise save_failed(target.uri, step, e) from e
        return saved

    def save_agent(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None = None,
        *,
        policy_architecture: Any = None,
        trainer_state: FlatTrainerState | Mapping[str, Any] | None = None,
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
        return [i for i in scan(self.storage) if i.run == self.run_name]

    def latest(self, uri: str | None = None) -> CheckpointInfo:
        """This run's newest checkpoint by epoch (any directory's, when ``uri`` is given); raises if none."""
        found = self.list_checkpoints(uri)
        if not found:
            raise CheckpointNotFoundError(f"{uri or self.checkpoint_dir}: no checkpoints of run {self.run_name!r}")
        return found[-1]

    def select_checkpoints(
        self, uri: str | None = None, metric: str | None = None, mode: str = "max", count: int = 1
    ) -> list[CheckpointInfo]:
        """The best ``count`` of this run's checkpoints by a training metric (newest first without one)."""
        return best(self.list_checkpoints(uri), metric, mode, count)

    def load_from_uri(self, uri: str | None = None, policy_architecture: Any = None, **kwargs: Any) -> PolicyArtifact:
        """Load a checkpoint (default: this run's latest)."""
        kwargs.setdefault("storage_options", self.storage_options)
        if uri is not None:
            return load_from_uri(uri, policy_architecture, **kwargs)
        kwargs.pop("storage_options")
        return load_latest(self.latest, policy_architecture=policy_architecture, **kwargs)

    def read_trainer_state(
        self,
        info: CheckpointInfo,
        cache: NodeCache | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        fetched: Mapping[str, FileInfo] | None = None,
        resume: bool = False,
    ) -> FlatTrainerState | None:
        """The trainer state saved with a checkpoint (digest checked); None if it was saved without. With
        ``fetched`` (the stats ``node_fetch`` fetched at): from the ranges of it this node fetched, each read chunk
        checked. With ``resume``, a copy without its trainer state is damage too."""
        if metadata is None:
            metadata = read_metadata(info.storage, info.name, local_path=fetch_local(info.storage, info.name, cache))
        return read_trainer_state(info.storage, info.name, metadata, cache=cache, fetched=fetched, resume=resume)

    def read_resume_state(
        self,
        info: CheckpointInfo,
        cache: NodeCache | None,
        metadata: Mapping[str, str],
        *,
        allow_missing: bool,
        fetched: Mapping[str, FileInfo] | None = None,
    ) -> tuple[Any, Any, list[Any]]:
        """What a resume restores besides the weights: (the user's trainer state, the FQN-keyed optimizer state,
        each rank's RNG state). A missing or damaged trainer-state file raises, unless ``allow_missing`` (a
        warning, and nothing restored); a .pt training checkpoint gives its optimizer and the rest as they are."""
        try:
            with typed_io(info.uri, "reading the trainer state"):
                raw = self.read_trainer_state(info, cache, metadata, fetched=fetched, resume=True)
        except CheckpointNotFoundError:
            raise
        except CheckpointError as e:
            if not allow_missing:
                raise type(e)(
                    f"{e}; refusing to resume with a fresh optimizer and RNG state "
                    "(CheckpointConfig(resume_without_trainer_state=True) allows it)"
                ) from e
            log.warning("resuming %s without its trainer state: %s", info.uri, e)
            raw = None
        if raw is not None:
            tree = unflatten(*raw, source=info.storage.url(info.base))
            return tree.get("user"), tree.get("optimizer"), tree.get("rng") or []
        if metadata.get("ckptio.pt_key"):
            # a .pt training checkpoint from before ckptio: its optimizer (keyed by parameter index, as
            # torch's optimizer.state_dict() keys it) and the rest reach the trainer state as they are
            with typed_io(info.uri, "reading the training checkpoint's optimizer"):
                extras = read_pt_training_state(info.storage, info.name, cache)
            log.info("%s: trainer state from the .pt training checkpoint: %s", info.uri, sorted(extras or {}))
            return extras, None, []
        return None, None, []

    def load_trainer_state(self, info: CheckpointInfo | None = None, cache: NodeCache | None = None) -> Any:
        """The trainer state saved with a checkpoint (default: the latest), as the nested structure it was saved
        as: ``{"user": ..., "epoch": ..., "rng": [...], "optimizer": ...}``; None if it was saved without."""
        info = info if info is not None else self.latest()
        raw = self.read_trainer_state(info, cache)
        return None if raw is None else unflatten(*raw, source=info.uri)

    # -- retention -------------------------------------------------------------------------------
    def prune(self, protect: Iterable[str] = ()) -> list[str]:
        """Delete this run's checkpoints that retention does not keep, and the sidecars of saves that never
        committed (a writer killed mid-save); returns the checkpoints' URIs."""
        listing = self.storage.listdir()
        protect = set(protect)
        with self._writing_lock:
            writing = set(self._writing)
        for name in uncommitted_sidecars(self.storage, listing, self.run_name, skip=protect, writing=writing):
            log.info("removing %s: a save that never committed left it", self.storage.url(name))
            self.storage.delete(name)
        infos = [i for i in scan(self.storage, listing) if i.run == self.run_name]
        ranked = None
        if self.keep_best is not None and infos:
            metric, mode, k = self.keep_best
            ranked = best(infos, metric, mode, k, strict=False)  # unreadable metrics rank nowhere; never fail a save
            if not ranked:  # a metric no checkpoint carries (a typo?) cannot say which are the best: keep them all
                self._warn_unranked(metric, infos[-1])
                return []
        protected = {*protect, *([self.last_saved] if self.last_saved is not None else [])}
        doomed = retention(infos, protected=protected, keep_last=self.keep_last, best=ranked)
        for info in doomed:
            self.delete(info, listing)
        return [i.uri for i in doomed]

    def _warn_unranked(self, metric: str, newest: CheckpointInfo) -> None:
        if self._warned_unranked:
            return
        self._warned_unranked = True
        try:
            carried = sorted(checkpoint_metrics(newest) or {})
        except CheckpointError:
            carried = []
        warnings.warn(
            f"{self.checkpoint_dir}: keep_best ranks by {metric!r}, which no checkpoint of run {self.run_name!r} "
            f"carries (the newest carries {', '.join(map(repr, carried)) or 'no metrics'}): retention deletes "
            "nothing until one does",
            CheckpointWarning,
            stacklevel=3,
        )

    def delete(self, info: CheckpointInfo, listing: list[str] | None = None) -> None:
        """Delete a checkpoint: its weights first (it vanishes at once), then every other file of it."""
        delete_checkpoint(info.storage, info.name, listing)

    # -- the manifest ----------------------------------------------------------------------------
    def ensure_manifest(self, architecture: Any) -> None:
        """Write the run's write-once manifest if absent; ArchitectureError if it names another architecture."""
        arch_json = architecture_to_json(architecture)
        target = self.storage.url(MANIFEST_NAME)

        def read() -> bytes | None:
            with typed_io(target, "reading the manifest"):
                try:
                    return self.storage.read_bytes(MANIFEST_NAME)
                except CheckpointNotFoundError:
                    return None

        # read first: on every resume the manifest is there, and on a store one read says so and what it holds
        existing_raw = read()
        if existing_raw is None:
            try:
                if write_manifest(self.storage, arch_json, __version__):
                    return
            except CheckpointError:
                raise
            except Exception as e:
                raise save_failed(target, "writing the manifest", e) from e
            existing_raw = read()  # another job wrote it meanwhile
            if existing_raw is None:
                raise ArchitectureError(f"{target}: the manifest exists, then vanished while it was read")
        try:
            existing = json.loads(existing_raw)
        except ValueError as e:
            raise ArchitectureError(f"{target}: manifest is not valid JSON: {e}") from None
        check_manifest_format(existing_raw, target)
        if not isinstance(existing, dict) or not architectures_equal(existing, arch_json):
            shown = {k: existing.get(k) for k in ("class_path", "config")} if isinstance(existing, dict) else existing
            raise ArchitectureError(
                f"{target}: this run was created with architecture {json.dumps(shown)}"
                f" but this job uses {json.dumps(arch_json)}; refusing to resume into a different model "
                "(use a new run directory)"
            )


def retention(
    infos: list[CheckpointInfo],
    *,
    protected: Iterable[str] = (),
    keep_last: int | None = None,
    best: Iterable[CheckpointInfo] | None = None,
) -> list[CheckpointInfo]:
    """What retention deletes of ``infos`` (oldest first), as a rule without I/O: nothing when neither
    ``keep_last`` nor ``best`` is given; else all but the newest, the last ``keep_last``, the ``best``
    (ranked by the caller), the ``protected`` names, and checkpoints other tools wrote."""
    if not infos or (keep_last is None and best is None):
        return []
    keep = {infos[-1].name, *protected}
    if keep_last is not None:
        keep |= {i.name for i in infos[-keep_last:]}
    if best is not None:
        keep |= {i.name for i in best}
    return [i for i in infos if i.name not in keep and not i.legacy]


def save_policy_artifact(
    base_path: str,
    policy: torch.nn.Module | Mapping[str, torch.Tensor],
    policy_architecture: Any,
    training_metrics: Mapping[str, Any] | None = None,
    detach_buffers: bool = True,
    *,
    epoch: int | None = None,
    checkpoint_format: str = "safetensors",
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``{base}.safetensors`` (architecture in its header) and its metrics sidecar; returns the weights URI."""
    directory, base = posixpath.split(base_path.rstrip("/"))
    if not base:
        raise CheckpointFormatError(f"{base_path!r} names no file")
    storage = Storage(directory or ".", dict(storage_options or {}))
    arch_json = architecture_to_json(policy_architecture) if policy_architecture is not None else None
    return write_checkpoint(
        storage,
        weights_name(base, check_format(checkpoint_format)),
        state_dict_of(policy),
        architecture_json=arch_json,
        epoch=check_epoch(epoch) if epoch is not None else None,
        training_metrics=training_metrics,
        detach_buffers=detach_buffers,
    ).uri
