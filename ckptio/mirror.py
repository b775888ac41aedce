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

from .layout import SavedCheckpoint, base_of
from .manager import CheckpointManager
from .upload import Uploader, UploadJob

__all__ = ["RemoteMirror"]

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
        self.uploader.submit(UploadJob(self.local.storage, self.remote.storage, list(saved.names), label=label))

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
        self.remote.remove_replaced(SavedCheckpoint(uri, tuple(job.names)))
        with self._lock:
            self._resumed_from = None
            self.remote.prune(protect=self.protected())
            self.local.prune(protect=self.protected())

    def close(self, timeout: float | None) -> None:
        """Finish the uploads within ``timeout``; raise UploadError if any failed."""
        if self.uploader is not None:
            self.uploader.close(timeout)
