"""Checkpointer: checkpointing coordinated across the ranks of a training loop.

Rank coordination only: who writes (the master), what every rank resumes from (the master's
choice), and the collectives that keep ranks together. Persistence is the CheckpointManager's,
background saving the AsyncSaver's, copies to object storage the RemoteMirror's.
"""

from __future__ import annotations

import atexit
import json
import logging
import posixpath
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ranks, sharded
from .async_save import AsyncSaver
from .cache import DEFAULT_MAX_BYTES, NodeCache
from .discovery import CheckpointInfo, artifact_of
from .errors import (
    ArchitectureError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    save_failed,
    typed_io,
)
from .layout import check_epoch, state_dict_of
from .manager import CheckpointManager
from .mirror import RemoteMirror
from .trainer_state import capture_rng_state, flatten, restore_rng_state, unflatten
from .upload import Uploader

__all__ = ["CheckpointConfig", "Checkpointer"]

log = logging.getLogger("ckptio")


@dataclass
class CheckpointConfig:
    """How a training run checkpoints. Every field has a working default; the groups:

    - What is written: ``checkpoint_format`` ("safetensors", or "pt" for plain models), every
      ``epoch_interval`` epochs (``save(force=True)`` saves anyway), named ``{run_name}.e{epoch}``.
    - Retention: ``keep_last`` newest and ``keep_best=(metric, "max"|"min", count)``; None keeps all.
      Never deleted: the newest, this job's last save, anything still uploading.
    - The run directory's fsspec ``storage_options`` (credentials, endpoint), when it is a URI.
    - Object storage: ``remote_uri`` (+ ``remote_storage_options``) gets a copy of every checkpoint from
      ``upload_workers`` background threads; at most ``upload_max_pending`` wait (``upload_coalesce``
      skips the oldest waiting one rather than block ``save``); each file is retried ``upload_retries``
      times from ``upload_backoff_s`` and bounded by ``upload_file_timeout_s``; ``on_uploaded(uri)`` is
      called once a copy committed; ``close()`` waits for uploads within ``close_timeout_s``.
    - ``async_save``: ``save`` returns once tensors are copied to CPU; writing runs in the background.
    - Resume from object storage: ``cache_dir`` (default ``$CKPTIO_CACHE_DIR`` or ``~/.cache/ckptio``)
      holds one copy per node, up to ``cache_max_bytes``.
    - ``resume_without_trainer_state``: resume with a fresh optimizer and RNG (a warning) when the
      trainer-state file is missing or damaged, instead of raising.
    - ``shard_timeout_s``: how long a sharded (DTensor) save waits for another rank before failing.
    """

    checkpoint_format: str = "safetensors"
    epoch_interval: int = 1
    # The name checkpoint files carry ({run}.e{epoch}); default: the remote URI's or run directory's
    # last component. Runs sharing a directory are told apart by it (retention and resume are per run).
    run_name: str | None = None
    keep_last: int | None = None
    keep_best: tuple[str, str, int] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Object storage: checkpoints are written locally, then uploaded by background threads.
    remote_uri: str | None = None
    remote_storage_options: dict[str, Any] = field(default_factory=dict)
    upload_workers: int = 2
    upload_max_pending: int = 2
    upload_coalesce: bool = True
    upload_retries: int = 5
    upload_backoff_s: float = 0.5
    upload_file_timeout_s: float | None = 600.0
    # Called (on an upload thread) with a checkpoint's remote weights URI once its upload committed:
    # hand it to remote evaluation jobs. save() returns the local URI, before the upload is done.
    on_uploaded: Callable[[str], None] | None = None
    close_timeout_s: float | None = None  # bound on close() waiting for uploads; None waits
    # Async save: the training thread only snapshots tensors to CPU; the rest runs in background.
    async_save: bool = False
    # Node-local cache for checkpoints loaded from object storage.
    cache_dir: str | None = None
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    # A checkpoint saved with trainer state whose trainer-state file is missing or damaged: resuming
    # would silently restart the optimizer and RNG, so it is an error unless this allows it (a warning).
    resume_without_trainer_state: bool = False
    # Sharded (DTensor/FSDP2) saves: how long a rank waits for another in the gathers before it
    # gives up with CheckpointSaveError (a rank that died mid-save must not hang the others forever).
    shard_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.epoch_interval < 1:
            raise ValueError("epoch_interval must be >= 1")


class Checkpointer:
    """Rank-aware save/resume for one run directory (local path or URI)."""

    def __init__(
        self,
        run_dir_or_uri: str,
        policy_architecture: Any,
        config: CheckpointConfig | None = None,
        *,
        allow: Iterable[str] = (),
    ):
        self.config = config or CheckpointConfig()
        self._architecture = policy_architecture
        self.allow = tuple(allow)
        # the run's name, which its checkpoint files carry: with a remote copy, the durable location
        # names the run, so jobs on other nodes (other local directories) resume the same run
        run_name = self.config.run_name or (
            posixpath.basename(self.config.remote_uri.rstrip("/")) if self.config.remote_uri else None
        )
        self.manager = CheckpointManager(
            run_dir_or_uri,
            self.config.checkpoint_format,
            keep_last=self.config.keep_last,
            keep_best=self.config.keep_best,
            run_name=run_name,
            storage_options=self.config.storage_options,
        )
        self.remote: CheckpointManager | None = None
        self.mirror: RemoteMirror | None = None
        if self.config.remote_uri:
            self.remote = CheckpointManager(
                self.config.remote_uri,
                self.config.checkpoint_format,
                keep_last=self.config.keep_last,
                keep_best=self.config.keep_best,
                run_name=self.manager.run_name,
                storage_options=self.config.remote_storage_options,
            )
            self.mirror = RemoteMirror(
                self.manager,
                self.remote,
                on_uploaded=self.config.on_uploaded,
                workers=self.config.upload_workers,
                max_pending=self.config.upload_max_pending,
                coalesce=self.config.upload_coalesce,
                retries=self.config.upload_retries,
                backoff_s=self.config.upload_backoff_s,
                file_timeout_s=self.config.upload_file_timeout_s,
            )
        self.cache = NodeCache(self.config.cache_dir, self.config.cache_max_bytes)
        self.async_saver = AsyncSaver()
        self.resumed_from: CheckpointInfo | None = None
        self.trainer_state: Any = None
        self.start_epoch = 0
        self._registered = False  # this rank took part in register()
        self._manifest_checked = False  # the master wrote or checked the manifest
        self._closed = False
        self._shard_group: Any = None
        self._saved_optimizer: Any = None  # the FQN-keyed optimizer state read at resume
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def policy_architecture(self) -> Any:
        return self._architecture

    @property
    def rank(self) -> ranks.RankInfo:
        return ranks.rank_info()

    @property
    def uploader(self) -> Uploader | None:
        """The background uploader (None without a remote_uri, or before the first upload)."""
        return self.mirror.uploader if self.mirror is not None else None

    # -- manifest ------------------------------------------------------------------------------
    def _check_manifest(self) -> str | None:
        """Master: write the manifest (locally, and remotely) if absent; an error if one names another architecture."""
        if self._manifest_checked:
            return None
        for manager in (self.manager, self.remote):
            if manager is not None:
                error = manager.ensure_manifest(self._architecture)
                if error:
                    return error
        self._manifest_checked = True
        return None

    def register(self) -> None:
        """Master writes the write-once manifest; every rank raises if the run's architecture differs."""
        # every rank enters this collective exactly once, whatever the master did alone before
        if self._registered:
            return
        error = ranks.master_result(self._check_manifest)  # a failure on the master reaches every rank
        if error:
            raise ArchitectureError(error)
        self._registered = True

    # -- resume --------------------------------------------------------------------------------
    def _choose_latest(self) -> tuple[str, str] | None:
        """(where, name) of the newest checkpoint, local or remote; the master's view only."""
        found = []
        for where, manager in (("local", self.manager), ("remote", self.remote)):
            if manager is None:
                continue
            with typed_io(manager.checkpoint_dir, "listing checkpoints"):
                infos = manager.list_checkpoints()
            if infos:
                found.append((infos[-1].epoch, where == "local", where, infos[-1].name))
        return max(found)[2:] if found else None

    def _read(self, info: CheckpointInfo) -> Any:
        """Every rank: the checkpoint's weights mapped (remote ones through one download per node)."""
        if not info.storage.is_local:
            # one download per node: the node's first rank fills the cache, the others wait, then
            # every rank maps the same local file
            error = None
            if self.rank.is_local_master:
                try:
                    with typed_io(info.uri, "downloading into the node cache"):
                        self.manager.cache_checkpoint(info, self.cache)
                except Exception as e:
                    error = e
            ranks.raise_together(error)  # in place of a barrier: a failed download stops every rank
        with typed_io(info.uri, "loading"):
            # metrics play no part in resuming: a damaged metrics file must not stop a run from continuing
            return self.manager.read_checkpoint(
                info, self.cache, policy_architecture=self._architecture, allow=self.allow, with_metrics=False
            )

    def _read_trainer_state(self, info: CheckpointInfo, metadata: Mapping[str, str], restore_rng: bool) -> None:
        self.trainer_state = self._saved_optimizer = None
        try:
            with typed_io(info.uri, "reading the trainer state"):
                raw = self.manager.read_trainer_state(info, self.cache, metadata)
        except CheckpointNotFoundError:
            raise
        except CheckpointError as e:
            if not self.config.resume_without_trainer_state:
                raise type(e)(
                    f"{e}; refusing to resume with a fresh optimizer and RNG state "
                    "(CheckpointConfig(resume_without_trainer_state=True) allows it)"
                ) from e
            log.warning("resuming %s without its trainer state: %s", info.uri, e)
            raw = None
        if raw is None and metadata.get("ckptio.pt_key"):
            # a .pt training checkpoint from before ckptio: its optimizer (keyed by parameter index, as
            # torch's optimizer.state_dict() keys it) and the rest reach the trainer state as they are
            with typed_io(info.uri, "reading the training checkpoint's optimizer"):
                self.trainer_state = self.manager.read_pt_training_state(info, self.cache)
            log.info(
                "%s: trainer state from the .pt training checkpoint: %s", info.uri, sorted(self.trainer_state or {})
            )
        if raw is not None:
            tree = unflatten(*raw, source=info.storage.url(info.base))
            self.trainer_state = tree.get("user")
            self._saved_optimizer = tree.get("optimizer")
            if restore_rng:
                self._restore_rng(tree.get("rng") or [])

    def _load(self, info: CheckpointInfo, env_metadata: Any, device: Any, restore_rng: bool) -> torch.nn.Module:
        loaded = self._read(info)
        module = artifact_of(loaded).instantiate(env_metadata, device=device)
        self._read_trainer_state(info, loaded.metadata, restore_rng)
        return module

    def _load_into(
        self, info: CheckpointInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, restore_rng: bool
    ) -> None:
        loaded = self._read(info)
        if isinstance(loaded.weights, torch.nn.Module):
            raise CheckpointFormatError(f"{info.uri}: holds a pickled module, not a state dict to load into a model")
        sharded.load_model_state(model, loaded.weights, info.uri)
        self._read_trainer_state(info, loaded.metadata, restore_rng)
        if optimizer is not None:
            self._load_optimizer(model, optimizer, info.uri)

    def _restore_rng(self, rng: list[Any]) -> None:
        me, world = self.rank.rank, self.rank.world_size
        if len(rng) == world:
            restore_rng_state(rng[me])
        elif rng:
            log.warning("RNG states were saved for %d ranks, this job has %d: not restored", len(rng), world)

    def load_or_create_policy(
        self, env_metadata: Any, *, device: torch.device | str | None = None, restore_rng: bool = True
    ) -> torch.nn.Module:
        """Every rank: the latest checkpoint's policy (the master's choice), or a fresh identical one."""
        self.async_saver.wait()  # a save still in the background is part of what "latest" means
        self.register()
        chosen = ranks.master_result(self._choose_latest)  # a listing failure reaches every rank
        if chosen is None:
            # the master's seed, not a draw: creating the policy must not shift any rank's RNG stream
            seed = ranks.broadcast_object(torch.initial_seed() if self.rank.is_master else None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self._architecture.make_policy(env_metadata)
            self.resumed_from, self.trainer_state, self.start_epoch = None, None, 0
            return module.to(device) if device is not None else module
        info = self._info(chosen)
        module, error = None, None
        try:
            module = self._load(info, env_metadata, device, restore_rng)
        except Exception as e:
            error = e
        ranks.raise_together(error)  # a rank that cannot load stops the others before they train alone
        self._resumed(info)
        return module

    def load_into(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = True
    ) -> bool:
        """Every rank: fill an already built (sharded, or on ``meta``) model from the latest checkpoint.

        Each rank reads only its own blocks of the mapped file, at any world size; with
        ``optimizer``, its state too. Returns False, touching nothing, when there is no checkpoint.
        """
        self.async_saver.wait()  # a save still in the background is part of what "latest" means
        self.register()
        chosen = ranks.master_result(self._choose_latest)  # a listing failure reaches every rank
        if chosen is None:
            self.resumed_from, self.trainer_state, self.start_epoch = None, None, 0
            return False
        info = self._info(chosen)
        error = None
        try:
            self._load_into(info, model, optimizer, restore_rng)
        except Exception as e:
            error = e
        ranks.raise_together(error)
        self._resumed(info)
        return True

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After a resume: restore the optimizer saved with ``save(..., optimizer=)``, sharded or not, any world size."""
        if self.resumed_from is None:
            raise CheckpointError("no optimizer state to load: nothing was resumed")
        self._load_optimizer(model, optimizer, self.resumed_from.uri)

    def _load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: str) -> None:
        if (
            self._saved_optimizer is None
            and isinstance(self.trainer_state, Mapping)
            and "optimizer" in self.trainer_state
        ):
            raise CheckpointError(
                f"{source}: a .pt training checkpoint, whose optimizer state is keyed by parameter index: restore it "
                "with optimizer.load_state_dict(ckpt.trainer_state['optimizer'])"
            )
        if self._saved_optimizer is None:
            raise CheckpointError(f"{source}: holds no optimizer state (it was saved without save(..., optimizer=))")
        sharded.load_optimizer_state(model, optimizer, self._saved_optimizer, source)

    def _info(self, chosen: tuple[str, str]) -> CheckpointInfo:
        where, name = chosen
        manager = self.manager if where == "local" else self.remote
        assert manager is not None
        return manager.info(name)  # from the master's choice: no rank lists again (it may have been pruned since)

    def _resumed(self, info: CheckpointInfo) -> None:
        self.resumed_from = info
        if self.mirror is not None:
            self.mirror.keep_until_uploaded(info.name)
        self.start_epoch = info.epoch + 1
        log.info("resumed from %s (epoch %d) on rank %d", info.uri, info.epoch, self.rank.rank)

    # -- save ----------------------------------------------------------------------------------
    def latest_uri(self, remote: bool = False) -> str | None:
        """The newest checkpoint this job saved: its local URI, or with ``remote`` its remote URI once uploaded."""
        if remote:
            return self.mirror.last_uploaded if self.mirror is not None else None
        last = self.manager.last_saved
        return None if last is None else self.manager.storage.url(last)

    def should_save(self, epoch: int) -> bool:
        return epoch % self.config.epoch_interval == 0

    def save(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None = None,
        trainer_state: Any = None,
        force: bool = False,
        async_: bool | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> str | None:
        """Save on the master (others return None); honours epoch_interval unless forced.

        With ``trainer_state`` (step counters, schedulers...) or ``optimizer``, every rank's RNG
        state is gathered too, so call it on every rank. ``optimizer`` is stored keyed by parameter
        FQN (``load_optimizer`` restores it at any world size). A model with DTensor parameters
        (FSDP2, tensor parallel) is gathered to the master one tensor at a time: every rank must
        call it. With ``async_`` (default: config.async_save) the call returns once tensors are
        snapshotted to CPU; the rest runs in background. Returns the checkpoint's local URI on the master.
        """
        check_epoch(epoch)
        if not force and not self.should_save(epoch):
            return None
        weights = state_dict_of(policy)
        tree = None
        if trainer_state is not None or optimizer is not None:
            rng = ranks.all_gather_object(capture_rng_state())
            tree = {"user": trainer_state, "epoch": epoch, "rng": rng}
            if optimizer is not None:
                if not isinstance(policy, torch.nn.Module):
                    raise InvalidArgumentError("save(optimizer=...) needs the model itself, not a state dict")
                tree["optimizer"] = sharded.optimizer_state(policy, optimizer)
        trainer = flatten(tree) if tree is not None else None
        is_sharded = sharded.has_dtensors(weights, trainer[0] if trainer is not None else {})
        if not is_sharded and not self.rank.is_master:
            return None
        if self._closed:
            raise CheckpointError("Checkpointer is closed")
        uri = self.manager.checkpoint(epoch).uri
        in_background = self.config.async_save if async_ is None else async_
        if is_sharded:
            self.register()  # every rank is here: the master's manifest check reaches them all
            self._save_sharded(weights, epoch, training_metrics, trainer, in_background, uri)
            return uri if self.rank.is_master else None
        error = self._check_manifest()  # the master alone is here: no collective
        if error:
            raise ArchitectureError(error)
        self.async_saver.wait()  # at most one save in flight; a failed background save raises here
        if not in_background:
            self._write(weights, epoch, training_metrics, trainer)
            return uri
        weights = self.async_saver.snapshot(weights, "w.")
        if trainer is not None:
            trainer = (self.async_saver.snapshot(trainer[0], "t."), trainer[1])
        metrics = json.loads(json.dumps(training_metrics)) if training_metrics is not None else None
        self.async_saver.start(self._write, weights, epoch, metrics, trainer)
        return uri

    def _save_sharded(
        self,
        weights: dict[str, torch.Tensor],
        epoch: int,
        metrics: Mapping[str, Any] | None,
        trainer: tuple[dict[str, torch.Tensor], dict[str, str]] | None,
        in_background: bool,
        target: str,
    ) -> None:
        """Every rank: its blocks of each DTensor go to the master, which streams the full tensors into one file."""
        if self.config.checkpoint_format != "safetensors":
            raise CheckpointFormatError("a sharded (DTensor) model is saved as safetensors only")
        if self._shard_group is None:  # collective: every rank saves
            self._shard_group = sharded.new_group(self.config.shard_timeout_s)
        self.async_saver.wait()
        files = {"w": weights, **({"t": trainer[0]} if trainer is not None else {})}
        meta = trainer[1] if trainer is not None else None

        def snapshot(blocks: dict[tuple[str, str], Any]) -> None:
            # the training thread's part: this rank's own shards (and the master's plain tensors) into reused buffers
            local = self.async_saver.snapshot({f"{lb}/{k}": b.local for (lb, k), b in blocks.items()}, "s.")
            for (lb, k), b in blocks.items():
                b.local = local[f"{lb}/{k}"]
            if self.rank.is_master:
                for label, d in files.items():
                    plain = {k: v for k, v in d.items() if (label, k) not in blocks}
                    files[label] = {**d, **self.async_saver.snapshot(plain, f"{label}.")}

        # on the caller's thread, even for a background save: ranks that disagree, or a rank that cannot
        # snapshot, fail here, together, in one collective
        try:
            gather = sharded.ShardGather(self._shard_group, files, target, snapshot if in_background else None)
        except CheckpointError:
            raise
        except Exception as e:  # the gloo group itself failed: a rank died or timed out
            raise save_failed(target, "planning the sharded save", e) from e
        if not in_background:
            self._write_sharded(gather, files, epoch, metrics, meta, target)
            return
        metrics = json.loads(json.dumps(metrics)) if metrics is not None else None
        self.async_saver.start(self._write_sharded, gather, files, epoch, metrics, meta, target)

    def _write_sharded(
        self,
        gather: sharded.ShardGather,
        files: dict[str, dict[str, torch.Tensor]],
        epoch: int,
        metrics: Mapping[str, Any] | None,
        trainer_meta: dict[str, str] | None,
        target: str,
    ) -> None:
        if not self.rank.is_master:
            try:
                gather.serve()
            except CheckpointError:
                raise
            except Exception as e:
                raise save_failed(target, "sending this rank's shards to the master", e) from e
            return
        ok = False
        try:
            weights = gather.lazy("w", files["w"])
            trainer = (gather.lazy("t", files["t"]), trainer_meta) if trainer_meta is not None else None
            self._write(weights, epoch, metrics, trainer)
            ok = True
        finally:
            try:
                gather.finish(ok)
            except Exception as e:
                if ok:
                    raise save_failed(target, "telling the other ranks the save finished", e) from e
                log.error("could not tell the other ranks the save failed: %r", e)

    def wait(self) -> None:
        """Block until the background save (if any) is written; raise if it failed."""
        self.async_saver.wait()

    def _write(
        self,
        weights: Mapping[str, torch.Tensor],
        epoch: int,
        metrics: Mapping[str, Any] | None,
        trainer: tuple[Mapping[str, torch.Tensor], Mapping[str, str]] | None,
    ) -> None:
        saved = self.manager.save_checkpoint(
            weights, epoch, metrics, policy_architecture=self._architecture, trainer_state=trainer, prune=False
        )
        log.info("saved %s", saved.uri)
        if self.mirror is not None:
            self.mirror.submit(saved)
        try:
            if self.mirror is not None:
                self.mirror.prune_local()
            else:
                self.manager.prune()
        except Exception as e:
            raise save_failed(saved.uri, "applying retention", e) from e

    def close(self) -> None:
        """Every rank: finish the background save and uploads, then leave together; raise if any failed.

        Collective (on the gloo coordination group): no rank returns, and so none can destroy the
        process group, while the master is still writing or uploading its last checkpoint. A
        failure on any rank raises on every rank. Uploads wait within config.close_timeout_s.
        """
        error = self._finish()
        ranks.raise_together(error)

    def _finish(self) -> BaseException | None:
        """This rank's part of close(): the background save and uploads; the error, if any."""
        if self._closed:
            return None
        self._closed = True
        try:
            try:
                self.async_saver.wait()
            finally:
                if self.mirror is not None:
                    self.mirror.close(self.config.close_timeout_s)
        except Exception as e:
            return e
        return None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # leaving on an exception: the other ranks may be anywhere, so no collective here
        error = self._finish()
        if error is not None:
            log.error("while leaving on an exception: %s", error)


def _close_at_exit(ref: weakref.ReferenceType[Checkpointer]) -> None:
    # at interpreter exit the other ranks may be gone: finish this rank's work, no collective
    ckpt = ref()
    if ckpt is not None and not ckpt._closed:
        error = ckpt._finish()
        if error is not None:
            log.error("at exit: %s", error)
