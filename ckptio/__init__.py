"""ckptio: safe, fast checkpoint IO for distributed PyTorch training."""

from .architecture import (
    PolicyArchitecture,
    allow_architecture_modules,
    architecture_from_json,
    architecture_to_json,
    register_architecture,
)
from .artifact import MockArchitecture, MockPolicy, PolicyArtifact
from .errors import (
    ArchitectureError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointSecurityError,
    CorruptCheckpointError,
    StateDictMismatchError,
    UploadError,
)
from .manager import (
    CheckpointInfo,
    CheckpointManager,
    convert,
    latest,
    list_checkpoints,
    load_from_uri,
    select_checkpoints,
)
from .policy_io import load_policy_artifact, save_policy_artifact

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSecurityError",
    "CorruptCheckpointError",
    "MockArchitecture",
    "MockPolicy",
    "PolicyArchitecture",
    "PolicyArtifact",
    "StateDictMismatchError",
    "UploadError",
    "allow_architecture_modules",
    "architecture_from_json",
    "architecture_to_json",
    "convert",
    "latest",
    "list_checkpoints",
    "load_from_uri",
    "load_policy_artifact",
    "register_architecture",
    "save_policy_artifact",
    "select_checkpoints",
]
