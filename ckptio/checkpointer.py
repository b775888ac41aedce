"""Checkpointer: checkpointing coordinated across the ranks of a training loop.

Rank coordination only: who writes (the master), what every rank resumes from (the master's
choice), and the collectives that keep ranks together. Persistence is the CheckpointManager's,
background saving the AsyncSaver's, a sharded save's transfers ``sharded.ShardedSave``'s, copies
to object storage the RemoteMirror's.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import logging
import os
import posixpath
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import torch

from . import ranks
from .async_save import AsyncSaver
from .cache import NodeCache
from .config import CheckpointConfig
from .discovery import CheckpointInfo, artifact_of, locate
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    WriterConflictError,
    save_failed,
    typed_io,
)
from .hf import HF_INDEX
from .layout import (
    PARTIAL_KEY,
    PendingSave,
    Want,
    cache_checkpoint,
    check_epoch,
    checkpoint_at,
    load_checkpoint,
    state_dict_of,
    subset_of,
    tied_names,
)
from .lease import WriterLease
from .manager import CheckpointManager
from .mirror import RemoteMirror, newest
from .node_fetch import fetch_for_nodes
from .storage import FileInfo
from .trainer_state import restore_rng_state
from .upload import Uploader

__all__ = ["CheckpointConfig", "Checkpointer"]

log = logging.getLogger("ckptio")


def _sharded() -> ModuleType:
    """The sharded module, imported at first need: DTensor and torch's state-dict APIs take a second to import,
    which a process that never saves an optimizer or a sharded model (a loader, a CLI call) need not pay."""
    from . import sharded

    return sharded


class Checkpointer:
    """Rank-aware save/resume for one run directory (local path or URI).

    After a resume (``load_or_create_policy`` or ``load_into``), on every rank: ``resumed_from`` is the
    CheckpointInfo resumed (None for a new run), ``start_epoch`` the epoch to train next (0 for a new run) and
    ``trainer_state`` what ``save(..., trainer_state=)`` stored with it (a scheduler's state, the data position);
    ``initial_loaded_from`` the config's ``initial_load`` when a new run started from its weights.
    From its first resume or save until ``close()``, the master holds the run's writer lease: another job's
    Checkpointer on the same run is refused (WriterConflictError), and an epoch saved before it is never replaced.
    """

    def __init__(
        self,
        run_dir_or_uri: str,
        policy_architecture: Any,
        config: CheckpointConfig | None = None,
        *,
        allow: Iterable[str] = (),
    ):
        self.config = c = config or CheckpointConfig()
        self._architecture = policy_architecture
        self.allow = tuple(allow)
        # the run's name, which its checkpoint files carry: with a remote copy, the durable location
        # names the run, so jobs on other nodes (other local directories) resume the same run
        run_name = c.run_name or (posixpath.basename(c.remote_uri.rstrip("/")) if c.remote_uri else None)
        self.manager = CheckpointManager(
            run_dir_or_uri, c.checkpoint_format, c.keep_last, c.keep_best, run_name=run_name,
            storage_options=c.storage_options,
        )  # fmt: skip
        self.mirror = RemoteMirror.of(self.manager, c)
        self.remote = self.mirror.remote if self.mirror is not None else None
        self.cache = NodeCache(c.cache_dir, c.cache_max_bytes)
        self._fetched: dict[str, FileInfo] | None = None  # node_fetch's stats of the files it fetched ranges of
        self.saves = AsyncSaver()
        self.resumed_from: CheckpointInfo | None = None
        self.trainer_state: Any = None
        self.start_epoch = 0
        self.initial_loaded_from: str | None = None  # the config's initial_load, once a new run started from it
        self._registered = False  # this rank took part in register()
        self._claimed: list[int] | None = None  # the master took the run: the epochs saved before it did
        self._before: set[int] = set()  # every rank: those epochs, as the master found them
        self._leases: list[WriterLease] = []
        self._closed = False
        self._shard_group: Any = None
        self._saved_optimizer: Any = None  # the FQN-keyed optimizer state read at resume
        self._saving = 0  # saves under way on the training thread: a SIGTERM meanwhile waits for them
        atexit.register(_close_at_exit, weakref.ref(self))
        if c.sigterm_finish_s is not None and threading.current_thread() is threading.main_thread():
            _on_sigterm.install(self)

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

    # -- the run: its writer lease and manifest ---------------------------------------------------
    def _claim(self) -> list[int]:
        """Master, once: make this job the run's one writer (local and remote), proving both can be written, and
        write the manifest if absent; returns the epochs saved before (this job never replaces them).

        A model folder that is not a run is refused before anything is written (CheckpointFormatError); so is a
        run another job writes (WriterConflictError) and a directory that cannot be written (StorageError)."""
        if self._claimed is None:
            managers = [m for m in (self.manager, self.remote) if m is not None]
            for manager in managers:
                manager.check_run_directory()
            if self.config.writer_lease_s is not None:
                for manager in managers:
                    self._leases.append(WriterLease.take(manager.storage, manager.run_name, self.config.writer_lease_s))
            for manager in managers:
                manager.ensure_manifest(self._architecture)
            with typed_io(self.manager.checkpoint_dir, "listing checkpoints"):
                self._claimed = sorted({i.epoch for m in managers for i in m.list_checkpoints()})
        return self._claimed

    def register(self) -> None:
        """Master takes the run (writer lease, manifest); every rank raises if it cannot (another job writes it, the
        directory is read-only, the run's architecture differs)."""
        if not self._registered:  # every rank enters this collective once, whatever the master did alone before
            self._before = set(ranks.master_result(self._claim))
            self._registered = True

    # -- resume --------------------------------------------------------------------------------
    def _latest(self) -> CheckpointInfo | None:
        """Every rank: the checkpoint to resume from, local or remote, as the master alone chose it."""
        self.saves.wait()  # a save still in the background is part of what "latest" means
        if self.rank.world_size > 1 and not ranks.has_process_group():
            self._refuse_without_process_group()
        if self.remote is not None and self.rank.is_local_master and not self.rank.is_master:
            self.remote.storage.open_ahead()  # this rank fetches for its node once the master has chosen

        def choose() -> tuple[bool, str, str] | None:
            info = newest(self.manager, self.remote)
            on_disk = info is not None and info.storage is self.manager.storage
            return None if info is None else (on_disk, info.name, f"{socket.gethostname()}:{info.uri}")

        def register_and_choose() -> tuple[tuple[bool, str, str] | None, list[int]]:
            # independent requests on a store: the listing runs while the run is claimed, whose error comes first
            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptio-claim") as pool:
                claim = pool.submit(self._claim)
                try:
                    chosen = choose()
                finally:
                    before = claim.result()
                return chosen, before

        # a listing failure reaches every rank; no other rank lists
        if self._registered:
            chosen = ranks.master_result(choose)
        else:
            chosen, before = ranks.master_result(register_and_choose)
            self._before, self._registered = set(before), True
        if chosen is None:
            self.resumed_from, self.trainer_state, self.start_epoch = None, None, 0
            return None
        manager = self.manager if chosen[0] else self.remote
        info = checkpoint_at(manager.storage, chosen[1]) if manager is not None else None
        assert info is not None
        if chosen[0] and not self.rank.is_master and not info.storage.exists(info.name):
            info = dataclasses.replace(info, uri=chosen[2])  # on the master's disk only: named as it is there
        return info

    def _refuse_without_process_group(self) -> None:
        """Every rank of a job without a process group: a typed error naming what this rank sees. Ranks that cannot
        talk cannot agree on one checkpoint, nor can a node receive one that is only on the master's disk."""
        found = newest(self.manager, self.remote)
        where = "none" if found is None else found.uri
        if found is not None and found.storage is self.manager.storage:
            where += " (on this node's disk only)" if self.remote is None else " (on this node's disk)"
        raise CheckpointError(
            f"rank {self.rank.rank} of {self.rank.world_size}: cannot resume without a process group: the master "
            f"chooses the checkpoint every rank reads, and sends other nodes what is on its disk only (the newest "
            f"checkpoint this rank sees: {where}); call torch.distributed.init_process_group() before resuming"
        )

    def _read(self, info: CheckpointInfo, want: Want | None = None) -> Any:
        """Every rank: the checkpoint's weights mapped. On one node, remote files through one download per node.
        On several, each byte leaves its source once (the store, or the master's disk for a checkpoint only
        there), the nodes sharing pieces so that each node's cache gets what its ranks read (``want``; None: all)."""

        def download() -> None:
            with typed_io(info.uri, "downloading into the node cache"):
                cache_checkpoint(info.storage, info.name, self.cache)

        self._fetched = None
        several_nodes = self.rank.local_world_size < self.rank.world_size
        if several_nodes and info.name.endswith(".safetensors"):
            self._fetched = fetch_for_nodes(info.storage, info.name, self.cache, want)
        elif info.storage.is_local:
            if several_nodes:  # a .pt file has no chunk digests to check pieces by: every node must see it
                ranks.together(lambda: self._check_visible(info))
        else:  # the node's first rank fills the cache; every rank then maps that copy
            ranks.together(download, here=self.rank.is_local_master)
        with typed_io(info.uri, "loading"):
            # metrics play no part in resuming: a damaged metrics file must not stop a run from continuing
            return load_checkpoint(
                info.storage, info.name, policy_architecture=self._architecture, allow=self.allow, cache=self.cache,
                with_metrics=False, fetched=self._fetched,
            )  # fmt: skip

    def _check_visible(self, info: CheckpointInfo) -> None:
        if not info.storage.exists(info.name):
            raise CheckpointNotFoundError(
                f"{info.uri}: the checkpoint the master chose is on the master's node only, and a .pt file cannot "
                "be sent to other nodes (no chunk digests): resume from a run directory every node shares, or "
                "convert it to .safetensors (ckptio convert)"
            )

    def _read_trainer_state(self, info: CheckpointInfo, metadata: Mapping[str, str], restore_rng: bool) -> None:
        allow_missing = self.config.resume_without_trainer_state
        self.trainer_state, self._saved_optimizer, rng = self.manager.read_resume_state(
            info, self.cache, metadata, allow_missing=allow_missing, fetched=self._fetched
        )
        me, world = self.rank.rank, self.rank.world_size
        if restore_rng and len(rng) == world:
            restore_rng_state(rng[me])
        elif restore_rng and rng:
            log.warning("RNG states were saved for %d ranks, this job has %d: not restored", len(rng), world)

    def load_or_create_policy(
        self, env_metadata: Any, *, device: torch.device | str | None = None, restore_rng: bool = True
    ) -> torch.nn.Module:
        """Every rank: the latest checkpoint's policy (the master's choice), or a fresh identical one."""
        info = self._latest()
        if info is None and self.config.initial_load is not None:
            return self._initial_policy(env_metadata, device)
        if info is None:
            # the master's seed, not a draw: creating the policy must not shift any rank's RNG stream
            seed = ranks.broadcast_object(torch.initial_seed() if self.rank.is_master else None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self._architecture.make_policy(env_metadata)
            return module.to(device) if device is not None else module

        def load() -> torch.nn.Module:
            loaded = self._read(info)
            if loaded.metadata.get(PARTIAL_KEY) == "1":
                raise CheckpointFormatError(
                    f"{info.uri}: a partial checkpoint (saved with only=): it holds some of the model's tensors, not "
                    "a model to create; build the model with its other weights, then resume with load_into(model)"
                )
            module = artifact_of(loaded).instantiate(env_metadata, device=device)
            self._read_trainer_state(info, loaded.metadata, restore_rng)
            return module

        module = ranks.together(load)  # a rank that cannot load stops the others before they train alone
        self._resumed(info)
        return module

    def load_into(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        restore_rng: bool = True,
        strict: bool = True,
    ) -> bool:
        """Every rank: fill an already built model (sharded or not; one built on ``meta`` allocated first, with
        ``to_empty``) from the latest checkpoint.

        Each rank reads only its own blocks of the mapped file, at any world size; with
        ``optimizer``, its state too. Returns False, touching nothing, when there is no checkpoint
        (a new run with ``initial_load`` is filled from it, and True).
        A partial checkpoint (``save(only=...)``) fills the tensors it holds and leaves the model's others as they
        are; ``strict=False`` does so for any checkpoint, and skips its tensors the model lacks (both logged).
        """
        info = self._latest()
        if info is None:
            return self._initial_into(model, strict)

        def load() -> None:
            current = _sharded().model_state(model)
            loaded = self._read(info, _sharded().resume_reads(current))
            if isinstance(loaded.weights, torch.nn.Module):
                raise CheckpointFormatError(
                    f"{info.uri}: holds a pickled module, not a state dict to load into a model"
                )
            partial = loaded.metadata.get(PARTIAL_KEY) == "1"
            _sharded().load_model_state(
                model, current, loaded.weights, info.uri, missing_ok=partial or not strict, unexpected_ok=not strict
            )
            self._read_trainer_state(info, loaded.metadata, restore_rng)
            if optimizer is not None:
                self._load_optimizer(model, optimizer, info.uri)

        ranks.together(load)
        self._resumed(info)
        return True

    # -- a new run's initial weights ------------------------------------------------------------
    def _initial(self) -> Any:
        """Every rank: the ``initial_load`` checkpoint's weights, mapped (a remote one through one download per
        node), and its architecture when it carries one."""
        uri = self.config.initial_load
        assert uri is not None
        opts = self.config.initial_load_storage_options
        with typed_io(uri, "opening the initial checkpoint"):
            storage, name = locate(uri, opts)
        if not storage.is_local and not name.endswith(HF_INDEX):
            ranks.together(lambda: cache_checkpoint(storage, name, self.cache), here=self.rank.is_local_master)
        with typed_io(storage.url(name), "loading the initial checkpoint"):
            return load_checkpoint(storage, name, allow=self.allow, cache=self.cache, with_metrics=False)

    def _initial_policy(self, env_metadata: Any, device: torch.device | str | None) -> torch.nn.Module:
        def load() -> torch.nn.Module:
            loaded = self._initial()
            artifact = artifact_of(loaded)
            return artifact.instantiate(env_metadata, device=device, policy_architecture=self._architecture)

        module = ranks.together(load)
        self._started_from(self.config.initial_load)
        return module

    def _initial_into(self, model: torch.nn.Module, strict: bool) -> bool:
        if self.config.initial_load is None:
            return False

        def load() -> None:
            current = _sharded().model_state(model)
            loaded = self._initial()
            if isinstance(loaded.weights, torch.nn.Module):
                raise CheckpointFormatError(f"{loaded.source}: holds a pickled module, not a state dict to load")
            weights = dict(loaded.weights)
            for alias, name in tied_names(model).items():  # a folder save_pretrained wrote stores a tie once
                if alias not in weights and name in weights:
                    weights[alias] = weights[name]
            _sharded().load_model_state(
                model, current, weights, loaded.source, missing_ok=not strict, unexpected_ok=not strict
            )

        ranks.together(load)
        self._started_from(self.config.initial_load)
        return True

    def _started_from(self, uri: str | None) -> None:
        self.initial_loaded_from = uri
        self.resumed_from, self.trainer_state, self.start_epoch = None, None, 0
        log.info("a new run: started from the weights of %s on rank %d", uri, self.rank.rank)

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After a resume: restore the optimizer saved with ``save(..., optimizer=)``, sharded or not, any world size."""
        if self.resumed_from is None:
            raise CheckpointError("no optimizer state to load: nothing was resumed")
        self._load_optimizer(model, optimizer, self.resumed_from.uri)

    def _load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: str) -> None:
        saved = self._saved_optimizer
        if saved is None and isinstance(self.trainer_state, Mapping) and "optimizer" in self.trainer_state:
            saved = self.trainer_state["optimizer"]  # a .pt training checkpoint's
            state = saved.get("state") if isinstance(saved, Mapping) else None
            if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
                # torch's optimizer.state_dict() keys it by parameter index: only this optimizer's own load fits it
                raise CheckpointError(
                    f"{source}: a .pt training checkpoint, whose optimizer state is keyed by parameter index: restore "
                    "it with optimizer.load_state_dict(ckpt.trainer_state['optimizer']) on an unsharded model (a "
                    "sharded one needs it keyed by parameter name, as torch's get_optimizer_state_dict gives it)"
                )
            # keyed by parameter name (torch.distributed.checkpoint's form, e.g. converted from DCP): as ckptio's own
        if saved is None:
            raise CheckpointError(f"{source}: holds no optimizer state (it was saved without save(..., optimizer=))")
        _sharded().load_optimizer_state(model, optimizer, saved, source)

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
        only: Iterable[str] | str | None = None,
    ) -> str | None:
        """Save on the master (others return None); honours epoch_interval unless forced.

        With ``trainer_state`` (step counters, schedulers...) or ``optimizer``, every rank's RNG
        state is gathered too, so call it on every rank. ``optimizer`` is stored keyed by parameter
        FQN (``load_optimizer`` restores it at any world size). A model with DTensor parameters
        (FSDP2, tensor parallel) is gathered to the master one tensor at a time: every rank must
        call it. With ``async_`` (default: config.async_save) the call returns once tensors are
        snapshotted to CPU; the rest runs in background. Returns the checkpoint's local URI on the master.

        ``only`` saves a subset of the weights, by state-dict name, or ``"trainable"`` (the parameters that require
        grad: a LoRA-style adapter over frozen weights), with the optimizer over them; ``load_into`` resumes such a
        partial checkpoint into the full model, whose other tensors it leaves as they are.
        """
        self._saving += 1
        try:
            return self._save(policy, epoch, training_metrics, trainer_state, force, async_, optimizer, only)
        finally:
            self._saving -= 1
            if not self._saving:
                _on_sigterm.deliver_deferred()

    def _save(
        self,
        policy: torch.nn.Module | Mapping[str, torch.Tensor],
        epoch: int,
        training_metrics: Mapping[str, Any] | None,
        trainer_state: Any,
        force: bool,
        async_: bool | None,
        optimizer: torch.optim.Optimizer | None,
        only: Iterable[str] | str | None,
    ) -> str | None:
        check_epoch(epoch)
        if not force and not self.should_save(epoch):
            return None
        trainer = None
        if trainer_state is not None or optimizer is not None:  # a save of weights alone stores no trainer state
            trainer = _sharded().trainer_state_of(policy, epoch, trainer_state, optimizer)
        target = self.manager.checkpoint(epoch)
        weights = state_dict_of(policy)
        if only is not None:
            weights = subset_of(weights, policy, only, target.uri)
        job = PendingSave(target, weights, training_metrics, trainer, partial=only is not None)
        # no DTensor exists before torch.distributed.tensor is imported
        is_sharded = "torch.distributed.tensor" in sys.modules and _sharded().has_dtensors(
            job.weights, trainer[0] if trainer is not None else {}
        )
        if not is_sharded and not self.rank.is_master:
            return None
        if self._closed:
            raise CheckpointError("Checkpointer is closed")
        background = self.config.async_save if async_ is None else async_
        snapshot = self.saves.snapshot if background else None
        if is_sharded:  # every rank is here: the claim is collective; so is the plan, with the snapshot
            self.register()
            self._refuse_earlier_epoch(job)
            if self._shard_group is None:
                self._shard_group = _sharded().new_group(self.config.shard_timeout_s)
            self.saves.wait()
            unit = _sharded().ShardedSave(
                self._shard_group,
                job,
                snapshot,
                ahead=self.config.shard_tensors_ahead,
                batch_bytes=self.config.shard_batch_bytes,
                ties=tied_names(policy),
            )
            retain = self._retain if self.rank.is_master else None
            self.saves.save(unit.write, self._write, background=background, after=retain)
        else:  # the master alone is here: no collective
            self._before = set(self._claim())
            self._refuse_earlier_epoch(job)
            self.saves.wait()
            job = job.copied(snapshot) if background else job
            self.saves.save(self._write, job, background=background, after=self._retain)
        return job.checkpoint.uri if self.rank.is_master else None

    def _refuse_earlier_epoch(self, job: PendingSave) -> None:
        """An epoch saved before this job took the run (by another job, or an earlier start) is never replaced."""
        if job.epoch in self._before:
            raise WriterConflictError(
                f"{job.checkpoint.uri}: epoch {job.epoch} of run {job.checkpoint.run!r} was saved before this job "
                "started (by another job, or an earlier start of this one); refusing to replace it: resume "
                "(load_or_create_policy or load_into) and save the epochs after it, or use another run directory"
            )

    def wait(self) -> None:
        """Block until the background save (if any) is written; raise if it failed."""
        self.saves.wait()

    def _write(self, job: PendingSave) -> None:
        """The master's synchronous save: the checkpoint, then its upload queued."""
        for lease in self._leases:
            lease.check()
        args = (job.weights, job.epoch, job.metrics)
        kwargs = {
            "policy_architecture": self._architecture, "trainer_state": job.trainer, "prune": False,
            "partial": job.partial,
        }  # fmt: skip
        saved = self.mirror.save(*args, **kwargs) if self.mirror else self.manager.save_checkpoint(*args, **kwargs)
        log.info("saved %s", saved.uri)

    def _retain(self) -> None:
        """The master's retention after a save, off the training thread: deleting a large checkpoint can take
        as long as writing one on some disks. It ends before the next save, resume or close, which raise its error."""
        try:
            deleted = self.mirror.prune_local() if self.mirror else self.manager.prune()
        except Exception as e:
            raise save_failed(self.latest_uri() or self.manager.checkpoint_dir, "applying retention", e) from e
        for uri in deleted:
            log.info("retention deleted %s", uri)

    def close(self) -> None:
        """Every rank: finish the background save and uploads, then leave together; raise if any failed.

        Collective (on the gloo coordination group): no rank returns, and so none can destroy the
        process group, while the master is still writing or uploading its last checkpoint. A
        failure on any rank raises on every rank. Uploads wait within config.close_timeout_s.
        """
        ranks.raise_together(self._finish())

    def _finish(self, upload_timeout: float | None = None) -> BaseException | None:
        """This rank's part of close(): the background save and uploads (within ``upload_timeout``, default
        config.close_timeout_s); the error, if any."""
        if self._closed:
            return None
        self._closed = True
        try:
            try:
                self.saves.wait()
            finally:
                try:
                    if self.mirror is not None:
                        self.mirror.close(self.config.close_timeout_s if upload_timeout is None else upload_timeout)
                finally:
                    leases, self._leases = self._leases, []
                    for lease in leases:  # the writing is over: the run is free for the next job
                        lease.release()
        except Exception as e:
            return e
        return None

    def _finish_for_signal(self) -> None:
        """SIGTERM: the save in flight and the uploads (these within config.sigterm_finish_s), logged."""
        if self._closed:
            return
        log.warning("SIGTERM: finishing the save in flight and the uploads (at most %ss for uploads)",
                    self.config.sigterm_finish_s)  # fmt: skip
        error = self._finish(self.config.sigterm_finish_s)
        if error is not None:
            log.error("SIGTERM: %s", error)
        elif self.mirror is not None:
            log.warning("SIGTERM: finished; the newest on the store: %s", self.mirror.last_uploaded)

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


class _SigtermHandler:
    """One SIGTERM handler for every Checkpointer of the process: each finishes its save in flight and its uploads,
    then the signal goes on as it would have without ckptio (the handler installed before, or the default action,
    which ends the process). During a save on the training thread the signal waits for that save to complete."""

    def __init__(self) -> None:
        self.live: weakref.WeakSet[Checkpointer] = weakref.WeakSet()
        self.previous: Any = signal.SIG_DFL
        self.deferred: tuple[int, Any] | None = None

    def install(self, ckpt: Checkpointer) -> None:
        self.live.add(ckpt)
        current = signal.getsignal(signal.SIGTERM)
        if current is not self:
            self.previous = current
            signal.signal(signal.SIGTERM, self)

    def __call__(self, signum: int, frame: Any) -> None:
        if any(c._saving for c in list(self.live)):
            self.deferred = (signum, frame)
            return
        for ckpt in list(self.live):
            ckpt._finish_for_signal()
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def deliver_deferred(self) -> None:
        if self.deferred is not None:
            deferred, self.deferred = self.deferred, None
            self(*deferred)


_on_sigterm = _SigtermHandler()


def _close_at_exit(ref: weakref.ReferenceType[Checkpointer]) -> None:
    # at interpreter exit the other ranks may be gone: finish this rank's work, no collective
    ckpt = ref()
    if ckpt is not None and not ckpt._closed:
        error = ckpt._finish()
        if error is not None:
            log.error("at exit: %s", error)
