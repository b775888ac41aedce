"""The ckptio exception family: every failure a caller can handle is a CheckpointError."""

from __future__ import annotations


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
