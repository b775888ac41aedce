"""ckptio: safe, fast checkpoint IO for distributed PyTorch training.

Where each concern lives (data flows down this list, never up):

- ``checkpointer``  Checkpointer: rank coordination in a training loop (who writes, what every rank resumes from);
  ``config`` its CheckpointConfig
- ``node_fetch``    a sharded resume on several nodes: the store sends each byte once, nodes share the pieces
- ``async_save``    AsyncSaver: snapshot on the caller's thread, the synchronous save on a worker
- ``lease``         WriterLease: one job writes a run directory (and its remote copy) at a time
- ``mirror``        RemoteMirror: local checkpoints copied to object storage, retention on both copies
- ``upload``        Uploader: background upload threads, retries, coalescing
- ``sharded``       DTensor state dicts: gathered to the master a tensor or a batch at a time, sliced per rank on load
- ``manager``       CheckpointManager: one run's saves, manifest and retention
- ``tools``         convert, export, inspect, verify (what the ``ckptio`` command runs; ``cli`` parses its arguments)
- ``dcp``           torch.distributed.checkpoint directories: described, converted one tensor at a time
- ``discovery``     URIs resolved, checkpoints listed, latest and best chosen, ``load_from_uri``
- ``layout``        one checkpoint's files: names, commit order, sidecars, the manifest; reading them back
- ``hf``            Hugging Face model folders (``save_pretrained``'s): shards read against their index, written
- ``formats``       safetensors and .pt bytes: writer, strict reader, digests (whole and per chunk)
- ``storage``       one directory on any filesystem (fsspec), atomic writes; ``cache`` node-local copies (whole, or a node's ranges)
- beside them: ``architecture`` (class path + config, the import allow-list), ``artifact`` (PolicyArtifact),
  ``trainer_state`` (optimizer and RNG trees as tensors), ``ranks`` (rank facts, gloo collectives),
  ``errors`` (the exception types)
"""

from .architecture import (
    ArchitectureRecord,
    PolicyArchitecture,
    TransformersArchitecture,
    allow_architecture_modules,
    architecture_from_json,
    architecture_to_json,
    register_architecture,
)
from .artifact import MockArchitecture, MockPolicy, PolicyArtifact
from .checkpointer import Checkpointer
from .config import CheckpointConfig
from .discovery import (
    CheckpointInfo,
    latest,
    list_checkpoints,
    load_from_uri,
    load_policy_artifact,
    select_checkpoints,
)
from .errors import (
    ArchitectureError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointSecurityError,
    CheckpointWarning,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidArtifactError,
    StateDictMismatchError,
    StorageError,
    UploadError,
    WriterConflictError,
)
from .manager import CheckpointManager, save_policy_artifact
from .ranks import RankInfo, is_master, rank_info
from .tools import VerifyResult, convert, export, inspect_checkpoint, verify
from .version import __version__ as __version__

__all__ = [
    "ArchitectureError",
    "ArchitectureRecord",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointSecurityError",
    "CheckpointWarning",
    "Checkpointer",
    "CorruptCheckpointError",
    "InvalidArgumentError",
    "InvalidArtifactError",
    "MockArchitecture",
    "MockPolicy",
    "PolicyArchitecture",
    "PolicyArtifact",
    "RankInfo",
    "StateDictMismatchError",
    "StorageError",
    "TransformersArchitecture",
    "UploadError",
    "VerifyResult",
    "WriterConflictError",
    "allow_architecture_modules",
    "architecture_from_json",
    "architecture_to_json",
    "convert",
    "export",
    "inspect_checkpoint",
    "is_master",
    "latest",
    "list_checkpoints",
    "load_from_uri",
    "load_policy_artifact",
    "rank_info",
    "register_architecture",
    "save_policy_artifact",
    "select_checkpoints",
    "verify",
]
