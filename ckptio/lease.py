"""WriterLease: one job at a time writes a run directory (and its copy on object storage).

Two jobs saving into one run directory interleave their epochs, and retention then deletes one job's work
with every file verifying fine. So the master takes the run's lease before it writes anything; taking it
also proves, before the first epoch trains, that the directory can be written.

A lease is one run's (its name), so runs that share a directory are still written side by side.

- On a disk (local or network), ``flock(2)`` on ``checkpoints/.ckptio-writer.{run}.lock``: the kernel drops
  it when the holder exits, SIGKILL included, so a restarted job finds nothing to clean up.
- On an object store, the object ``checkpoints/.ckptio-writer.{run}``, created exclusively and renewed by a
  heartbeat thread every third of its ``ttl_s``. A lease is free at once when its holder was a process of
  this host that is gone, or an earlier start of this torchrun job (its agent ends the old workers before it
  starts new ones), or when it was last renewed over ``ttl_s`` ago. Otherwise the new job watches it: renewed
  (the holder lives), it is refused within a third of ``ttl_s``; not renewed for ``ttl_s`` (the holder was
  killed on another host), it takes the lease over.

``.ckptio-writer.{run}`` names the holder (host, pid, since when) on both, so a refusal can name the other job.
Within one process, Checkpointers of the same run directory share one lease (one job).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from .errors import CheckpointError, CheckpointNotFoundError, StorageError, WriterConflictError
from .storage import Storage, pid_alive

__all__ = ["Holder", "WriterLease", "holder_text", "lease_names"]

log = logging.getLogger("ckptio")

RELEASE_WAIT_S = 5.0  # how long close() gives a store to drop the lease


def lease_names(run: str) -> tuple[str, str]:
    """Run ``run``'s lease record and lock file (hidden: listings of checkpoints skip them)."""
    return f".ckptio-writer.{run}", f".ckptio-writer.{run}.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its record says."""

    token: str
    host: str
    pid: int
    started: float
    renewed: float
    ttl_s: float
    job: str | None  # TORCHELASTIC_RUN_ID: the same across torchrun's restarts of one job
    restart: str | None  # TORCHELASTIC_RESTART_COUNT

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        try:
            d = json.loads(raw)
            return cls(
                str(d["token"]), str(d["host"]), int(d["pid"]), float(d["started"]), float(d["renewed"]),
                float(d["ttl_s"]), d.get("job"), d.get("restart"),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None  # not a record this version wrote: a lease nobody can be named for

    def payload(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def holder_text(holder: Holder | None) -> str:
    if holder is None:
        return "another job (its lease record is unreadable)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.started))
    return f"host {holder.host}, pid {holder.pid}, writing since {since}"


def _read(storage: Storage, name: str) -> Holder | None:
    try:
        return Holder.parse(storage.read_bytes(name))
    except CheckpointNotFoundError:
        return None


class WriterLease:
    """This job's lease on one checkpoint directory (``take`` to acquire, ``check`` before each write)."""

    _held: ClassVar[dict[str, WriterLease]] = {}  # by directory URL and run: the leases this process holds
    _held_lock = threading.Lock()

    def __init__(self, storage: Storage, run: str, ttl_s: float):
        # each call bounded well inside the ttl: a renewal stuck on a frozen store must not outlive the lease
        timeout = min(storage.timeout, max(1.0, ttl_s / 3))
        self.storage = storage if storage.is_local else Storage(storage.url(), storage.storage_options, timeout=timeout)
        self.run, self.ttl_s = run, ttl_s
        self.name, self.lock_name = lease_names(run)
        self.me = Holder(
            token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), started=time.time(),
            renewed=time.time(), ttl_s=ttl_s, job=os.environ.get("TORCHELASTIC_RUN_ID"),
            restart=os.environ.get("TORCHELASTIC_RESTART_COUNT"),
        )  # fmt: skip
        self.users = 0
        self._taking = threading.Lock()  # one taking at a time: a second user waits for the first's outcome
        self._taken = False
        self.lost: Holder | None = None  # on a store: the job that took the lease over from this one
        self._fd: int | None = None
        self._stop = threading.Event()

    @classmethod
    def take(cls, storage: Storage, run: str, ttl_s: float) -> WriterLease:
        """This process's lease on run ``run`` in ``storage``: taken now, or shared with a Checkpointer of this
        process holding it. WriterConflictError while another job holds it; StorageError where the directory cannot
        be written. Taking one lease (which may watch a store's for up to its ttl) never holds up another's."""
        key = f"{storage.url()} {run}"
        with cls._held_lock:
            lease = cls._held.get(key)
            if lease is None:
                lease = cls._held[key] = cls(storage, run, ttl_s)
            lease.users += 1
        with lease._taking:
            if lease._taken:
                return lease
            try:
                lease._acquire()
            except BaseException:
                lease._drop_user()
                raise
            lease._taken = True
        return lease

    def _drop_user(self) -> bool:
        """One user less; True when it was the last (the lease is then this process's no more)."""
        with self._held_lock:
            self.users -= 1
            if self.users > 0:
                return False
            self._held.pop(f"{self.storage.url()} {self.run}", None)
            return True

    def release(self) -> None:
        """One user less; the last one gives the lease up (a later job of this run may take it at once)."""
        if not self._drop_user():
            return
        self._stop.set()
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with the descriptor
            return
        # on a store: bounded, since a lease not given up only expires (close() must not wait on a frozen store)
        done = threading.Thread(target=self._give_up, name="ckptio-lease-release", daemon=True)
        done.start()
        done.join(RELEASE_WAIT_S)

    def _give_up(self) -> None:
        try:
            held = _read(self.storage, self.name)
            if self.lost is None and held is not None and held.token == self.me.token:
                self.storage.delete(self.name)
        except CheckpointError as e:  # it expires by itself
            log.warning("%s: giving up the writer lease failed (%s); it expires in %.0fs", self._where(), e,
                        self.ttl_s)  # fmt: skip

    def check(self) -> None:
        """Before a write: WriterConflictError if another job took the lease over (this job was presumed gone)."""
        if self.lost is not None:
            raise WriterConflictError(
                f"{self._where()}: {holder_text(self.lost)}, took this run's writer lease over (it found this job's "
                "lease expired: a store outage, or this job stalled): refusing to write beside it"
            )

    def _where(self) -> str:
        return self.storage.url(self.name)

    def _refuse(self, holder: Holder | None, extra: str = "") -> WriterConflictError:
        return WriterConflictError(
            f"{self.storage.url()}: run {self.run!r} is being written by {holder_text(holder)}; two jobs saving "
            f"into one run would delete each other's checkpoints. Stop that job or use another run directory"
            f"{extra}"
        )

    # -- a disk: flock ---------------------------------------------------------------------------
    def _acquire(self) -> None:
        if self.storage.is_local:
            self._lock_file()
        else:
            self._claim_object()
            threading.Thread(target=self._renew, name="ckptio-lease", daemon=True).start()

    def _lock_file(self) -> None:
        import fcntl

        where = self.storage.url()
        try:
            os.makedirs(self.storage.root, exist_ok=True)
            fd = os.open(self.storage.path(self.lock_name, writing=True), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise _not_writable(where, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _not_writable(where, e) from e
            raise self._refuse(_read(self.storage, self.name)) from None
        try:  # the record: who holds it; and written as a checkpoint is (temporary, rename), the proof it can be
            self.storage.write_bytes(self.name, self.me.payload())
        except Exception as e:
            os.close(fd)
            raise _not_writable(where, e) from e
        self._fd = fd

    # -- an object store: a renewed record -------------------------------------------------------
    def _claim_object(self) -> None:
        where = self.storage.url()
        try:
            self.storage.write_bytes(self.name, self.me.payload(), exclusive=True)
            return
        except FileExistsError:
            pass
        except OSError as e:  # StorageError included: a missing bucket, no permission
            raise _not_writable(where, e) from e
        held = _read(self.storage, self.name)
        why = self._why_free(held) or self._wait_for_expiry(held)
        log.warning("%s: taking over the writer lease of %s: %s", where, holder_text(held), why)
        self._write_record()
        back = _read(self.storage, self.name)  # two jobs taking over at once: the last write wins, the other sees it
        if back is None or back.token != self.me.token:
            raise self._refuse(back)

    def _wait_for_expiry(self, held: Holder | None) -> str:
        """A lease of another host that looks alive: watched until it expires (its holder was killed: taken over)
        or is renewed (its holder lives: refused, within a third of its ttl)."""
        assert held is not None
        # the holder's clock may run ahead of this host's: never longer than one ttl
        deadline = time.monotonic() + min(held.ttl_s, max(0.0, held.ttl_s - (time.time() - held.renewed)))
        log.warning("%s: held by %s; waiting up to %.0fs for it to expire", self.storage.url(self.name),
                    holder_text(held), deadline - time.monotonic())  # fmt: skip
        while time.monotonic() < deadline:
            time.sleep(min(1.0, held.ttl_s / 10))
            now = _read(self.storage, self.name)
            if now is None:
                return "it was given up"
            if now != held:
                raise self._refuse(now, " (it renewed its lease on the store while this job waited)")
        return f"not renewed for {held.ttl_s:.0f}s"

    def _why_free(self, held: Holder | None) -> str:
        me = self.me
        if held is None:
            return "unreadable"
        if held.host == me.host and (held.pid == me.pid or not pid_alive(held.pid)):
            return "its process on this host is gone"
        if held.job is not None and held.job == me.job and held.restart != me.restart:
            return "an earlier start of this torchrun job"
        if time.time() - held.renewed > held.ttl_s:
            return f"not renewed for {time.time() - held.renewed:.0f}s"
        return ""

    def _write_record(self) -> None:
        self.me = replace(self.me, renewed=time.time())
        self.storage.write_bytes(self.name, self.me.payload())

    def _renew(self) -> None:
        vanished_said = False
        while not self._stop.wait(self.ttl_s / 3):
            try:
                held = _read(self.storage, self.name)
                if held is not None and held.token != self.me.token:
                    self.lost = held
                    log.error("%s: %s took the writer lease over: this job's saves stop", self._where(),
                              holder_text(held))  # fmt: skip
                    return
                if held is None and not vanished_said:
                    vanished_said = True
                    log.warning("%s: the writer lease is gone from the store (emptied or recreated?): taken again",
                                self._where())  # fmt: skip
                self._write_record()
            except CheckpointError as e:  # an outage: the lease stands for ttl_s; uploads report their own errors
                log.warning("%s: renewing the writer lease failed: %s", self._where(), e)


def _not_writable(where: str, cause: BaseException) -> StorageError:
    error = StorageError(f"{where}: cannot write this run directory ({cause}); checked before training starts")
    if isinstance(cause, OSError):
        error.errno = cause.errno
    return error
