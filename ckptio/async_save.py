"""Asynchronous saving as a wrapper around a synchronous save.

``save(write, ...)`` runs the synchronous ``write`` now or on a worker thread; for a background
save the caller's thread first snapshots tensors into CPU buffers (reused from save to save). At
most one save is in flight, and a background failure is raised by the next call (``wait``, the
next save, or close), as Lightning's ``AsyncCheckpointIO`` wraps any ``CheckpointIO``. Work that
follows a save without the caller needing it (retention) runs on the same thread, either way.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import CheckpointError, save_failed
from .formats import alias_key

__all__ = ["AsyncSaver"]

log = logging.getLogger("ckptio")


class AsyncSaver:
    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}  # by key, reused while shapes and dtypes stay
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def snapshot(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """CPU copies the training thread may not touch. Call only with no save in flight (``wait`` first)."""
        assert self._thread is None, "snapshot while a background save still reads the buffers"
        out: dict[str, torch.Tensor] = {}
        tied: dict[Any, torch.Tensor] = {}
        pin = torch.cuda.is_available()
        cuda = False
        for name, t in tensors.items():
            # tied weights stay tied, as the writer finds them: state_dict() gives each name its own tensor object
            tie = alias_key(t)
            if tie is not None and tie in tied:
                out[name] = tied[tie]
                continue
            key = prefix + name
            buf = self.buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin and t.is_cuda)
                self.buffers[key] = buf
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            cuda |= t.is_cuda
            out[name] = buf
            if tie is not None:
                tied[tie] = buf
        if cuda:
            torch.cuda.synchronize()  # the copies must have landed before the caller's next step
        return out

    def save(
        self, write: Callable[..., None], *args: Any, background: bool, after: Callable[[], None] | None = None
    ) -> None:
        """``write(*args)``, after the save in flight (whose error raises here): now, or on the worker thread.

        ``after`` (retention) runs once the save is written, on the worker thread either way: the caller
        does not wait for it, and its error is raised like a background save's.
        """
        self.wait()
        steps = [after] if after is not None else []
        if not background:
            write(*args)
        else:
            steps.insert(0, functools.partial(write, *args))
        if steps:
            self._thread = threading.Thread(target=self._run, args=(steps,), name="ckptio-save", daemon=True)
            self._thread.start()

    def _run(self, steps: list[Callable[[], None]]) -> None:
        try:
            for step in steps:
                step()
        except BaseException as e:
            log.error("background save failed: %s", e)
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is written; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointError):
                raise error  # the save's own typed error, the same a synchronous save raises
            raise save_failed("a background checkpoint", "writing in the background", error) from error
