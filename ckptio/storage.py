"""One storage abstraction over fsspec: local disk, memory://, s3://, gs:// behave the same.

Local writes go to a hidden temporary in the destination directory, are fsync'ed, renamed into
place and the directory is fsync'ed, so a file is either whole or absent. Object stores have no
rename, but an object only becomes visible once its upload completes, which gives the same
all-or-nothing property per object. Write-once files use an exclusive create: ``link(2)`` of the
finished temporary locally, a conditional PUT (``mode="xb"``) on stores that support it.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import functools
import inspect
import logging
import math
import os
import posixpath
import socket
import stat
import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from .errors import CheckpointError, CheckpointNotFoundError, CheckpointSecurityError, StorageError

log = logging.getLogger("ckptio")

__all__ = [
    "TMP_MARK", "FileInfo", "Storage", "covers", "intersect_ranges", "is_network_filesystem", "is_temporary",
    "merge_ranges", "pid_alive", "split_uri", "subtract_ranges", "write_all",
]  # fmt: skip

# Filesystems where mmap page faults become network round trips (reported 30-50x slower than
# one eager sequential read): on these, loads read eagerly unless told otherwise.
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p", "afs")


_network_by_device: dict[int, bool] = {}
_reachable: set[tuple[str, int]] = set()  # object-store endpoints that accepted a connection
# gcsfs logs a traceback at every retry of a failed request; ckptio raises one typed error naming the
# cause, so without a logging configuration of the user's own those tracebacks are noise on stderr
logging.getLogger("gcsfs").addHandler(logging.NullHandler())


def is_network_filesystem(path: str, mounts_file: str = "/proc/mounts") -> bool:
    """Whether ``path`` lives on a network or FUSE filesystem (by its longest matching mount point)."""
    try:
        device = os.stat(path).st_dev
    except OSError:
        device = None
    if device is not None and mounts_file == "/proc/mounts" and device in _network_by_device:
        return _network_by_device[device]
    try:
        with open(mounts_file) as f:
            mounts = [fields[1:3] for fields in map(str.split, f) if len(fields) >= 3]
    except OSError:
        return False
    network = False
    # realpath costs a syscall per path component: skip it on the usual machine with no network mounts
    if any(kind in _NETWORK_FS or kind.startswith("fuse") for _, kind in mounts):
        real = os.path.realpath(path)
        best, fstype = "", ""
        for mount, kind in mounts:
            mount = mount.replace("\\040", " ")
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, kind
        network = fstype in _NETWORK_FS or fstype.startswith("fuse")
    if device is not None and mounts_file == "/proc/mounts":
        _network_by_device[device] = network  # a device's filesystem type does not change
    return network


TMP_MARK = ".ckptio-tmp."
# Bound on one metadata call (list, stat, small read, delete) to an object store; transfers have their
# own. Without it an unreachable endpoint retries for a minute or more inside the client library.
DEFAULT_TIMEOUT_S = float(os.environ.get("CKPTIO_STORAGE_TIMEOUT_S", "60"))


def merge_ranges(ranges: Iterable[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-empty byte ranges covering the given ones (and gaps of at most ``gap`` between them)."""
    merged: list[tuple[int, int]] = []
    for begin, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and begin <= merged[-1][1] + gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def covers(held: list[tuple[int, int]], begin: int, end: int) -> bool:
    """Whether merged ranges ``held`` contain all of ``[begin, end)``."""
    i = bisect.bisect_right(held, (begin, math.inf)) - 1
    return end <= begin or (i >= 0 and held[i][0] <= begin and end <= held[i][1])


def subtract_ranges(ranges: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of merged ``ranges`` outside merged ``taken`` (one pass over both)."""
    out: list[tuple[int, int]] = []
    j = 0
    for begin, end in ranges:
        while j < len(taken) and taken[j][1] <= begin:
            j += 1
        k = j
        while k < len(taken) and taken[k][0] < end:
            if taken[k][0] > begin:
                out.append((begin, taken[k][0]))
            begin = max(begin, taken[k][1])
            if taken[k][1] >= end:
                break
            k += 1
        if begin < end:
            out.append((begin, end))
    return out


def intersect_ranges(ranges: list[tuple[int, int]], other: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of merged ``ranges`` inside merged ``other``."""
    return subtract_ranges(ranges, subtract_ranges(ranges, other))


def is_temporary(name: str) -> bool:
    return TMP_MARK in name


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    version: str  # changes whenever the object's content may have changed (etag, generation, mtime)


def _is_plain_path(uri: str) -> bool:
    return "://" not in uri and "::" not in uri


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def split_uri(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    if _is_plain_path(uri):  # no protocol to resolve
        return LocalFileSystem(**(storage_options or {})), _abspath(uri)
    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise CheckpointError(f"cannot open storage for {uri!r}: {e}") from e


def write_all(f: IO[bytes], data: bytes | memoryview) -> None:
    """Write every byte: unbuffered files may take less than asked (Linux caps one write(2) near 2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        if n is None or n >= len(view):
            return
        if n <= 0:
            raise OSError(errno.EIO, f"write made no progress ({len(view)} bytes left)")
        view = view[n:]


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (the new directory entry survives a power loss)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, *, exclusive: bool = False, durable: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` for the caller to create, fill and fsync; on success it is committed.

    Committing renames it into place (``exclusive``: links it, failing with FileExistsError if
    ``path`` exists, so exactly one racer wins) and, if ``durable``, fsyncs the directory. On failure
    the temporary is removed; ``path`` is untouched either way until the commit.
    """
    directory, base = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    if exclusive and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "write-once file exists", path)
    tmp = os.path.join(directory, f".{base}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        if durable:
            fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _then(writer: Callable[[IO[bytes]], None], after: Callable[[], None], f: IO[bytes], *, durable: bool) -> None:
    writer(f)
    if durable:  # the fsync after the writer then finds nothing left to flush
        os.fsync(f.fileno())
    after()


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2), which the os module lacks; None where libc has none."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages; wait for none of them
WRITEBACK_BYTES = 8 << 20


class _WritebackFile:
    """``f``, whose pages the disk starts writing every ``WRITEBACK_BYTES`` the writer hands over.

    A file smaller than the kernel's dirty thresholds is otherwise not written at all until its fsync:
    the disk idles while a save serializes or gathers, then the fsync waits for every byte. Started as
    the data comes, the fsync waits for the last pages. Only a hint: the fsync still decides.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self._started_to = f, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        end = self._f.tell()
        if _sync_file_range is not None and end - self._started_to >= WRITEBACK_BYTES:
            _sync_file_range(self._f.fileno(), self._started_to, end - self._started_to, _SYNC_FILE_RANGE_WRITE)
            self._started_to = end
        return n


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    # not shutil.copyfileobj: it ignores short writes to an unbuffered file
    while chunk := src.read(16 << 20):
        write_all(dst, chunk)


class Storage:
    """A directory on some filesystem, addressed by names relative to it."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, timeout: float | None = None):
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        self._fs: fsspec.AbstractFileSystem | None = None
        self._buckets_seen: set[str] = set()  # buckets known to exist: checked once, not on every write
        if _is_plain_path(uri):
            # most loads name a local file and never need fsspec: build its filesystem on first use
            self.is_local, self.root = True, _abspath(uri)
        else:
            self._fs, root = split_uri(uri, self.storage_options)
            self.is_local = isinstance(self._fs, LocalFileSystem)
            self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = LocalFileSystem(**self.storage_options)
        return self._fs

    # -- addressing --------------------------------------------------------------------------
    def path(self, name: str, *, writing: bool = False) -> str:
        """Filesystem path of ``name``; refuses names that would leave this directory.

        Where it would write, a local path must also resolve inside the directory (no symlink
        escapes); reads skip that check, which costs a syscall per path component.
        """
        if not name or name.startswith("/") or "\\" in name:
            raise CheckpointSecurityError(f"{self.uri}: invalid file name {name!r}")
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise CheckpointSecurityError(f"{self.uri}: file name {name!r} would escape the directory")
        joined = posixpath.join(self.root, name)
        if writing and self.is_local:
            real_root = os.path.realpath(self.root)
            real = os.path.realpath(joined)
            if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
                raise CheckpointSecurityError(f"{self.uri}: {name!r} resolves outside the directory (symlink?)")
        return joined

    def url(self, name: str | None = None) -> str:
        """A URI another Storage (or ckptio.load_from_uri) can open."""
        p = self.root if name is None else posixpath.join(self.root, name)
        return p if self.is_local else self.fs.unstrip_protocol(p)

    def local_path(self, name: str) -> str | None:
        """Path usable with open()/mmap, or None when the storage is not the local disk."""
        return self.path(name) if self.is_local else None

    @contextlib.contextmanager
    def _local(self, name: str) -> Iterator[None]:
        """A local file call: FileNotFoundError becomes CheckpointNotFoundError naming the URI."""
        try:
            yield
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{self.url(name)}: no such file") from e

    # -- remote calls ------------------------------------------------------------------------
    def _remote(self, what: str, name: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call an fsspec method on an object store: bounded in time, failures typed and naming the URI."""
        timeout = kwargs.pop("timeout", self.timeout)
        self._check_reachable(what, name)
        try:
            return fn(*args, **self._timeout_kwargs(timeout), **kwargs)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{self.url(name)}: no such file") from e
        except (FileExistsError, CheckpointError):
            raise
        except Exception as e:  # botocore, aiohttp, google-auth... each library has its own family
            from fsspec.exceptions import FSTimeoutError

            cause = f"no answer within {timeout}s" if isinstance(e, FSTimeoutError) else f"{type(e).__name__}: {e}"
            raise StorageError(f"{self.url(name)}: {what} failed: {cause}") from e

    def _check_reachable(self, what: str, name: str | None) -> None:
        """An endpoint that refuses connections fails at once: gcsfs retries a refused connect for about 45 s."""
        location = getattr(self._fs, "_location", None) if "gs" in getattr(self._fs, "protocol", ()) else None
        if not isinstance(location, str):
            return  # s3fs and the others give up on a refused connection by themselves
        parts = urllib.parse.urlsplit(location)
        address = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        if address in _reachable:
            return
        try:
            socket.create_connection(address, timeout=min(5.0, self.timeout)).close()
        except OSError as e:
            raise StorageError(f"{self.url(name)}: {what} failed: cannot connect to {location}: {e}") from e
        _reachable.add(address)

    def open_ahead(self) -> None:
        """Set up the store's client on a background thread, for a rank that will use it after waiting on others:
        its first request otherwise pays for the setup (S3's client: about 0.2 s of CPU here)."""
        opener = (
            None if self.is_local else getattr(self.fs, "set_session", None) or getattr(self.fs, "_set_session", None)
        )
        if not inspect.iscoroutinefunction(opener) or getattr(self.fs, "loop", None) is None:
            return

        def setup() -> None:
            try:  # both libraries guard their setup with a lock: a request meanwhile waits for it
                fsspec.asyn.sync(self.fs.loop, opener, timeout=self.timeout)
            except Exception as e:  # the first request sets it up again, and reports what fails
                log.debug("%s: setting up the client ahead failed: %r", self.uri, e)

        threading.Thread(target=setup, name="ckptio-open-ahead", daemon=True).start()

    def kind(self, name: str | None = None, *, timeout: float | None = None) -> str | None:
        """'file', 'directory', or None when nothing is there (an unreachable store raises StorageError within
        ``timeout``, default the storage's)."""
        path = self.root if name is None else self.path(name)
        if self.is_local:
            try:  # one stat: isdir() then exists() saw a directory created between them as a file
                mode = os.stat(path).st_mode
            except (OSError, ValueError):
                return None
            return "directory" if stat.S_ISDIR(mode) else "file"
        self.fs.invalidate_cache(path)  # what the store holds now, not what a listing of this process once said
        try:
            info = self._remote("stat", name, self.fs.info, path, timeout=timeout or self.timeout)
        except CheckpointNotFoundError:
            return None
        return "directory" if info.get("type") == "directory" else "file"

    # -- reading -----------------------------------------------------------------------------
    def exists(self, name: str, *, timeout: float | None = None) -> bool:
        if self.is_local:
            return os.path.exists(self.path(name))
        return self.kind(name, timeout=timeout) is not None

    def read_bytes(self, name: str) -> bytes:
        if self.is_local:
            with self._local(name), open(self.path(name), "rb") as f:
                return f.read()
        return self._remote("read", name, self.fs.cat_file, self.path(name))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``name`` (one ranged request on object stores)."""
        if self.is_local:
            with self._local(name), open(self.path(name), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        return self._remote("read", name, self.fs.cat_file, self.path(name), start=start, end=end)

    def open(self, name: str, mode: str = "rb") -> IO[bytes]:
        if self.is_local:
            with self._local(name):
                return self.fs.open(self.path(name), mode)
        return self._remote("open", name, self.fs.open, self.path(name), mode, timeout=None)

    def info(self, name: str) -> FileInfo:
        if self.is_local:
            with self._local(name):
                info = self.fs.info(self.path(name))
        else:
            info = self._remote("stat", name, self.fs.info, self.path(name))
        # fsspec's ukey() would be a second stat (s3fs: a second HEAD) for what this one already holds
        version = next(
            (
                str(info[k])
                for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")
                if info.get(k) is not None
            ),
            "",
        )
        return FileInfo(name=name, size=int(info.get("size") or 0), version=f"{version}:{info.get('size')}")

    def listdir(self) -> list[str]:
        """Names of the files directly in this directory (every page of a paginated listing)."""
        if self.is_local:
            try:
                entries = os.listdir(self.root)
            except FileNotFoundError:
                return []
        else:
            try:
                self.fs.invalidate_cache(self.root)  # a listing must see what other processes wrote since
                entries = self._remote("list", None, self.fs.ls, self.root, detail=False)
            except CheckpointNotFoundError:
                self._check_bucket(self.root, again=True)  # a misspelt bucket is not an empty directory
                return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    # -- writing -----------------------------------------------------------------------------
    def write(
        self,
        name: str,
        writer: Callable[[IO[bytes]], None],
        *,
        exclusive: bool = False,
        before_commit: Callable[[], None] | None = None,
    ) -> str:
        """Write ``name`` all-or-nothing via ``writer(file)``; exclusive raises FileExistsError if present.

        ``before_commit`` runs once the data is durable (fsynced; on a store, written but not yet closed) and
        before ``name`` appears; if it raises, ``name`` never appears.
        """
        path = self.path(name, writing=True)
        if before_commit is not None:
            writer = functools.partial(_then, writer, before_commit, durable=self.is_local)
        if self.is_local:
            self._write_local(path, writer, exclusive)
        else:
            self._write_remote(path, writer, exclusive)
        return self.url(name)

    def write_bytes(self, name: str, data: bytes, *, exclusive: bool = False) -> str:
        return self.write(name, lambda f: write_all(f, data), exclusive=exclusive)

    def _write_local(self, path: str, writer: Callable[[IO[bytes]], None], exclusive: bool) -> None:
        with atomic_file(path, exclusive=exclusive) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with open(fd, "wb", buffering=0) as f:
                writer(cast(IO[bytes], _WritebackFile(f)))
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible

    def _write_remote(self, path: str, writer: Callable[[IO[bytes]], None], exclusive: bool) -> None:
        name = posixpath.relpath(path, self.root)
        # The conditional create decides races on stores that enforce it (S3 If-None-Match,
        # GCS ifGenerationMatch=0); this check also covers stores that ignore it, and comes first:
        # on every resume the manifest is there, and one request says so.
        if exclusive and self.exists(name):
            raise FileExistsError(errno.EEXIST, "write-once file exists", path)
        parent = posixpath.dirname(path)
        if parent and self.kind() is None:
            self._make_parent(parent)
        if exclusive:
            try:
                self._stream(name, path, "xb", writer)
                return
            except StorageError as e:
                if not isinstance(e.__cause__, (NotImplementedError, ValueError)):
                    raise
                # backend has no conditional create: the check above and the single writer hold
        self._stream(name, path, "wb", writer)

    def _make_parent(self, parent: str) -> None:
        """Where a write's directory does not exist yet: made on filesystems with directories; on an object
        store (keys under a bucket) only the bucket is checked."""
        if not self._check_bucket(parent):
            self._remote("mkdir", None, self.fs.makedirs, parent, exist_ok=True)

    def _check_bucket(self, path: str, *, again: bool = False) -> bool:
        """On a store with buckets (s3fs, gcsfs, adlfs): StorageError unless ``path``'s bucket exists (checked once
        per bucket, or ``again``), never creating it: a misspelt bucket must not become a new one. False on other
        filesystems."""
        split = getattr(self.fs, "split_path", None)
        if split is None:
            return False
        bucket = split(path)[0]
        if again or bucket not in self._buckets_seen:
            if not self._remote("stat", None, self.fs.exists, bucket):
                raise StorageError(
                    f"{self.uri}: bucket {bucket!r} does not exist (ckptio never creates buckets: create it, or "
                    "correct the URI)"
                )
            self._buckets_seen.add(bucket)
        return True

    def _stream(self, name: str, path: str, mode: str, writer: Callable[[IO[bytes]], None]) -> None:
        """Open, write and close one object: the upload (and its failure) happens inside."""

        def run() -> None:
            with self.fs.open(path, mode) as f:
                writer(f)

        with self._writing_to(path):
            self._remote("write", name, run, timeout=None)

    @contextlib.contextmanager
    def _writing_to(self, path: str) -> Iterator[None]:
        """A write the store answers with 'no such file': its bucket was deleted since it was checked (an emptied
        and recreated store answers so for a while), or the key's prefix cannot be made; said as such."""
        try:
            yield
        except CheckpointNotFoundError as e:
            self._check_bucket(path, again=True)
            raise StorageError(
                f"{self.url(posixpath.relpath(path, self.root))}: the store answered 'no such file' to a write (was "
                f"its bucket deleted or recreated?): {e.__cause__ or e}"
            ) from e

    def _timeout_kwargs(self, timeout: float | None) -> dict[str, Any]:
        # fsspec's sync wrappers of async filesystems (s3fs, gcsfs) take a timeout; a frozen
        # server otherwise hangs a transfer for minutes
        from fsspec.asyn import AsyncFileSystem

        return {"timeout": timeout} if timeout is not None and isinstance(self.fs, AsyncFileSystem) else {}

    def put_file(self, local_path: str, name: str, *, timeout: float | None = None, callback: Any = None) -> None:
        """Upload a local file as ``name`` (an object appears only once its upload completes)."""
        path = self.path(name, writing=True)
        if self.is_local:
            with open(local_path, "rb") as src:
                self._write_local(path, lambda f: _copy(src, f), False)
            return
        kwargs = {"callback": callback} if callback is not None else {}
        self._check_bucket(path)
        with self._writing_to(path):
            self._remote("upload", name, self.fs.put_file, local_path, path, timeout=timeout, **kwargs)

    def get_file(self, name: str, local_path: str, *, timeout: float | None = None) -> None:
        """Download ``name`` to a local path (the caller makes that atomic)."""
        if self.is_local:
            with self._local(name):
                self.fs.get_file(self.path(name), local_path)
            return
        self._remote("download", name, self.fs.get_file, self.path(name), local_path, timeout=timeout)

    def delete(self, name: str, missing_ok: bool = True) -> None:
        path = self.path(name, writing=True)
        try:
            if self.is_local:
                os.unlink(path)
            else:
                self._remote("delete", name, self.fs.rm_file, path)
        except (FileNotFoundError, CheckpointNotFoundError):
            if not missing_ok:
                raise

    def clean_temporaries(self) -> list[str]:
        """Remove temporaries left by crashed writers on this host; returns what was removed."""
        if not self.is_local:
            return []
        removed = []
        for name in self.listdir():
            if not is_temporary(name):
                continue
            owner = name.rsplit(TMP_MARK, 1)[1].split(".", 1)[0]
            if owner.isdigit() and pid_alive(int(owner)):
                continue  # a live writer's file (this process's background saves included)
            self.delete(name)
            removed.append(name)
        return removed
