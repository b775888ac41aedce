"""Node-local cache of remote checkpoint files, so ranks memory-map one local copy per node.

Entries are keyed by the remote URL and its version (ETag, generation or mtime, plus size), so a
changed remote object is fetched again rather than served stale. Downloads land in a temporary
and are renamed into place; least-recently-used entries are evicted beyond a size limit.
"""

from __future__ import annotations

import hashlib
import logging
import os

from .storage import Storage, atomic_file

__all__ = ["NodeCache", "default_cache_dir"]

log = logging.getLogger("ckptio")

DEFAULT_MAX_BYTES = 64 << 30


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

    def path_for(self, storage: Storage, name: str) -> str:
        """Local path of ``name``'s current version (whether or not it is cached yet)."""
        info = storage.info(name)
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

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least-recently-used entries until the cache fits its size limit."""
        entries = []
        for entry in os.scandir(self.directory):
            if entry.is_file() and not entry.name.startswith("."):
                st = entry.stat()
                entries.append((st.st_mtime, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            try:
                os.unlink(path)  # mappings already open stay valid: unlink keeps their pages
            except FileNotFoundError:
                continue
            total -= size
            removed.append(path)
        return removed
