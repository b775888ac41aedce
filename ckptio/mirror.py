"""Mirroring a run's local checkpoints to object storage, with retention applied to both copies.

Each committed local checkpoint is handed to the Uploader (sidecars first, weights last: on the
remote, the weights object is the commit point). Only once a newer checkpoint is durable
remotely may retention delete older ones, on either side; files still waiting for upload are
never deleted locally.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .config import CheckpointConfig
from .errors import save_failed, typed_io
from .layout import MANIFEST_NAME, CheckpointInfo, SavedCheckpoint, base_of, remove_replaced
from .manager import CheckpointManager
from .upload import Uploader, UploadJob

__all__ = ["RemoteMirror", "newest"]

log = logging.getLogger("ckptio")


class RemoteMirror:
    def __init__(
        self,
        local: CheckpointManager,
        remote: CheckpointManager,
        *,
        on_uploaded: Callable[[str], None] | None = None,
        **uploader_options: Any,
    ):
        self.local, self.remote = local, remote
        self.on_uploaded = on_uploaded
        self.last_uploaded: str | None = None  # remote weights URI of the newest committed upload
        self.uploader_options = uploader_options
        self.uploader: Uploader | None = None  # threads start with the first upload, on the master only
        self._lock = threading.Lock()  # one retention pass at a time, across the save and upload threads
        self._resumed_from: str | None = None

    @classmethod
    def of(cls, local: CheckpointManager, config: CheckpointConfig) -> RemoteMirror | None:
        """The mirror ``config`` asks for (None without a ``remote_uri``); the remote copy carries the local run's name."""
        c = config
        if not c.remote_uri:
            return None
        remote = CheckpointManager(
            c.remote_uri, c.checkpoint_format, keep_last=c.keep_last, keep_best=c.keep_best, run_name=local.run_name,
            storage_options=c.remote_storage_options,
        )  # fmt: skip
        return cls(
            local, remote, on_uploaded=c.on_uploaded, workers=c.upload_workers, max_pending=c.upload_max_pending,
            coalesce=c.upload_coalesce, retries=c.upload_retries, backoff_s=c.upload_backoff_s,
            file_timeout_s=c.upload_file_timeout_s,
        )  # fmt: skip

    def save(self, *args: Any, prune: bool = True, **kwargs: Any) -> SavedCheckpoint:
        """``local.save_checkpoint(...)``, then its upload queued, then local retention (sparing what uploads)."""
        saved = self.local.save_checkpoint(*args, prune=False, **kwargs)
        self.submit(saved)
        if prune:
            try:
                self.prune_local()
            except Exception as e:
                raise save_failed(saved.uri, "applying retention", e) from e
        return saved

    def keep_until_uploaded(self, name: str) -> None:
        """The checkpoint a job resumed from stays, both sides, until a newer one is durable remotely."""
        self._resumed_from = name

    def protected(self) -> set[str]:
        keep = set(self.uploader.in_flight()) if self.uploader is not None else set()
        if self.local.last_saved is not None:  # on the remote too: a restarted run's first save is its newest
            keep.add(self.local.last_saved)
        if self._resumed_from is not None:
            keep.add(self._resumed_from)
        return keep

    def submit(self, saved: SavedCheckpoint) -> None:
        if self.uploader is None:
            self.uploader = Uploader(on_uploaded=self._after_upload, **self.uploader_options)
        label = base_of(saved.weights)
        job = UploadJob(
            self.local.storage, self.remote.storage, list(saved.names), label=label, after_commit=self._manifest
        )
        self.uploader.submit(job)

    def _manifest(self, timeout: float | None) -> None:
        """After each upload commits: the store still holds the run's manifest. One that lost it (its bucket emptied or
        recreated) gets it again from the local copy, said once, with what the store now holds."""
        if self.remote.storage.exists(MANIFEST_NAME, timeout=timeout) or not self.local.storage.exists(MANIFEST_NAME):
            return
        local = self.local.storage.local_path(MANIFEST_NAME)
        assert local is not None, "uploads start from local files"
        self.remote.storage.put_file(local, MANIFEST_NAME, timeout=timeout)
        held = [i.name for i in self.remote.list_checkpoints()]
        log.warning(
            "%s: the run's manifest was gone from the store (its bucket emptied or recreated?): uploaded it again; "
            "the store holds %s of this run",
            self.remote.storage.url(MANIFEST_NAME),
            ", ".join(held) if held else "no checkpoint",
        )

    def prune_local(self) -> list[str]:
        with self._lock:
            return self.local.prune(protect=self.protected())

    def _after_upload(self, job: UploadJob) -> None:
        uri = self.remote.storage.url(job.names[-1])
        self.last_uploaded = uri
        if self.on_uploaded is not None:
            try:
                self.on_uploaded(uri)
            except Exception as e:  # the user's callback must not stop uploads or retention
                log.error("on_uploaded(%s) raised %r", uri, e)
        # a re-saved epoch's previous files, now that its new weights are committed remotely
        remove_replaced(self.remote.storage, job.names[-1], keep=job.names, other_formats=True)
        with self._lock:
            self._resumed_from = None
            self.remote.prune(protect=self.protected())
            self.local.prune(protect=self.protected())

    def close(self, timeout: float | None) -> None:
        """Finish the uploads within ``timeout``; raise UploadError if any failed."""
        if self.uploader is not None:
            self.uploader.close(timeout)


def newest(local: CheckpointManager, remote: CheckpointManager | None) -> CheckpointInfo | None:
    """The newest checkpoint of a run by epoch, local or remote (the local one when both have it)."""
    found = []
    for is_local, manager in ((True, local), (False, remote)):
        if manager is not None:
            with typed_io(manager.checkpoint_dir, "listing checkpoints"):
                infos = manager.list_checkpoints()
            if infos:
                found.append((infos[-1].epoch, is_local, infos[-1]))
    return max(found, key=lambda f: f[:2])[2] if found else None
