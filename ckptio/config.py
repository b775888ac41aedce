"""CheckpointConfig: how a training run checkpoints (what the Checkpointer reads, every field with a default)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .cache import DEFAULT_MAX_BYTES

__all__ = ["CheckpointConfig"]


@dataclass
class CheckpointConfig:
    """How a training run checkpoints. Every field has a working default; the groups:

    - What is written: ``checkpoint_format`` ("safetensors", or "pt" for plain models), every
      ``epoch_interval`` epochs (``save(force=True)`` saves anyway), named ``{run_name}.e{epoch}``.
    - Retention: ``keep_last`` newest and ``keep_best=(metric, "max"|"min", count)``; None keeps all.
      Never deleted: the newest, this job's last save, anything still uploading. It runs after ``save``
      returns, off the training thread; the next save, resume, ``wait()`` or ``close()`` waits for it.
    - The run directory's fsspec ``storage_options`` (credentials, endpoint), when it is a URI.
    - Object storage: ``remote_uri`` (+ ``remote_storage_options``) gets a copy of every checkpoint from
      ``upload_workers`` background threads; at most ``upload_max_pending`` wait (``upload_coalesce``
      skips the oldest waiting one rather than block ``save``); each file is retried ``upload_retries``
      times from ``upload_backoff_s`` and bounded by ``upload_file_timeout_s``; ``on_uploaded(uri)`` is
      called once a copy committed; ``close()`` waits for uploads within ``close_timeout_s``.
    - ``async_save``: ``save`` returns once tensors are copied to CPU; writing runs in the background.
    - Resume from object storage: ``cache_dir`` (default ``$CKPTIO_CACHE_DIR`` or ``~/.cache/ckptio``)
      holds one copy per node, up to ``cache_max_bytes``.
    - ``initial_load``: a checkpoint a new run starts from (a ckptio file or run, a Hugging Face folder, any URI),
      weights only: the optimizer, RNG and epoch start fresh. Once the run saved a checkpoint, it resumes that.
    - ``resume_without_trainer_state``: resume with a fresh optimizer and RNG (a warning) when the
      trainer-state file is missing or damaged, instead of raising.
    - Preemption: on SIGTERM (schedulers and torchrun send it before killing a job) the save in flight
      completes and the uploads get ``sigterm_finish_s`` seconds (keep it under the scheduler's grace
      period), then the process ends as the signal would have (a handler installed before is called
      instead); None leaves SIGTERM alone. Installed from the main thread only.
    - One writer per run: the master holds the run directory's writer lease (and the remote copy's) from its
      first resume or save to ``close()``; another job's Checkpointer on it is refused (WriterConflictError).
      On a disk it is a lock the kernel drops when the holder dies; on an object store a record renewed
      every ``writer_lease_s / 3`` seconds, free once not renewed for ``writer_lease_s``. None: no lease.
    - ``shard_timeout_s``: how long a sharded (DTensor) save waits for another rank before failing;
      ``shard_tensors_ahead``: how many tensors its master gathers while it writes one; ``shard_batch_bytes``:
      how many bytes of small tensors travel to it in one message.
    """

    checkpoint_format: str = "safetensors"
    epoch_interval: int = 1
    # The name checkpoint files carry ({run}.e{epoch}); default: the remote URI's or run directory's
    # last component. Runs sharing a directory are told apart by it (retention and resume are per run).
    run_name: str | None = None
    keep_last: int | None = None
    keep_best: tuple[str, str, int] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Object storage: checkpoints are written locally, then uploaded by background threads.
    remote_uri: str | None = None
    remote_storage_options: dict[str, Any] = field(default_factory=dict)
    upload_workers: int = 2
    upload_max_pending: int = 2
    upload_coalesce: bool = True
    upload_retries: int = 5
    upload_backoff_s: float = 0.5
    upload_file_timeout_s: float | None = 600.0
    # Called (on an upload thread) with a checkpoint's remote weights URI once its upload committed:
    # hand it to remote evaluation jobs. save() returns the local URI, before the upload is done.
    on_uploaded: Callable[[str], None] | None = None
    close_timeout_s: float | None = None  # bound on close() waiting for uploads; None waits
    # On SIGTERM: finish the save in flight, give uploads this long, then end as the signal would have.
    sigterm_finish_s: float | None = 25.0
    # Async save: the training thread only snapshots tensors to CPU; the rest runs in background.
    async_save: bool = False
    # Node-local cache for checkpoints loaded from object storage.
    cache_dir: str | None = None
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    # What a run with no checkpoint of its own starts from: its weights, read by every rank (a fine-tune's base).
    initial_load: str | None = None
    initial_load_storage_options: dict[str, Any] = field(default_factory=dict)
    # A checkpoint saved with trainer state whose trainer-state file is missing or damaged: resuming
    # would silently restart the optimizer and RNG, so it is an error unless this allows it (a warning).
    resume_without_trainer_state: bool = False
    # One job writes a run at a time: how long a lease on an object store outlives a holder that stopped
    # renewing it (a job killed on another host); None takes no lease, on disk nor store.
    writer_lease_s: float | None = 60.0
    # Sharded (DTensor/FSDP2) saves: how long a rank waits for another in the gathers before it
    # gives up with CheckpointSaveError (a rank that died mid-save must not hang the others forever).
    shard_timeout_s: float = 600.0
    # Sharded saves: how many tensors the master gathers ahead of the one it writes (overlapping the
    # transfers with the disk); its extra RAM is at most this many + 1 full tensors.
    shard_tensors_ahead: int = 2
    # Sharded saves: tensors smaller than this travel to the master together, this many bytes of them per
    # message (a model's many biases and norms: one round trip each otherwise); 0 sends each alone.
    shard_batch_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.epoch_interval < 1:
            raise ValueError("epoch_interval must be >= 1")
        if self.writer_lease_s is not None and not self.writer_lease_s > 0:
            raise ValueError("writer_lease_s must be > 0 seconds, or None")
