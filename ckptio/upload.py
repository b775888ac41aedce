"""Background uploads of finished local checkpoints to object storage.

A small pool of threads uploads while training continues. The queue of checkpoints waiting to
start is bounded: when uploads fall behind, the oldest waiting checkpoint is dropped in favour
of the newest (coalescing), or, with coalescing off, ``submit`` blocks (backpressure). Each file
transfer has its own time bound, failures are retried with exponential backoff, and a
checkpoint's weights file is uploaded last: on the remote, it is the commit point.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UploadError
from .storage import Storage

__all__ = ["UploadJob", "Uploader"]

log = logging.getLogger("ckptio")

_BAR_MIN_BYTES = 64 << 20
WAIT_REPORT_S = 15.0  # close() says what it waits for this often: a store outage must not look like a hang


class _Superseded(Exception):
    """A newer save of the same checkpoint replaced this job's local files."""


def _progress_bar(label: str, size: int) -> Any:
    """fsspec's tqdm bar for a large transfer on an interactive stderr; None without tqdm (an optional extra)."""
    if size < _BAR_MIN_BYTES or not sys.stderr.isatty():
        return None
    try:
        from fsspec.callbacks import TqdmCallback
    except ImportError:
        return None
    try:
        return TqdmCallback(tqdm_kwargs={"desc": label, "unit": "B", "unit_scale": True, "leave": False})
    except ImportError:  # fsspec imports tqdm only when the bar is made
        return None


@dataclass
class UploadJob:
    """One checkpoint: files in ``source`` to copy to ``dest``, the weights file last."""

    source: Storage
    dest: Storage
    names: list[str]
    label: str
    error: BaseException | None = None
    superseded: bool = False
    seq: int = 0  # submission order: a later job's upload makes an earlier failed one moot
    # run (with retries, given the per-file time bound) once the weights, the last file, are up
    after_commit: Callable[[float | None], None] | None = None


class Uploader:
    def __init__(
        self,
        *,
        workers: int = 2,
        max_pending: int = 2,
        coalesce: bool = True,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        file_timeout_s: float | None = 600.0,
        on_uploaded: Callable[[UploadJob], None] | None = None,
    ):
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be >= 1")
        self.max_pending, self.coalesce = max_pending, coalesce
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.file_timeout_s = file_timeout_s
        self.on_uploaded = on_uploaded
        self._pending: collections.deque[UploadJob] = collections.deque()
        self._newest: dict[str, UploadJob] = {}  # by label: a re-save of a checkpoint supersedes its upload
        self._active: list[UploadJob] = []
        self._failed: list[UploadJob] = []
        self._submitted = 0
        self.newest_uploaded: UploadJob | None = None  # the latest-submitted job whose upload committed
        self._cv = threading.Condition()
        self._closing = False
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"ckptio-upload-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def in_flight(self) -> set[str]:
        """Names of files still waiting for or under upload (retention must not delete them locally)."""
        with self._cv:
            return {n for job in (*self._pending, *self._active) for n in job.names}

    def submit(self, job: UploadJob) -> UploadJob:
        with self._cv:
            if self._closing:
                raise UploadError("uploader is closed")
            while len(self._pending) >= self.max_pending:
                if self.coalesce:
                    dropped = self._pending.popleft()
                    dropped.superseded = True
                    log.warning("uploads behind: skipping %s in favour of %s", dropped.label, job.label)
                else:
                    self._cv.wait()
            self._submitted += 1
            job.seq = self._submitted
            self._pending.append(job)
            self._newest[job.label] = job
            self._cv.notify_all()
        return job

    def _superseded(self, job: UploadJob) -> bool:
        with self._cv:
            return self._newest.get(job.label) is not job

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                job = self._pending.popleft()
                self._active.append(job)
                self._cv.notify_all()
            try:
                self._upload(job)
            except _Superseded:
                job.superseded = True
                log.info("upload of %s superseded by a newer save of the same checkpoint", job.label)
            except BaseException as e:  # recorded and re-raised by close()
                job.error = e
                log.error("upload of %s failed for good: %r", job.label, e)
            with self._cv:
                self._active.remove(job)
                if job.error is not None:
                    self._failed.append(job)
                elif not job.superseded and (self.newest_uploaded is None or job.seq > self.newest_uploaded.seq):
                    self.newest_uploaded = job
                self._cv.notify_all()
            if job.error is None and not job.superseded and self.on_uploaded is not None:
                try:
                    self.on_uploaded(job)
                except Exception as e:
                    log.error("after uploading %s: %r", job.label, e)

    def _upload(self, job: UploadJob) -> None:
        start = time.monotonic()
        total = 0
        for name in job.names:
            local = job.source.local_path(name)
            assert local is not None, "uploads start from local files"

            def put(local: str = local, name: str = name) -> int:
                if not os.path.exists(local) and self._superseded(job):
                    raise _Superseded  # a re-save replaced these files; its own upload follows
                size = os.path.getsize(local) if os.path.exists(local) else 0
                job.dest.put_file(local, name, timeout=self.file_timeout_s, callback=_progress_bar(name, size))
                return size

            total += self._attempt(job.dest.url(name), "upload", put)
        if job.after_commit is not None:
            after = job.after_commit
            self._attempt(job.dest.url(), "upload", lambda: after(self.file_timeout_s))
        dt = time.monotonic() - start
        log.info("uploaded %s: %d bytes in %.1fs (%.1f MB/s)", job.label, total, dt, total / max(dt, 1e-9) / 1e6)

    def _attempt(self, uri: str, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried with exponential backoff; UploadError naming ``uri`` once the retries are spent."""
        for attempt in range(self.retries + 1):
            if self._stop.is_set():
                raise UploadError(f"{uri}: abandoned at close")
            try:
                return fn()
            except _Superseded:
                raise
            except Exception as e:
                if attempt == self.retries:
                    raise UploadError(f"{uri}: {what} failed after {attempt + 1} attempts: {e!r}") from e
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                log.warning("%s: %s failed (%s); retry %d in %.1fs", uri, what, e, attempt + 1, delay)
                if self._stop.wait(delay):
                    raise UploadError(f"{uri}: abandoned at close after {e!r}") from e
        raise AssertionError("unreachable")

    def wait(self, timeout: float | None = None, *, report: bool = False) -> bool:
        """Block until nothing is pending or active; False if the timeout passed first. With ``report``, log every
        ``WAIT_REPORT_S`` what is still uploading and what is safe on the store."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        said = start
        with self._cv:
            while self._pending or self._active:
                now = time.monotonic()
                left = None if deadline is None else deadline - now
                if left is not None and left <= 0:
                    return False
                if report and now - said >= WAIT_REPORT_S:
                    said = now
                    log.warning("close: %.0fs waiting for the uploads of %s; %s", now - start,
                                ", ".join(j.label for j in (*self._active, *self._pending)), self._safe())  # fmt: skip
                step = WAIT_REPORT_S if report else None
                self._cv.wait(step if left is None else min(left, step or left))
        return True

    def _safe(self) -> str:
        """What is safe on the store, as far as this uploader knows."""
        newest = self.newest_uploaded
        return (
            "no checkpoint of this job is on the store yet"
            if newest is None
            else f"the newest on the store is {newest.label}"
        )

    def close(self, timeout: float | None = None) -> None:
        """Finish pending uploads (within ``timeout``), stop the threads, raise if any upload failed."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        finished = self.wait(timeout, report=True)
        if not finished:
            self._stop.set()  # retries give up at once; a transfer stuck in I/O is left to its own bound
            with self._cv:
                stuck = [j.label for j in (*self._pending, *self._active)]
                for job in self._pending:
                    job.error = UploadError(f"{job.label}: never started before close")
                    self._failed.append(job)
                self._pending.clear()
            self._raise_if_failed(extra=f"still uploading after {timeout}s: {stuck}")
        for t in self._threads:  # only reached when everything finished (the branch above raises)
            t.join()
        self._raise_if_failed()

    def _raise_if_failed(self, extra: str = "") -> None:
        """Raise for the uploads that failed, unless a later-submitted one committed: the store holds a newer
        checkpoint than each, and a superseded upload is no loss (logged)."""
        with self._cv:
            failed = list(self._failed)
            newest = self.newest_uploaded
        moot = [j for j in failed if newest is not None and j.seq < newest.seq]
        for job in moot:
            log.warning("upload of %s failed (%s); %s, saved after it", job.label, job.error, self._safe())
        failed = [j for j in failed if j not in moot]
        if failed or extra:
            details = "; ".join(f"{j.label}: {j.error}" for j in failed)
            raise UploadError(
                f"checkpoint uploads did not complete ({extra}{'; ' if extra and details else ''}{details}); "
                + self._safe()
            )
