"""The ckptio exception family: every failure a caller can handle is a CheckpointError."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CheckpointError(Exception):
    """Root of every error ckptio raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for (also a FileNotFoundError for existing handlers)."""


class CorruptCheckpointError(CheckpointError):
    """A file exists but its bytes are not a valid checkpoint (truncated, lying header, bad digest)."""


class CheckpointFormatError(CheckpointError):
    """A file or URI has a format, extension or structure ckptio cannot use."""


class CheckpointSecurityError(CheckpointError):
    """Refused because loading would run untrusted code or write outside the run directory."""


class ArchitectureError(CheckpointError):
    """An architecture is missing, cannot be (de)serialized, or does not match the run's."""


class StateDictMismatchError(ArchitectureError):
    """Strict loading found missing, unexpected or mis-shaped keys."""


class UploadError(CheckpointError):
    """One or more background uploads finally failed after their retries."""


class InvalidArgumentError(CheckpointError, ValueError):
    """A call's argument is invalid (an epoch that is not a non-negative int, count < 1, ...)."""


class StorageError(CheckpointError, OSError):
    """Storage failed (unreachable endpoint, missing credentials, timeout, a disk error), naming the URI."""

    def __str__(self) -> str:  # OSError's own formatting would drop the URI and the operation
        return str(self.args[0]) if self.args else ""


class WriterConflictError(CheckpointError):
    """Another job writes this run directory (or wrote the epoch this job would replace): refused, nothing written."""


class CheckpointSaveError(CheckpointError):
    """A save failed; names the checkpoint and the operation, with the original error chained."""


class CheckpointSaveOSError(CheckpointSaveError, OSError):
    """A save failed on an OSError (errno kept), so ``except OSError`` handlers still see it."""

    def __str__(self) -> str:  # OSError's own formatting would drop the checkpoint and the operation
        return str(self.args[0])


def save_failed(target: str, operation: str, cause: BaseException) -> CheckpointSaveError:
    """The one error type of a failed save: also an OSError (same errno) when the cause is one."""
    message = f"saving {target} failed while {operation}: {cause}"
    if isinstance(cause, OSError):
        error: CheckpointSaveError = CheckpointSaveOSError(message)
        error.errno, error.strerror, error.filename = cause.errno, cause.strerror, cause.filename
        error.args = (message,)
        return error
    return CheckpointSaveError(message)


def storage_failed(target: str, operation: str, cause: BaseException) -> CheckpointError:
    """A read or another non-save operation failed on I/O: typed, naming the target, errno kept."""
    message = f"{target}: {operation} failed: {cause}"
    if isinstance(cause, FileNotFoundError):
        return CheckpointNotFoundError(message)
    error = StorageError(message)
    if isinstance(cause, OSError):
        error.errno, error.strerror, error.filename = cause.errno, cause.strerror, cause.filename
        error.args = (message,)
    return error


@contextlib.contextmanager
def typed_io(target: str, operation: str) -> Iterator[None]:
    """Turn an OSError escaping ``operation`` into a CheckpointError naming ``target``."""
    try:
        yield
    except CheckpointError:
        raise
    except OSError as e:
        raise storage_failed(target, operation, e) from e


class InvalidArtifactError(ArchitectureError, InvalidArgumentError):
    """A PolicyArtifact built from invalid arguments (both or neither of a module and a state dict, ...)."""


class CheckpointWarning(UserWarning):
    """Something a load went on without, as documented (a copy's sidecars not beside it)."""
