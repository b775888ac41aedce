"""ckptio: safe, fast checkpoint IO for distributed PyTorch training."""

from .architecture import (
    PolicyArchitecture,
    allow_architecture_modules,
    architecture_from_json,
    architecture_to_json,
    register_architecture,
)
from .artifact import MockArchitecture, MockPolicy, PolicyArtifact
from .checkpointer import CheckpointConfig, Checkpointer
from .errors import (
    ArchitectureError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    CheckpointSecurityError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidArtifactError,
    StateDictMismatchError,
    StorageError,
    UploadError,
)
from .manager import (
    CheckpointInfo,
    CheckpointManager,
    VerifyResult,
    convert,
    latest,
    list_checkpoints,
    load_from_uri,
    select_checkpoints,
    verify,
)
from .policy_io import load_policy_artifact, save_policy_artifact
from .ranks import RankInfo, is_master, rank_info

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSaveError",
    "CheckpointSecurityError",
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
    "UploadError",
    "VerifyResult",
    "allow_architecture_modules",
    "architecture_from_json",
    "architecture_to_json",
    "convert",
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
