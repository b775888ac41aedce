"""Tools on anyone's checkpoint: convert between formats, inspect, verify. None of them imports code.

The ``ckptio`` command is a thin shell over these.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .architecture import architecture_to_json
from .artifact import MockArchitecture
from .discovery import locate, resolve, scan
from .errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    save_failed,
    typed_io,
)
from .formats import check_digest
from .layout import (
    MANIFEST_NAME,
    WEIGHT_EXTENSIONS,
    Sidecars,
    architecture_record,
    epoch_of,
    open_weights,
    read_metadata,
    read_metrics,
    read_trainer_state,
    read_weights,
    state_dict_of,
    write_checkpoint,
)
from .storage import Storage

__all__ = ["VerifyResult", "convert", "inspect_checkpoint", "verify", "verify_checkpoint"]


def convert(src: str, dst: str, *, trusted: bool = False, storage_options: Mapping[str, Any] | None = None) -> str:
    """Rewrite a checkpoint in the format named by ``dst``'s extension (.safetensors or .pt).

    Copies the weights, metrics, epoch and the architecture record as they are: the architecture's
    class is never imported.
    """
    if not dst.endswith(WEIGHT_EXTENSIONS):
        raise CheckpointFormatError(f"{dst}: destination must end in .safetensors or .pt")
    with typed_io(src, "reading"):
        storage, name = locate(src, storage_options)
        obj, metadata = read_weights(storage, name, trusted=trusted)
        metrics = read_metrics(storage, name, metadata) if not isinstance(obj, torch.nn.Module) else None
        record = architecture_record(storage, name.rsplit(".", 1)[0], metadata)
    arch_json = None
    if record is not None:
        try:
            arch_json = json.loads(record[1])
        except ValueError as e:
            raise CheckpointFormatError(f"{record[0]}: architecture record is not valid JSON: {e}") from None
    state = state_dict_of(obj)
    directory, out_name = posixpath.split(dst)
    out = Storage(directory or ".", dict(storage_options or {}))
    base, fmt = out_name.rsplit(".", 1)
    try:
        return write_checkpoint(
            out,
            base,
            state,
            architecture_json=arch_json,
            epoch=epoch_of(name, metadata),
            training_metrics=metrics,
            checkpoint_format=fmt,
        ).uri
    except (CheckpointFormatError, InvalidArgumentError):
        raise
    except Exception as e:
        raise save_failed(out.url(out_name), "converting " + src, e) from e


def inspect_checkpoint(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe a checkpoint without importing its architecture: format, epoch, tensors, bytes, metrics."""
    if uri.startswith("mock://"):
        return {
            "uri": uri, "format": "mock", "epoch": None, "tensor_count": 0, "total_bytes": 0, "dtypes": {},
            "metrics": None, "architecture": architecture_to_json(MockArchitecture()), "digest": None, "files": [],
        }  # fmt: skip
    storage, name = locate(uri, storage_options)
    obj, metadata = read_weights(storage, name, mmap=None)
    tensors = state_dict_of(obj)
    arch_raw = metadata.get("ckptio.architecture")
    if arch_raw is None and storage.exists(MANIFEST_NAME):
        arch_raw = storage.read_bytes(MANIFEST_NAME).decode("utf-8", "replace")
    unique = {id(t): t for t in tensors.values()}
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        dtypes[str(t.dtype).removeprefix("torch.")] = dtypes.get(str(t.dtype).removeprefix("torch."), 0) + 1
    try:
        architecture = json.loads(arch_raw) if arch_raw else None
    except ValueError:
        architecture = arch_raw
    return {
        "uri": storage.url(name),
        "format": name.rsplit(".", 1)[1],
        "epoch": epoch_of(name, metadata),
        "tensor_count": len(tensors),
        "total_bytes": sum(t.numel() * t.element_size() for t in unique.values()),
        "dtypes": dtypes,
        "metrics": read_metrics(storage, name, metadata),
        "architecture": architecture,
        "digest": metadata.get("ckptio.crc32"),
        "weights_key": metadata.get("ckptio.pt_key"),  # a .pt training checkpoint: the entry the weights came from
        "files": [storage.url(n) for n in [*Sidecars.of(name.rsplit(".", 1)[0], metadata, name).names(), name]
                  if storage.exists(n)],
    }  # fmt: skip


@dataclass(frozen=True)
class VerifyResult:
    """One file's verdict: ``ok`` (digest matches), ``bad`` (damaged or missing) or ``unverified`` (no digest)."""

    uri: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "bad"


def _verify_weights(storage: Storage, name: str) -> tuple[VerifyResult, dict[str, str] | None]:
    uri = storage.url(name)
    if not name.endswith(".safetensors"):  # .pt has no digest: a full load is the check
        try:
            metadata = read_weights(storage, name, mmap=False)[1]
        except CheckpointError as e:
            return VerifyResult(uri, "bad", _detail(e, uri)), None
        return VerifyResult(uri, "unverified", "loads, but .pt files carry no digest"), metadata
    try:
        with open_weights(storage, name) as f:
            metadata = check_digest(f, uri)
        if metadata is None:
            unverified = VerifyResult(uri, "unverified", "header and offsets valid; no digest to check contents")
            return unverified, read_metadata(storage, name)
        return VerifyResult(uri, "ok"), metadata
    except CheckpointError as e:
        return VerifyResult(uri, "bad", _detail(e, uri)), None


def _detail(error: BaseException, uri: str) -> str:
    """The error message without the file name it starts with (the caller prints the name once)."""
    text = str(error)
    return text[len(uri) + 2 :] if text.startswith(uri + ": ") else text


def verify_checkpoint(storage: Storage, name: str) -> list[VerifyResult]:
    """Verify every file of one checkpoint: weights, metrics and trainer state, each against its digest."""
    weights, metadata = _verify_weights(storage, name)
    results = [weights]
    if metadata is None:
        return results
    sidecars = Sidecars.of(name.rsplit(".", 1)[0], metadata, weights.uri)
    if sidecars.metrics is not None and (sidecars.declared or storage.exists(sidecars.metrics)):
        uri = storage.url(sidecars.metrics)
        try:
            read_metrics(storage, name, metadata)
            status = "ok" if sidecars.metrics_crc32 else "unverified"
            results.append(VerifyResult(uri, status, "" if sidecars.metrics_crc32 else "valid JSON; no digest"))
        except CheckpointError as e:
            results.append(VerifyResult(uri, "bad", _detail(e, uri)))
    if sidecars.trainer is not None and (sidecars.declared or storage.exists(sidecars.trainer)):
        uri = storage.url(sidecars.trainer)
        try:
            read_trainer_state(storage, name, metadata, verify=True)
            results.append(VerifyResult(uri, "ok"))
        except CheckpointError as e:
            results.append(VerifyResult(uri, "bad", _detail(e, uri)))
    return results


def verify(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[VerifyResult]:
    """Fully verify a checkpoint file, or every checkpoint in a directory: one result per file."""
    storage, name = resolve(uri, storage_options)
    names = [name] if name is not None else [i.name for i in scan(storage)]
    if not names:
        raise CheckpointNotFoundError(f"{uri}: no checkpoints in this directory")
    return [r for n in names for r in verify_checkpoint(storage, n)]
