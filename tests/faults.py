"""Fault injection at every I/O call, as SQLite's anomaly tests do it.

``Faults`` wraps the calls through which ckptio touches storage: the ``os`` functions of the
write protocol (open, fsync, replace, link, unlink, makedirs, listdir), the file objects ckptio
opens (each ``write`` and ``read``), and every object-store call (``Storage._remote``). In a clean
run it records them in order (``calls``); with ``fail_at=k`` the k-th call of the chosen kind
fails once:

- ``EIO``, ``ENOSPC``, ``EACCES``: the call raises that OSError;
- ``short``: the k-th write stores only half of what it was given and says so (not an error);
- ``timeout``, ``reset``: the k-th object-store call fails with fsspec's timeout or a reset connection.
"""

from __future__ import annotations

import builtins
import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import ckptio.cache
import ckptio.layout
import ckptio.storage
from ckptio.storage import Storage

LOCAL_KINDS = ("EIO", "ENOSPC", "EACCES", "short")
REMOTE_KINDS = ("timeout", "reset")
_ERRNO = {"EIO": errno.EIO, "ENOSPC": errno.ENOSPC, "EACCES": errno.EACCES}
_OS_CALLS = ("open", "fsync", "replace", "link", "unlink", "makedirs", "listdir")
_OPENERS = (ckptio.storage, ckptio.layout, ckptio.cache)  # modules whose open() reaches files


class InjectedFault(Exception):
    """Marks where the harness failed a call (the error itself is an OSError or a remote error)."""


@dataclass
class Faults:
    fail_at: int | None = None  # 1-based position among the calls this kind can hit
    kind: str = "EIO"
    calls: list[tuple[str, str]] = field(default_factory=list)
    fired: tuple[str, str] | None = None
    fds: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _eligible: int = 0
    _fired_at: int = 0

    def applies_to(self, op: str) -> bool:
        if self.kind == "short":
            return op == "write"
        if self.kind in REMOTE_KINDS:
            return op.startswith("remote:")
        return not op.startswith("remote:")

    def before_fault(self) -> list[tuple[str, str]]:
        """The calls that completed: all of them, less the one that was made to fail."""
        if self.fired is None or self.kind == "short":  # a short write is not a failure: the call went on
            return list(self.calls)
        return self.calls[: self._fired_at]

    def _hit(self, op: str, detail: str) -> bool:
        """Record a call; True if this is the one to fail."""
        with self._lock:
            self.calls.append((op, detail))
            if self.fail_at is None or self.fired is not None or not self.applies_to(op):
                return False
            self._eligible += 1
            if self._eligible != self.fail_at:
                return False
            self.fired, self._fired_at = (op, detail), len(self.calls) - 1
            return True

    def eligible(self) -> int:
        """How many calls this kind could fail (from a clean run's record)."""
        return sum(self.applies_to(op) for op, _ in self.calls)

    def _error(self, detail: str) -> BaseException:
        if self.kind == "timeout":
            from fsspec.exceptions import FSTimeoutError

            return FSTimeoutError(f"injected timeout: {detail}")
        if self.kind == "reset":
            return ConnectionResetError(errno.ECONNRESET, "injected: connection reset by peer")
        return OSError(_ERRNO[self.kind], f"injected {self.kind}: {os.strerror(_ERRNO[self.kind])}", detail)

    # -- installation ----------------------------------------------------------------------
    def install(self, monkeypatch: Any) -> Faults:
        for name in _OS_CALLS:
            monkeypatch.setattr(os, name, self._wrap_os(name, getattr(os, name)))
        for module in _OPENERS:
            monkeypatch.setattr(module, "open", self._open, raising=False)
        real_remote = Storage._remote
        faults = self

        def remote(storage: Storage, what: str, name: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
            if faults._hit(f"remote:{what}", storage.url(name)):
                error = faults._error(storage.url(name))

                def fn(*a: Any, **k: Any) -> Any:
                    raise error

            return real_remote(storage, what, name, fn, *args, **kwargs)

        monkeypatch.setattr(Storage, "_remote", remote)
        return self

    def _wrap_os(self, name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            detail = self._detail(name, args)
            if self._hit(name, detail) and self.kind != "short":
                raise self._error(detail)
            result = real(*args, **kwargs)
            if name == "open":
                self.fds[result] = str(args[0])
            return result

        return call

    def _detail(self, name: str, args: tuple[Any, ...]) -> str:
        """What a call acts on: a path; a descriptor's path for fsync; 'src -> dst' for renames."""
        if not args:
            return ""
        if name == "fsync":
            return self.fds.get(args[0], str(args[0]))
        if name in ("replace", "link", "rename") and len(args) > 1:
            return f"{args[0]} -> {args[1]}"
        return str(args[0])

    def _open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        detail = str(file)
        if self._hit("open_file", detail) and self.kind != "short":
            raise self._error(detail)
        return _FaultyFile(builtins.open(file, mode, *args, **kwargs), self, detail)


class _FaultyFile:
    """A file whose write and read calls go through the harness."""

    def __init__(self, f: Any, faults: Faults, detail: str):
        self._f, self._faults, self._detail = f, faults, detail

    def write(self, data: Any) -> int:
        if self._faults._hit("write", self._detail):
            if self._faults.kind == "short":
                view = memoryview(data).cast("B")
                return self._f.write(view[: max(1, len(view) // 2)])
            raise self._faults._error(self._detail)
        return self._f.write(data)

    def read(self, *args: Any) -> Any:
        if self._faults._hit("read", self._detail) and self._faults.kind != "short":
            raise self._faults._error(self._detail)
        return self._f.read(*args)

    def readinto(self, buf: Any) -> Any:
        if self._faults._hit("read", self._detail) and self._faults.kind != "short":
            raise self._faults._error(self._detail)
        return self._f.readinto(buf)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __iter__(self) -> Any:
        return iter(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)
