"""Node-local cache of remote checkpoint files, so ranks memory-map one local copy per node.

Entries are keyed by the remote URL and its version (ETag, generation or mtime, plus size), so a
changed remote object is fetched again rather than served stale. Downloads land in a temporary
and are renamed into place; least-recently-used entries are evicted beyond a size limit.

A node that needs only some byte ranges of a file (its ranks' blocks of a sharded checkpoint)
keeps a *partial* entry: a sparse file of the object's size holding those ranges, and a record of
which ranges it holds. A range enters the record only once its bytes are written, checked and on
disk; a partial entry is only ever read through that record. A partial entry that comes to hold
every byte becomes a whole entry, which later loads on the node map like any download.

Entries are keyed by a file's URL on the storage it came from, which may be another node's local
disk: the master's run directory, whose pieces reached this node over the job's process group.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

from .errors import CheckpointNotFoundError, StorageError
from .storage import FileInfo, Storage, atomic_file, merge_ranges, subtract_ranges

__all__ = ["NodeCache", "cut_pieces", "default_cache_dir", "exact", "widen_ranges"]

log = logging.getLogger("ckptio")

DEFAULT_MAX_BYTES = 64 << 30
PARTIAL = ".partial"  # a partial entry's data; its record of held ranges adds HELD
HELD = ".held"
RANGE_PIECE = 8 << 20  # one ranged GET: large enough to stream, small enough that several run at once
RANGE_WORKERS = 16  # concurrent ranged reads: a request's latency, not bandwidth, limits a node fetching many ranges
RANGE_GAP = 32 * 1024  # ranges closer than this are read as one: a request costs more than these bytes

Ranges = list[tuple[int, int]]


def widen_ranges(ranges: Ranges, cuts: Sequence[int], size: int) -> Ranges:
    """``ranges`` widened to the nearest ``cuts`` (sorted offsets, the file's digested chunks) around them."""
    if not cuts:
        return merge_ranges(ranges)
    out: Ranges = []
    for begin, end in ranges:
        if begin < cuts[0]:
            out.append((begin, min(end, cuts[0])))
            begin = cuts[0]
        if begin < end:
            j = bisect.bisect_left(cuts, end)
            out.append((cuts[bisect.bisect_right(cuts, begin) - 1], cuts[j] if j < len(cuts) else size))
    return merge_ranges(out)


def cut_pieces(ranges: Ranges, cuts: Sequence[int], size: int, piece: int = RANGE_PIECE) -> Ranges:
    """Ranged reads of about ``piece`` bytes covering ``ranges``, cut only at ``cuts`` (past the first)."""
    out: Ranges = []
    for begin, end in ranges:
        p = begin
        while p < end:
            if not cuts or p + piece < cuts[0]:
                q = p + piece
            else:
                k = bisect.bisect_right(cuts, p + piece) - 1
                q = cuts[k] if cuts[k] > p else next(iter(cuts[bisect.bisect_right(cuts, p) :]), size)
            out.append((p, min(q, end)))
            p = min(q, end)
    return out


def exact(data: bytes, begin: int, end: int, source: str) -> bytes:
    """``data``, read as bytes ``[begin, end)`` of ``source``, if it is all of them (else StorageError)."""
    if len(data) != end - begin:
        raise StorageError(f"{source}: asked for bytes [{begin}, {end}), got {len(data)} (did it change meanwhile?)")
    return data


def _pwrite_all(fd: int, data: bytes | memoryview, at: int) -> None:
    with memoryview(data) as view:
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], at + written)


def default_cache_dir() -> str:
    return os.environ.get("CKPTIO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ckptio"
    )


class NodeCache:
    def __init__(self, directory: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float | None = 600):
        self.directory = os.path.abspath(directory or default_cache_dir())
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.fills = 0  # downloads made by this process (tests and logs read it)

    def path_for(self, storage: Storage, name: str, info: FileInfo | None = None) -> str:
        """Local path of ``name``'s current version (whether or not it is cached yet); ``info``: its stat, if known."""
        info = info or storage.info(name)
        key = hashlib.sha256(f"{storage.url(name)}\0{info.version}".encode()).hexdigest()[:24]
        return os.path.join(self.directory, f"{key}-{name}")

    def fetch(self, storage: Storage, name: str) -> str:
        """A local path holding ``name``'s current content, downloading it only if not cached."""
        path = self.path_for(storage, name)
        if os.path.exists(path):
            os.utime(path)  # recency for LRU eviction
            return path
        with atomic_file(path) as tmp:
            storage.get_file(name, tmp, timeout=self.timeout)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        self.fills += 1
        log.info("cached %s (%d bytes) at %s", storage.url(name), os.path.getsize(path), path)
        self.evict(keep=path)
        return path

    # -- partial entries ---------------------------------------------------------------------
    def partial(self, storage: Storage, name: str, info: FileInfo | None = None) -> tuple[str, Ranges]:
        """The local path holding ``name``'s current version and the byte ranges it holds there.

        The whole file when a full entry is cached; else the partial entry's recorded ranges
        (none when there is no entry).
        """
        full = self.path_for(storage, name, info)
        if os.path.exists(full):
            return full, [(0, os.path.getsize(full))]
        path = full + PARTIAL
        try:
            with open(path + HELD) as f:
                record = json.load(f)
        except FileNotFoundError:
            return path, []
        except ValueError:  # a record is replaced atomically, so this is damage: hold nothing
            log.warning("%s: unreadable record of held ranges; treating the entry as empty", path + HELD)
            return path, []
        return path, [(int(b), int(e)) for b, e in record["held"]]

    def holding(self, storage: Storage, name: str, info: FileInfo) -> tuple[str, Ranges]:
        """Where this node holds version ``info`` of ``name``, and which byte ranges of it.

        The file itself, whole, where ``storage`` is this node's disk and holds that very version (the
        master's run directory on the master's node, or a directory all nodes share); else the cache's entry.
        """
        if storage.is_local:
            try:
                if storage.info(name) == info:
                    return storage.path(name), [(0, info.size)]
            except CheckpointNotFoundError:
                pass  # another node's local file: this node holds what its cache holds
        return self.partial(storage, name, info)

    def fetch_ranges(
        self,
        storage: Storage,
        name: str,
        ranges: Ranges,
        check: Callable[[int, bytes], None] | None = None,
        cuts: Sequence[int] = (),
        info: FileInfo | None = None,
    ) -> tuple[str, Ranges]:
        """A local path holding at least byte ``ranges`` of ``name``, and every range it holds there.

        Ranges not yet held are fetched with concurrent ranged reads, widened to and cut only at
        ``cuts`` (sorted offsets: the file's digested chunks), so ``check(start, data)`` sees whole
        chunks and may refuse a piece (its digest) before it is written. ``info``: the object's stat, if known. A failed fetch raises after recording the
        pieces that completed; nothing is recorded that was not wholly fetched, checked and synced.
        """
        info = info or storage.info(name)  # one stat: the entry's key and the object's size
        path, held = self.holding(storage, name, info)
        if not path.endswith(PARTIAL):
            return path, held  # a whole entry, or the file itself on this node's disk
        size = info.size
        wanted = widen_ranges(merge_ranges([(max(0, b), min(size, e)) for b, e in ranges], RANGE_GAP), cuts, size)
        with self._locked(path, size) as fd:
            path, held = self.partial(storage, name, info)  # another process may have filled it meanwhile
            if not path.endswith(PARTIAL):
                return path, held
            todo = cut_pieces(widen_ranges(subtract_ranges(wanted, held), cuts, size), cuts, size)
            done: Ranges = []
            try:
                self._fetch_pieces(storage, name, fd, todo, check, done)
            finally:
                path, held = self._record(storage.url(name), path, fd, size, held, done)
        log.info("cached %d bytes of %s at %s (%d ranges held)", sum(e - b for b, e in done), storage.url(name),
                 path, len(held))  # fmt: skip
        os.utime(path)
        self.evict(keep=path)
        return path, held

    def _fetch_pieces(
        self,
        storage: Storage,
        name: str,
        fd: int,
        pieces: Ranges,
        check: Callable[[int, bytes], None] | None,
        done: Ranges,
    ) -> None:
        def one(begin: int, end: int) -> tuple[int, int]:
            data = exact(storage.read_range(name, begin, end), begin, end, storage.url(name))
            if check is not None:
                check(begin, data)
            _pwrite_all(fd, data, begin)
            return begin, end

        error: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(RANGE_WORKERS, thread_name_prefix="ckptio-range") as pool:
            futures = [pool.submit(one, b, e) for b, e in pieces]
            for future in futures:
                try:
                    done.append(future.result())
                except concurrent.futures.CancelledError:
                    continue
                except Exception as e:
                    if error is None:  # what has not started never starts; what runs completes and counts
                        error = e
                        for other in futures:
                            other.cancel()
        if error is not None:
            raise error

    def put_ranges(
        self,
        storage: Storage,
        name: str,
        parts: Sequence[tuple[int, bytes | memoryview]],
        check: Callable[[int, bytes | memoryview], None] | None,
        info: FileInfo | None = None,
    ) -> Ranges:
        """Write ``parts`` (offset, bytes) of ``name`` obtained elsewhere into its partial entry; every range held after.

        Each part is checked (``check(start, data)``, whole chunks; None: as a fetch without ``check``) before it
        is written, and recorded only once all are written and synced: a part that fails its check leaves the
        record as it was.
        """
        info = info or storage.info(name)
        path, held = self.holding(storage, name, info)
        if not path.endswith(PARTIAL) or not parts:
            return held
        if check is not None:
            for begin, data in parts:
                check(begin, data)
        with self._locked(path, info.size) as fd:
            path, held = self.partial(storage, name, info)
            if not path.endswith(PARTIAL):
                return held
            for begin, data in parts:
                _pwrite_all(fd, data, begin)
            path, held = self._record(storage.url(name), path, fd, info.size, held, [(b, b + len(d)) for b, d in parts])
        os.utime(path)
        self.evict(keep=path)
        return held

    def _record(self, url: str, path: str, fd: int, size: int, held: Ranges, done: Ranges) -> tuple[str, Ranges]:
        """Sync the entry's data, then record ``done`` as held with ``held``: the record never names bytes not on disk.
        Returns the entry's path (the whole entry's, once it holds every byte) and every range it holds."""
        if not done:
            return path, held
        os.fsync(fd)
        held = merge_ranges(held + done)
        # the record itself is replaced atomically but not synced: after a machine crash it is the previous
        # record or a damaged one (read as holding nothing), so it never names bytes the data sync did not
        # cover; what it lost is fetched again. Two syncs fewer per file and node, on a resume's critical path
        with atomic_file(path + HELD, durable=False) as tmp, open(tmp, "w") as f:
            json.dump({"url": url, "size": size, "held": held}, f)
        self.fills += 1
        if held == [(0, size)]:
            return self._complete(path), held
        return path, held

    def _complete(self, path: str) -> str:
        """A partial entry holding every byte becomes the whole entry (linked: a reader of either name keeps its
        bytes), so later loads on this node map it as they would a download. The record goes before the data."""
        whole = path.removesuffix(PARTIAL)
        with contextlib.suppress(FileExistsError):
            os.link(path, whole)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + HELD)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return whole

    @contextlib.contextmanager
    def _locked(self, path: str, size: int) -> Iterator[int]:
        """The partial entry's data file, open for writing and locked against other processes filling it."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # sparse: unfetched ranges take no disk
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least-recently-used entries until the cache fits its size limit."""
        entries = []
        for entry in os.scandir(self.directory):
            if entry.is_file() and not entry.name.startswith(".") and not entry.name.endswith(HELD):
                st = entry.stat()
                # a partial entry counts the disk it takes, not its (sparse) length
                entries.append((st.st_mtime, min(st.st_size, st.st_blocks * 512), entry.path))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                if path.endswith(PARTIAL):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + HELD)  # the record first: it never names bytes that are gone
                os.unlink(path)  # mappings already open stay valid: unlink keeps their pages
            except FileNotFoundError:
                continue
            total -= size
            removed.append(path)
        return removed
