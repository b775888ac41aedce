"""One checkpoint on storage: its file names, and saving/loading its weights and sidecars.

A checkpoint ``{run}.e{epoch:08d}`` consists of the weights ``.safetensors`` (or ``.pt``) and
optional sidecars ``.metrics.json`` and ``.trainer.safetensors``. Sidecars are written first and
the weights last, so a checkpoint exists exactly when its weights file does.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from .architecture import architecture_from_json, architecture_to_json
from .artifact import PolicyArtifact
from .cache import NodeCache
from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, CorruptCheckpointError
from .formats import load_pt, read_safetensors, save_pt, verify_safetensors, write_safetensors
from .storage import Storage, is_network_filesystem

__all__ = [
    "MANIFEST_NAME",
    "CheckpointName",
    "checkpoint_base",
    "load_policy_artifact",
    "parse_checkpoint_name",
    "read_metrics",
    "save_policy_artifact",
    "state_dict_of",
    "unwrap_module",
]

MANIFEST_NAME = "model_architecture.json"
WEIGHT_EXTENSIONS = (".safetensors", ".pt")
METRICS_SUFFIX = ".metrics.json"
TRAINER_SUFFIX = ".trainer.safetensors"
LEGACY_ARCH_SUFFIX = ".policyarchitecture"
_NAME_RE = re.compile(r"^(?P<run>[A-Za-z0-9_-]+)\.e(?P<epoch>\d+)\.(?P<fmt>safetensors|pt)$")


@dataclass(frozen=True, order=True)
class CheckpointName:
    epoch: int
    fmt_rank: int  # safetensors sorts after pt, so it wins when both exist for one epoch
    run: str
    fmt: str

    @property
    def base(self) -> str:
        return f"{self.run}.e{self.epoch:08d}"

    @property
    def filename(self) -> str:
        return f"{self.base}.{self.fmt}"


def sanitize_run_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "run"


def checkpoint_base(run: str, epoch: int) -> str:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    return f"{sanitize_run_name(run)}.e{epoch:08d}"


def parse_checkpoint_name(filename: str) -> CheckpointName | None:
    m = _NAME_RE.match(filename)
    if not m:
        return None
    fmt = m["fmt"]
    return CheckpointName(epoch=int(m["epoch"]), fmt_rank=1 if fmt == "safetensors" else 0, run=m["run"], fmt=fmt)


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP/FSDP-style wrappers and torch.compile."""
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(module, "module"):
            module = module.module
        else:
            return module


def state_dict_of(policy: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(policy, torch.nn.Module):
        return dict(unwrap_module(policy).state_dict())
    if isinstance(policy, Mapping):
        return dict(policy)
    raise CheckpointFormatError(f"cannot save a {type(policy).__name__}: expected a module or a state dict")


def _split(base_path: str, storage_options: Mapping[str, Any] | None) -> tuple[Storage, str]:
    directory, base = posixpath.split(base_path.rstrip("/"))
    if not base:
        raise CheckpointFormatError(f"{base_path!r} names no file")
    return Storage(directory or ".", dict(storage_options or {})), base


def write_checkpoint(
    storage: Storage,
    base: str,
    state_dict: Mapping[str, torch.Tensor],
    *,
    architecture_json: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    training_metrics: Mapping[str, Any] | None = None,
    trainer_state: tuple[Mapping[str, torch.Tensor], Mapping[str, str]] | None = None,
    checkpoint_format: str = "safetensors",
    detach_buffers: bool = True,
) -> str:
    """Write sidecars, then the weights file (the commit point); returns the weights URI."""
    if checkpoint_format not in ("safetensors", "pt"):
        raise CheckpointFormatError(f"unknown checkpoint_format {checkpoint_format!r} (use 'safetensors' or 'pt')")
    if training_metrics is not None:
        try:
            payload = json.dumps(dict(training_metrics), indent=1, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise CheckpointFormatError(f"training_metrics for {base} are not JSON-serializable: {e}") from e
        storage.write_bytes(base + METRICS_SUFFIX, payload)
    if trainer_state is not None:
        tensors, meta = trainer_state
        storage.write(base + TRAINER_SUFFIX, lambda f: write_safetensors(f, tensors, meta))
    meta: dict[str, str] = {}
    if architecture_json is not None:
        meta["ckptio.architecture"] = json.dumps(architecture_json, sort_keys=True)
    if epoch is not None:
        meta["ckptio.epoch"] = str(epoch)
    name = f"{base}.{checkpoint_format}"
    if checkpoint_format == "safetensors":
        return storage.write(name, lambda f: write_safetensors(f, state_dict, meta, detach=detach_buffers))
    return storage.write(name, lambda f: save_pt(f, state_dict, meta))


def save_policy_artifact(
    base_path: str,
    policy: torch.nn.Module | Mapping[str, torch.Tensor],
    policy_architecture: Any,
    training_metrics: Mapping[str, Any] | None = None,
    detach_buffers: bool = True,
    *,
    epoch: int | None = None,
    checkpoint_format: str = "safetensors",
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write ``{base}.safetensors`` (architecture in its header) and ``{base}.metrics.json``; returns the weights URI."""
    storage, base = _split(base_path, storage_options)
    arch_json = architecture_to_json(policy_architecture) if policy_architecture is not None else None
    return write_checkpoint(
        storage,
        base,
        state_dict_of(policy),
        architecture_json=arch_json,
        epoch=epoch,
        training_metrics=training_metrics,
        checkpoint_format=checkpoint_format,
        detach_buffers=detach_buffers,
    )


def read_metrics(storage: Storage, base: str) -> dict[str, Any] | None:
    name = base + METRICS_SUFFIX
    data = _read_optional(storage, name)
    if data is None:
        return None
    try:
        metrics = json.loads(data)
    except ValueError as e:
        raise CorruptCheckpointError(f"{storage.url(name)}: metrics sidecar is not valid JSON: {e}") from None
    if not isinstance(metrics, dict):
        raise CorruptCheckpointError(f"{storage.url(name)}: metrics sidecar is not a JSON object")
    return metrics


def _read_optional(storage: Storage, name: str) -> bytes | None:
    try:
        return storage.read_bytes(name)
    except CheckpointNotFoundError:
        return None


def resolve_architecture(
    storage: Storage, base: str, metadata: Mapping[str, str], explicit: Any, allow: Iterable[str]
) -> Any:
    """Explicit argument, else the file's header, else the run manifest, else a legacy sidecar."""
    if explicit is not None:
        return explicit
    candidates: list[tuple[str, Any]] = []
    if "ckptio.architecture" in metadata:
        candidates.append((storage.url(base) + " header", lambda: metadata["ckptio.architecture"]))
    candidates.append((storage.url(MANIFEST_NAME), lambda: _read_optional(storage, MANIFEST_NAME)))
    candidates.append(
        (storage.url(base + LEGACY_ARCH_SUFFIX), lambda: _read_optional(storage, base + LEGACY_ARCH_SUFFIX))
    )
    for source, get in candidates:
        data = get()
        if data is not None:
            return architecture_from_json(data, allow=allow, source=source)
    return None


def open_weights(storage: Storage, name: str) -> IO[bytes]:
    path = storage.local_path(name)
    if path is not None:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path}: no such checkpoint file") from None
        except IsADirectoryError:
            raise CheckpointFormatError(f"{path}: is a directory, not a checkpoint file") from None
    return storage.open(name, "rb")


def read_weights(
    storage: Storage,
    name: str,
    *,
    mmap: bool | None = None,
    trusted: bool = False,
    verify: bool = False,
    local_path: str | None = None,
) -> tuple[Mapping[str, torch.Tensor] | torch.nn.Module, dict[str, str]]:
    """Tensors (or a trusted pickled module) and header metadata of one weights file.

    ``mmap=None`` maps local-disk files and reads network-filesystem files eagerly.
    """
    source = storage.url(name)
    path = local_path or storage.local_path(name)
    if mmap is None:
        mmap = path is not None and not is_network_filesystem(path)
    f = open(local_path, "rb") if local_path else open_weights(storage, name)
    with f:
        if name.endswith(".safetensors"):
            if verify:
                verify_safetensors(f, source)
            return read_safetensors(f, source, mmap_file=mmap and path is not None)
        if name.endswith(".pt"):
            return load_pt(f, source, trusted=trusted, mmap_file=mmap and path is not None)
    raise CheckpointFormatError(f"{source}: unknown checkpoint extension (expected .safetensors or .pt)")


def load_checkpoint(
    storage: Storage,
    name: str,
    *,
    policy_architecture: Any = None,
    mmap: bool | None = None,
    trusted: bool = False,
    verify: bool = False,
    allow: Iterable[str] = (),
    local_path: str | None = None,
    cache: NodeCache | None = None,
) -> PolicyArtifact:
    """Load weights file ``name`` in ``storage`` with its sidecars as a PolicyArtifact.

    Remote weights go through the node-local ``cache`` (one download, then a local mmap).
    """
    source = storage.url(name)
    if local_path is None and not storage.is_local:
        local_path = (cache or NodeCache()).fetch(storage, name)
    obj, metadata = read_weights(storage, name, mmap=mmap, trusted=trusted, verify=verify, local_path=local_path)
    if isinstance(obj, torch.nn.Module):
        return PolicyArtifact(policy=obj, source=source)
    base = name.rsplit(".", 1)[0]
    arch = resolve_architecture(storage, base, metadata, policy_architecture, allow)
    epoch_s = metadata.get("ckptio.epoch")
    parsed = parse_checkpoint_name(name)
    epoch = int(epoch_s) if epoch_s and epoch_s.isdigit() else (parsed.epoch if parsed else None)
    return PolicyArtifact(
        policy_architecture=arch,
        state_dict=obj,
        training_metrics=read_metrics(storage, base),
        source=source,
        epoch=epoch,
    )


def load_policy_artifact(
    base_path: str,
    policy_architecture: Any = None,
    *,
    mmap: bool | None = None,
    trusted: bool = False,
    verify: bool = False,
    allow: Iterable[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> PolicyArtifact:
    """Load ``{base}.safetensors`` (or ``{base}.pt``, or the exact file named) with its sidecars."""
    storage, base = _split(base_path, storage_options)
    if base.endswith(WEIGHT_EXTENSIONS):
        name = base
    else:
        name = next((base + ext for ext in WEIGHT_EXTENSIONS if storage.exists(base + ext)), None)
        if name is None:
            raise CheckpointNotFoundError(f"{base_path}: no {base}.safetensors or {base}.pt")
    try:
        return load_checkpoint(
            storage,
            name,
            policy_architecture=policy_architecture,
            mmap=mmap,
            trusted=trusted,
            verify=verify,
            allow=allow,
        )
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{storage.url(name)}: cannot read: {e}") from e
